"""LoRA options by PEFT's names: rsLoRA's scaling, PiSSA / OLoRA initialisation (the model's output unchanged at
step 0, and a merge that equals the trained model), LoRA+'s parameter group; each trains two steps and saves."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA, FAMILIES, rounding_sensitivity

from vlft.config import TuneArguments, _tune_errors
from vlft.models.loading import load_model
from vlft.models.lora import apply_lora, lora_targets
from vlft.models.registry import get_family
from vlft.train.core.optim import build_param_groups
from vlft.train.sft.run import run

RANK, ALPHA, LR = 4, 8, 3e-3


def demo_batch(model_dir, model, indices=(0, 2, 7, 9)):
    """A padded batch of demo records (images and text) as the model's forward takes it, labels dropped."""
    from vlft.data.collator import SFTCollator
    from vlft.data.prepare import prepare_sft_data
    from vlft.data.sft import SFTDataset
    from vlft.models.loading import load_processor

    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(DEMO_DATA), processor=processor, image_folder=str(DEMO_IMAGES), media=DEMO_MEDIA,
                               max_seq_length=4096)
    ds = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)
    batch = SFTCollator.for_model(processor, model)([ds[i] for i in indices])
    batch.pop("labels")
    return batch


def train(model_dir, out, *flags, steps=2):
    return run(["--model_id", str(model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
                "--output_dir", str(out), "--lora_enable", "true", "--lora_rank", str(RANK), "--lora_alpha", str(ALPHA),
                "--lora_dropout", "0", "--freeze_vision_tower", "true", "--max_steps", str(steps),
                "--per_device_train_batch_size", "2", "--learning_rate", str(LR), "--save_strategy", "no",
                "--disable_tqdm", "true", "--seed", "0", *flags])


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_flags_need_lora_and_known_values():
    errors = _tune_errors(TuneArguments(use_rslora=True, init_lora_weights="pissa", loraplus_lr_ratio=16))
    for flag in ("--use_rslora", "--init_lora_weights", "--loraplus_lr_ratio"):
        assert any(e.startswith(f"{flag} has no effect without --lora_enable") for e in errors), errors
    assert any("must be true, false" in e for e in _tune_errors(TuneArguments(lora_enable=True, init_lora_weights="svd")))
    assert any("set-up of its own" in e for e in _tune_errors(TuneArguments(lora_enable=True, init_lora_weights="eva")))
    assert any("quantised" in e for e in _tune_errors(TuneArguments(lora_enable=True, init_lora_weights="olora", bits=4)))
    assert any("must be > 0" in e for e in _tune_errors(TuneArguments(lora_enable=True, loraplus_lr_ratio=0)))
    for ok in ("true", "false", "gaussian", "pissa", "pissa_niter_4", "olora", "orthogonal"):
        assert not _tune_errors(TuneArguments(lora_enable=True, init_lora_weights=ok)), ok


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_factory, tmp_path):
    """rsLoRA (arXiv 2312.03732): every adapted module scales by alpha / sqrt(r), not alpha / r; the run saves it."""
    out = tmp_path / "out"
    summary, trainer = train(tiny_model_factory("qwen2_vl"), out, "--use_rslora", "true", "--vision_lora", "true")
    layers = lora_layers(trainer.model)
    assert layers and {"llm", "vision"} <= {trainer.family.part_of(n) for n in layers}
    for name, layer in layers.items():
        assert layer.scaling["default"] == pytest.approx(ALPHA / math.sqrt(RANK), rel=1e-12), name
    assert ALPHA / math.sqrt(RANK) != ALPHA / RANK
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is True
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_pissa_and_olora_leave_the_output_unchanged(init, family_name, tiny_model_factory):
    """PiSSA / OLoRA move part of each weight into the adapter (W = W_res + s B0 A0): at step 0 the logits are the
    base model's (within 1e-4, or 4x the model's own rounding sensitivity where that is larger), while the base
    weights did change."""
    model_dir = tiny_model_factory(family_name)
    family = get_family(family_name)
    model, _ = load_model(str(model_dir))
    model.eval()
    batch = demo_batch(model_dir, model)
    with torch.no_grad():
        before = model(**batch).logits
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tolerance = max(1e-4, 4 * rounding_sensitivity(model, batch))
    # fused MoE experts are no weight matrix PiSSA / OLoRA can decompose (refused: tests/models/test_moe_lora.py)
    targets = lora_targets(model, family, llm=True, vision=True, experts=False)
    peft_model = apply_lora(model, targets=targets, rank=RANK, alpha=ALPHA, dropout=0.0, init_lora_weights=init).eval()
    with torch.no_grad():
        after = peft_model(**batch).logits
    diff = (after - before).abs().max().item()
    moved = max((p - weights[n.replace("base_model.model.", "").replace(".base_layer", "")]).abs().max().item()
                for n, p in peft_model.named_parameters() if n.endswith("base_layer.weight"))
    print(f"\n{family_name} {init}: max |logit diff| at step 0 = {diff:.2e} (tolerance {tolerance:.1e}); "
          f"base weights moved by up to {moved:.2e}")
    assert diff < tolerance
    assert moved > 1e-3  # the residual is not the original weight: merge has to account for it


def test_loraplus_puts_exactly_lora_b_in_its_own_group(tiny_model_factory):
    """LoRA+ (arXiv 2402.12354): every lora_B (language model and vision) learns at ratio x its part's rate; every
    other group is what it was without LoRA+."""
    family = get_family("qwen2_vl")
    model, _ = load_model(str(tiny_model_factory("qwen2_vl")))
    model = apply_lora(model, targets=lora_targets(model, family, llm=True, vision=True), rank=RANK, alpha=ALPHA,
                       dropout=0.0)
    for p in model.base_model.model.model.visual.merger.parameters():
        p.requires_grad_(True)  # a fully trained part next to the adapters
    kwargs = dict(lr=LR, weight_decay=0.1, vision_lr=1e-3, merger_lr=2e-3)
    plain = build_param_groups(model, family, **kwargs)
    plus = build_param_groups(model, family, loraplus_lr_ratio=16, **kwargs)
    lora_b = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    b_groups = [g for g in plus if g["name"].endswith("/lora_B")]
    assert {g["name"] for g in b_groups} == {"base/lora_B", "vision/lora_B"}
    assert {id(p) for g in b_groups for p in g["params"]} == lora_b
    for g in b_groups:
        part_lr = LR if g["name"].startswith("base") else 1e-3
        assert g["lr"] == pytest.approx(16 * part_lr) and g["weight_decay"] == 0.1
    rest = {g["name"]: g for g in plus if not g["name"].endswith("/lora_B")}
    for g in plain:
        kept = [p for p in g["params"] if id(p) not in lora_b]
        assert [id(p) for p in rest[g["name"]]["params"]] == [id(p) for p in kept]
        assert (rest[g["name"]]["lr"], rest[g["name"]]["weight_decay"]) == (g["lr"], g["weight_decay"])
    assert rest.keys() == {g["name"] for g in plain}


@pytest.mark.parametrize("option", ["loraplus", "pissa", "olora", "gaussian"])
def test_two_steps_train_and_save(option, tiny_model_factory, tmp_path):
    flags = {"loraplus": ["--loraplus_lr_ratio", "16"], "pissa": ["--init_lora_weights", "pissa"],
             "olora": ["--init_lora_weights", "olora"], "gaussian": ["--init_lora_weights", "gaussian"]}[option]
    out = tmp_path / "out"
    summary, trainer = train(tiny_model_factory("qwen2_vl"), out, *flags)
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    if option == "loraplus":
        groups = {g["name"]: g for g in trainer.optimizer.param_groups}
        assert groups["base/lora_B"]["initial_lr"] == pytest.approx(16 * LR)
        assert groups["base"]["initial_lr"] == pytest.approx(LR)
    else:
        assert config["init_lora_weights"] == option
    initial = out / "initial_adapter"
    assert initial.is_dir() == (option in ("pissa", "olora"))
    if initial.is_dir():
        assert json.loads((initial / "adapter_config.json").read_text())["init_lora_weights"] is True


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_of_a_pissa_run_equals_the_trained_model(init, tiny_model_factory, tmp_path):
    """The merged checkpoint (original weights + the run's update, converted to plain LoRA of rank 2r by PEFT) gives
    the logits of the model that trained (residual weights + trained adapter), in memory, within 1e-4."""
    from transformers import AutoModelForImageTextToText

    from vlft.merge import merge

    model_dir = tiny_model_factory("qwen2_vl")
    out = tmp_path / "run"
    _, trainer = train(model_dir, out, "--init_lora_weights", init, "--vision_lora", "true", "--freeze_vision_tower",
                       "true", steps=3)
    trained = trainer.model.eval()
    batch = demo_batch(model_dir, trained.get_base_model())
    merged_dir = merge(str(out), str(tmp_path / "merged"), dtype="fp32")
    merged = AutoModelForImageTextToText.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    base = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        want, got, untrained = trained(**batch).logits, merged(**batch).logits, base(**batch).logits
    diff = (want - got).abs().max().item()
    print(f"\n{init}: merged vs trained in memory max |logit diff| = {diff:.2e}; vs base {(got - untrained).abs().max():.2e}")
    assert diff < 1e-4
    assert (got - untrained).abs().max() > 1e-3  # training moved the model, and the merge kept it
    assert not (out / "initial_adapter" / "converted").exists()  # the run directory is never written to


def test_pissa_merge_without_initial_adapter_is_refused(tiny_model_factory, tmp_path):
    import shutil

    from vlft.errors import VlftError
    from vlft.merge import merge

    out = tmp_path / "run"
    train(tiny_model_factory("qwen2_vl"), out, "--init_lora_weights", "pissa", steps=1)
    shutil.rmtree(out / "initial_adapter")
    with pytest.raises(VlftError, match="initial_adapter/ .* is missing"):
        merge(str(out), str(tmp_path / "merged"), dtype="fp32")
    assert not (tmp_path / "merged").exists()


def test_scripts_pass_the_options_only_when_set(tmp_path):
    from test_scripts import launched_argv

    from vlft.config import parse_args
    from vlft.train.sft.config import GROUPS as SFT_GROUPS

    def tune(script, tmp, **settings):
        tmp.mkdir()
        calls = launched_argv(tmp, script, **settings)
        return calls["sft"], parse_args(SFT_GROUPS, calls["sft"])[2]

    for script in ("finetune_lora.sh", "finetune_lora_vision.sh"):
        argv, t = tune(script, tmp_path / f"{script}-unset")
        assert not {"--use_rslora", "--init_lora_weights", "--loraplus_lr_ratio"} & set(argv)
        argv, t = tune(script, tmp_path / f"{script}-set", USE_RSLORA="true", INIT_LORA_WEIGHTS="pissa_niter_4",
                       LORAPLUS_LR_RATIO="16")
        assert (t.use_rslora, t.init_lora_weights, t.loraplus_lr_ratio) == (True, "pissa_niter_4", 16.0)
