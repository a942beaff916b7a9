"""`vlft sft` end to end on the tiny model: files written, loss falls, exactly the chosen weights
move, and what was saved reloads into the same model."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA
from safetensors.torch import load_file

from vlft.errors import VlftError
from vlft.train.sft.run import run

COMMON = ["--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES), "--per_device_train_batch_size", "2",
          "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0"]


def load_base(model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)


def bare_state(model) -> dict[str, torch.Tensor]:
    """Parameters by bare-model name; a LoRA-wrapped layer's base weight is reported under its plain name."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = p.detach().clone()
    return out


def eval_batch(model_dir):
    from vlft.data.collator import SFTCollator
    from vlft.data.prepare import prepare_sft_data
    from vlft.data.sft import SFTDataset
    from vlft.models.loading import load_processor

    processor = load_processor(str(model_dir))
    checked = prepare_sft_data(str(DEMO_DATA), processor=processor, image_folder=str(DEMO_IMAGES),
                             media=DEMO_MEDIA, max_seq_length=4096)
    ds = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)
    return SFTCollator.for_model(processor, load_base(model_dir))([ds[i] for i in (0, 2, 7, 8)])


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    summary, trainer = run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--lora_enable", "true",
                            "--lora_rank", "8", "--lora_alpha", "16", "--freeze_vision_tower", "true",
                            "--num_train_epochs", "4", "--learning_rate", "5e-3", *COMMON])
    return out, summary, trainer


def test_lora_run_writes_adapter_processor_and_args(lora_run, tiny_model_dir):
    out, summary, _ = lora_run
    for name in ("adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors",
                 "vlft_args.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()
    args = json.loads((out / "vlft_args.json").read_text())
    assert args["lora_enable"] is True and args["lora_rank"] == 8
    assert args["model_id"] == str(tiny_model_dir) and args["data_path"] == [str(DEMO_DATA)]
    assert summary["steps"] == 20
    assert math.isfinite(summary["first_loss"]) and summary["last_loss"] < summary["first_loss"] - 0.5
    assert summary["tokens_per_second"] > 0


def test_lora_run_moves_only_adapter_and_merger(lora_run, tiny_model_dir):
    _, _, trainer = lora_run
    before = bare_state(load_base(tiny_model_dir))
    after = bare_state(trainer.model)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n].to(before[n].dtype))}
    assert changed and all(n.startswith("model.visual.merger.") for n in changed)
    merger = {n for n in before if n.startswith("model.visual.merger.")}
    assert changed == merger
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # initialised at zero, so they learned
    # no LoRA on the vision tower or the head
    lora_modules = {n.split(".lora_")[0] for n, _ in trainer.model.named_parameters() if ".lora_" in n}
    assert lora_modules and all(".language_model.layers." in n for n in lora_modules)


def test_non_lora_trainables_hold_exactly_the_merger(lora_run):
    out, _, trainer = lora_run
    saved = load_file(str(out / "non_lora_trainables.safetensors"))
    live = {n.removeprefix("base_model.model."): p for n, p in trainer.model.named_parameters()
            if p.requires_grad and ".lora_" not in n}
    assert saved.keys() == live.keys() and all(k.startswith("model.visual.merger.") for k in saved)
    for k in saved:
        assert torch.equal(saved[k], live[k].detach().cpu())


def test_saved_adapter_reproduces_in_memory_logits(lora_run, tiny_model_dir):
    from peft import PeftModel

    out, _, trainer = lora_run
    batch = eval_batch(tiny_model_dir)
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    base = load_base(tiny_model_dir)
    missing, unexpected = base.load_state_dict(load_file(str(out / "non_lora_trainables.safetensors")), strict=False)
    assert not unexpected
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
        untrained = load_base(tiny_model_dir).eval()(**batch).logits
    assert (got - expected).abs().max() < 1e-5
    assert (untrained - expected).abs().max() > 1e-2  # so the comparison above could fail


def test_full_run_trains_llm_and_merger_not_frozen_tower(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "full"
    summary, trainer = run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--freeze_vision_tower",
                            "true", "--num_train_epochs", "2", "--learning_rate", "1e-3", *COMMON])
    for name in ("model.safetensors", "config.json", "vlft_args.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    assert summary["last_loss"] < summary["first_loss"]
    before, after = bare_state(load_base(tiny_model_dir)), bare_state(trainer.model)
    for name in before:
        moved = not torch.equal(before[name], after[name])
        if name.startswith("model.visual.") and not name.startswith("model.visual.merger."):
            assert not moved, f"frozen {name} changed"
        elif name.startswith(("model.visual.merger.", "model.language_model.layers.", "lm_head")):
            assert moved, f"trainable {name} did not change"
    reloaded = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    batch = eval_batch(tiny_model_dir)
    with torch.no_grad():
        assert (reloaded(**batch).logits - trainer.model.eval()(**batch).logits).abs().max() < 1e-5


def test_existing_output_dir_is_never_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(VlftError, match="--overwrite_output_dir"):
        run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "1", *COMMON])
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "1", "--overwrite_output_dir",
         "true", *COMMON])
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_lora_checkpoints_hold_adapter_not_model(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--lora_enable", "true", "--lora_rank", "4",
         "--freeze_vision_tower", "true", "--max_steps", "2", "--data_path", str(DEMO_DATA), "--image_folder",
         str(DEMO_IMAGES), "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "true"])
    for ckpt in (out / "checkpoint-1", out / "checkpoint-2"):
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors",
                "vlft_args.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "non_lora_state_dict.bin"}
    moved = load_file(str(out / "checkpoint-2" / "non_lora_trainables.safetensors"))
    first = load_file(str(out / "checkpoint-1" / "non_lora_trainables.safetensors"))
    assert any(not torch.equal(first[k], moved[k]) for k in first)  # each checkpoint has its own step's weights


def test_use_liger_on_cpu_is_skipped_with_a_message(tiny_model_dir, tmp_path, capsys):
    summary, trainer = run(["--model_id", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"), "--use_liger",
                            "true", "--max_steps", "1", *COMMON])
    from vlft.models.patches import liger_applied

    assert "Liger kernels need a CUDA GPU" in capsys.readouterr().err
    assert not liger_applied(trainer.model) and math.isfinite(summary["first_loss"])
