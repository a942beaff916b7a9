"""Flag combinations: contradictory or ineffective ones stop at start-up naming the flags, the useful
ones pass, 2U1/Qwen2-VL-Finetune launch lines parse unchanged."""
from __future__ import annotations

import shlex

import pytest

from vlft.config import parse_args, validate
from vlft.errors import VlftError
from vlft.train.sft.config import GROUPS as SFT_GROUPS

BASE = ["--model_id", "m", "--data_path", "d.json", "--output_dir", "o"]


def check(*flags: str):
    groups = parse_args(SFT_GROUPS, [*BASE, *flags])
    validate(*groups)
    return groups


@pytest.mark.parametrize("flags,named", [
    (["--lora_enable", "true", "--freeze_llm", "false"], ["--lora_enable", "--freeze_llm"]),
    (["--vision_lora", "true", "--freeze_vision_tower", "false"], ["--vision_lora", "--freeze_vision_tower"]),
    (["--use_dora", "true"], ["--use_dora", "--lora_enable"]),
    (["--lora_namespan_exclude", "lm_head"], ["--lora_namespan_exclude"]),
    (["--num_lora_modules", "4", "--vision_lora", "true"], ["--num_lora_modules", "--lora_enable"]),
    (["--bits", "4"], ["--bits", "--lora_enable"]),
    (["--unfreeze_topk_llm", "2"], ["--unfreeze_topk_llm", "--freeze_llm"]),
    (["--unfreeze_topk_vision", "1"], ["--unfreeze_topk_vision", "--freeze_vision_tower"]),
    (["--lora_enable", "true", "--bits", "4", "--unfreeze_topk_llm", "1"], ["--unfreeze_topk_llm", "--bits"]),
    (["--freeze_vision_tower", "true", "--vision_lr", "1e-5"], ["--vision_lr"]),
    (["--freeze_merger", "true", "--merger_lr", "1e-5"], ["--merger_lr", "--freeze_merger"]),
    (["--freeze_vision_tower", "true", "--freeze_merger", "true", "--freeze_llm", "true"], ["--freeze_llm"]),
    (["--lora_enable", "true", "--lora_rank", "0"], ["--lora_rank"]),
    (["--num_lora_modules", "0", "--lora_enable", "true"], ["--num_lora_modules"]),
])
def test_contradictions_are_named(flags, named):
    with pytest.raises(VlftError) as err:
        check(*flags)
    for flag in named:
        assert flag in str(err.value)


@pytest.mark.parametrize("flags", [
    [],
    ["--freeze_vision_tower", "true"],
    ["--freeze_vision_tower", "true", "--freeze_llm", "true"],
    ["--lora_enable", "true", "--vision_lr", "2e-6", "--merger_lr", "1e-5"],
    ["--lora_enable", "true", "--vision_lora", "true"],
    ["--vision_lora", "true"],
    ["--lora_enable", "true", "--use_dora", "true", "--bits", "4", "--quant_type", "fp4", "--double_quant", "false"],
    ["--freeze_llm", "true", "--unfreeze_topk_llm", "2", "--freeze_vision_tower", "true", "--unfreeze_topk_vision", "1",
     "--vision_lr", "1e-6"],
    ["--lora_enable", "true", "--unfreeze_topk_llm", "1"],
])
def test_useful_combinations_pass(flags):
    check(*flags)


def test_freeze_defaults_follow_lora():
    _, _, t, _ = check("--lora_enable", "true")
    assert t.llm_frozen and not t.vision_frozen  # 2U1's LoRA recipe: tower trains next to the adapter
    _, _, t, _ = check("--vision_lora", "true")
    assert t.llm_frozen and t.vision_frozen
    _, _, t, _ = check()
    assert not t.llm_frozen and not t.vision_frozen


# Launch lines of 2U1/Qwen2-VL-Finetune's SFT scripts (their flags, our paths). --deepspeed and --tf32 are left
# out: the first needs the DeepSpeed issue's configs, the second an Ampere GPU to validate.
TWO_U1 = {
    "finetune.sh": """--model_id m --data_path d.json --image_folder . --freeze_vision_tower False --bf16 True --fp16 False
        --disable_flash_attn2 False --output_dir o --num_train_epochs 1 --per_device_train_batch_size 1
        --gradient_accumulation_steps 1 --min_pixels 200704 --max_pixels 1003520 --learning_rate 1e-5 --vision_lr 2e-6
        --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --gradient_checkpointing True
        --report_to tensorboard --lazy_preprocess True --save_strategy steps --save_steps 1 --save_total_limit 10
        --dataloader_num_workers 4""",
    "finetune_lora.sh": """--lora_enable True --lora_namespan_exclude "['lm_head', 'embed_tokens']" --lora_rank 64
        --lora_alpha 128 --lora_dropout 0.05 --num_lora_modules -1 --model_id m --data_path d.json --image_folder .
        --freeze_vision_tower False --bf16 True --fp16 False --disable_flash_attn2 False --output_dir o
        --num_train_epochs 1 --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --min_pixels 200704
        --max_pixels 1003520 --learning_rate 1e-4 --vision_lr 2e-6 --weight_decay 0. --warmup_ratio 0.03
        --lr_scheduler_type cosine --logging_steps 1 --gradient_checkpointing True --report_to tensorboard
        --lazy_preprocess True --save_strategy steps --save_steps 1 --save_total_limit 10 --dataloader_num_workers 4""",
    "finetune_lora_vision.sh": """--use_liger True --lora_enable True --vision_lora True --use_dora False
        --lora_namespan_exclude "['lm_head', 'embed_tokens']" --lora_rank 64 --lora_alpha 64 --lora_dropout 0.05
        --num_lora_modules -1 --model_id m --data_path d.json --image_folder . --remove_unused_columns False
        --freeze_vision_tower True --freeze_llm True --tune_merger False --bf16 True --fp16 False
        --disable_flash_attn2 False --output_dir o --num_train_epochs 1 --per_device_train_batch_size 4
        --gradient_accumulation_steps 4 --image_min_pixels 200704 --image_max_pixels 1003520 --learning_rate 2e-4
        --weight_decay 0.1 --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --gradient_checkpointing True
        --report_to tensorboard --lazy_preprocess True --save_strategy steps --save_steps 200 --save_total_limit 10
        --dataloader_num_workers 4""",
    "finetune_8bit.sh": """--model_id m --data_path d.json --image_folder . --lora_enable False --tune_merger True
        --freeze_vision_tower False --freeze_llm False --bf16 True --output_dir o --num_train_epochs 1
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --min_pixels 401408 --max_pixels 1003520
        --learning_rate 1e-5 --merger_lr 1e-5 --vision_lr 2e-6 --weight_decay 0.1 --warmup_ratio 0.03 --adam_beta2 0.95
        --lr_scheduler_type cosine --logging_steps 1 --gradient_checkpointing True --report_to tensorboard
        --lazy_preprocess True --save_strategy steps --save_steps 200 --save_total_limit 10 --dataloader_num_workers 4""",
}


@pytest.mark.parametrize("script", list(TWO_U1))
def test_2u1_recipes_parse(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # tensorboard is not installed here, and TrainingArguments only accepts bf16 without a GPU under use_cpu
    argv = [a.replace("tensorboard", "none") for a in shlex.split(TWO_U1[script])] + ["--use_cpu", "true"]
    model, data, tune, train = parse_args(SFT_GROUPS, argv)
    validate(model, data, tune, train)
    fa2 = "--disable_flash_attn2 False" in TWO_U1[script]
    assert model.attn_implementation == ("flash_attention_2" if fa2 else "sdpa")
    assert tune.lora_namespan_exclude == ([] if "namespan" not in TWO_U1[script] else ["lm_head", "embed_tokens"])
    if "min_pixels" in TWO_U1[script] and "image_min" not in TWO_U1[script]:
        assert data.image_min_pixels in (200704, 401408) and data.image_max_pixels == 1003520
    if script == "finetune_lora_vision.sh":
        assert tune.vision_lora and tune.vision_frozen and tune.freeze_merger and tune.use_liger
    if script == "finetune_8bit.sh":
        assert not tune.freeze_merger and tune.merger_lr == 1e-5 and train.adam_beta2 == 0.95


def test_flag_spellings_that_contradict_are_named():
    with pytest.raises(VlftError, match="--tune_merger true contradicts --freeze_merger true"):
        check("--tune_merger", "true", "--freeze_merger", "true")
    with pytest.raises(VlftError, match="--disable_flash_attn2"):
        check("--disable_flash_attn2", "false", "--attn_implementation", "eager")
    with pytest.raises(VlftError, match="--min_pixels"):
        check("--min_pixels", "100", "--image_min_pixels", "200")
    with pytest.raises(VlftError, match="--lazy_preprocess"):
        check("--lazy_preprocess", "false")


@pytest.mark.parametrize("config_name", ["DPOConfig", "GRPOConfig"])
def test_the_arguments_mixin_goes_on_trls_configs(config_name, tmp_path):
    """The DPO and GRPO stages are `VlftArgumentsMixin + trl.*Config`: vlft's defaults and 2U1 flags apply on top
    of TRL's own fields, which keep their defaults."""
    from dataclasses import dataclass

    import trl

    from vlft.train.core.arguments import VlftArgumentsMixin

    base = getattr(trl, config_name)
    config_cls = dataclass(type(f"Vlft{config_name}", (VlftArgumentsMixin, base), {}))
    args = config_cls(output_dir=str(tmp_path), warmup_ratio=0.1, use_cpu=True, report_to=[])
    assert args.warmup_steps == 0.1 and args.remove_unused_columns is False and args.label_names == ["labels"]
    assert args.logging_steps == 1
    plain = base(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    own = {"beta", "loss_type"} if config_name == "DPOConfig" else {"num_generations", "beta", "loss_type"}
    assert all(getattr(args, name) == getattr(plain, name) for name in own)


def test_grpo_num_iterations_above_one_passes_and_below_one_is_named():
    from vlft.train.grpo.config import GROUPS as GRPO_GROUPS

    groups = parse_args(GRPO_GROUPS, [*BASE, "--num_iterations", "3", "--use_cpu", "true"])
    validate(*groups)
    assert groups[-1].num_iterations == 3
    with pytest.raises(VlftError, match=r"--num_iterations 0: must be >= 1"):
        validate(*parse_args(GRPO_GROUPS, [*BASE, "--num_iterations", "0", "--use_cpu", "true"]))
