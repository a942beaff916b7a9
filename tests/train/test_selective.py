"""Which parts learn: for every family and every supported setup, two training steps move exactly the
parameters the flags select, the optimizer groups carry the right learning rates, and the run saves
exactly the right files."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_IMAGES, FAMILIES
from safetensors import safe_open
from safetensors.torch import load_file

from vlft.models.loading import load_model
from vlft.models.registry import get_family
from vlft.train.sft.run import run

LR, VISION_LR, MERGER_LR = 3e-3, 1e-3, 2e-3

# setup -> (flags, parts trained fully, parts with LoRA)
SETUPS = {
    "full": ([], {"vision", "merger", "llm", "head"}, set()),
    "freeze_vision": (["--freeze_vision_tower", "true"], {"merger", "llm", "head"}, set()),
    "merger_only": (["--freeze_vision_tower", "true", "--freeze_llm", "true"], {"merger"}, set()),
    "lora_llm_full_vision": (["--lora_enable", "true", "--vision_lr", str(VISION_LR)], {"vision", "merger"}, {"llm"}),
    "lora_llm_and_vision": (["--lora_enable", "true", "--vision_lora", "true", "--vision_lr", str(VISION_LR)],
                            {"merger"}, {"llm", "vision"}),
    "vision_lora_only": (["--vision_lora", "true"], {"merger"}, {"vision"}),
    "dora": (["--lora_enable", "true", "--use_dora", "true", "--freeze_vision_tower", "true"], {"merger"}, {"llm"}),
    "qlora_4bit": (["--lora_enable", "true", "--bits", "4", "--freeze_vision_tower", "true"], {"merger"}, {"llm"}),
    "topk_unfreeze": (["--freeze_llm", "true", "--unfreeze_topk_llm", "1", "--freeze_vision_tower", "true",
                       "--unfreeze_topk_vision", "1", "--vision_lr", str(VISION_LR)], {"merger", "top_llm", "top_vision"},
                      set()),
}


def bare(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    while ".base_layer." in name:  # PEFT nests one wrapper per adapted parameter of a module (MoE experts: two)
        name = name.replace(".base_layer.", ".")
    return name


def snapshot(model) -> dict[str, torch.Tensor]:
    return {bare(n): p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}


def expected_trainable(name: str, family, parts: set[str], n_layers: int, n_blocks: int) -> bool:
    part = family.part_of(name)
    if part in parts:
        return True
    found = family.layer_index(name)
    if found == ("llm", n_layers - 1) and "top_llm" in parts:
        return True
    return found == ("vision", n_blocks - 1) and "top_vision" in parts


@pytest.mark.parametrize("family_name", FAMILIES)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_setup_trains_exactly_the_selected_parts(setup, family_name, tiny_model_factory, image_only_data, tmp_path):
    flags, full_parts, lora_parts = SETUPS[setup]
    model_dir = tiny_model_factory(family_name)
    family = get_family(family_name)
    if setup == "dora" and family.moe is not None:  # PEFT's DoRA cannot adapt fused experts: refused, proven elsewhere
        flags = [*flags, "--lora_target_experts", "false"]
    bits = 4 if "--bits" in flags else 16
    before_model, _ = load_model(str(model_dir), bits=bits)  # same loader, so QLoRA weights match bit for bit
    before = snapshot(before_model)
    out = tmp_path / "out"
    argv = ["--model_id", str(model_dir), "--data_path", str(image_only_data), "--image_folder", str(DEMO_IMAGES),
            "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate",
            str(LR), "--merger_lr", str(MERGER_LR), "--weight_decay", "0.1", "--lora_rank", "4", "--lora_alpha", "8",
            "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0", *flags]
    _, trainer = run(argv)
    model = trainer.model
    after = snapshot(model)
    n_layers = 1 + max(i for n in before if (f := family.layer_index(n)) and f[0] == "llm" for i in [f[1]])
    n_blocks = 1 + max(i for n in before if (f := family.layer_index(n)) and f[0] == "vision" for i in [f[1]])

    # 1. exactly the selected non-LoRA parameters moved (and are the trainable ones)
    expected = {n for n in before if expected_trainable(n, family, full_parts, n_layers, n_blocks)}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {bare(n) for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert trainable == expected
    assert changed == expected, (sorted(changed - expected)[:5], sorted(expected - changed)[:5])

    # 2. LoRA sits exactly on the selected parts (never on patch_embed or the merger) and learned
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert {family.part_of(n) for n in lora} == lora_parts
    assert not any("patch_embed" in n or "merger" in n for n in lora)
    assert all(p.requires_grad for p in lora.values())
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero
    if setup == "dora":
        assert any("lora_magnitude_vector" in n for n in lora)
    if setup == "qlora_4bit":
        quantised = [n for n, p in model.named_parameters() if p.__class__.__name__ == "Params4bit"]
        assert quantised and all(family.part_of(n) == "llm" for n in quantised)

    # 3. optimizer groups: a learning rate per part, no decay on 1-D tensors (biases, norms, DoRA magnitudes)
    rates = {"vision": VISION_LR if "--vision_lr" in flags else LR, "merger": MERGER_LR, "base": LR}
    groups = trainer.optimizer.param_groups
    for g in groups:
        kind = g["name"].split("/")[0]
        assert g["initial_lr"] == pytest.approx(rates[kind])
        assert g["weight_decay"] == (0.0 if g["name"].endswith("/no_decay") else 0.1)
        assert all(p.ndim < 2 for p in g["params"]) == g["name"].endswith("/no_decay")
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    part_of_group = {"vision": "vision", "merger": "merger"}
    for g in groups:
        names = {n for n, p in model.named_parameters() if any(p is q for q in g["params"])}
        kind = g["name"].split("/")[0]
        assert {part_of_group.get(family.part_of(n), "base") for n in names} == {kind}

    # 4. saved files
    assert (out / "vlft_args.json").is_file() and (out / "chat_template.jinja").is_file()
    if lora_parts:
        assert not (out / "model.safetensors").exists()
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            saved_lora = {k for k in f.keys()}
        assert len(saved_lora) == len(lora)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["use_dora"] is (setup == "dora")
        non_lora = load_file(str(out / "non_lora_trainables.safetensors"))
        assert set(non_lora) == expected
        for name, tensor in non_lora.items():
            assert torch.equal(tensor, after[name])
    else:
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
