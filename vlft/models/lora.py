"""LoRA on the language model's linear layers, with exact module names (never bare suffixes:
in Qwen2.5-VL the vision MLP has the same names as the LLM's)."""
from __future__ import annotations

from torch import nn

from vlft.errors import VlftError
from vlft.models.registry import Family


def llm_lora_targets(model, family: Family) -> list[str]:
    """Full names of every nn.Linear inside the language model's decoder layers."""
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and family.part_of(name) == "llm"
    ]
    if not names:
        raise VlftError(f"found no linear layers under {family.llm_prefix!r}; is this a {family.model_type} model?")
    return names


def apply_lora(model, family: Family, *, rank: int, alpha: int, dropout: float, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=targets,
    )
    return get_peft_model(model, config)
