"""Decide which parameters learn, and report it per part of the model."""
from __future__ import annotations

from vlft.models.registry import Family

PARTS = ("vision", "merger", "llm", "head", "other")


def is_lora_param(name: str) -> bool:
    # PEFT names its adapter tensors lora_A / lora_B / lora_embedding_* / lora_magnitude_vector (DoRA)
    return ".lora_" in name


def apply_freeze(model, family: Family, *, freeze_vision_tower: bool, freeze_merger: bool, freeze_llm: bool) -> None:
    """Set requires_grad on every non-LoRA parameter from the flags; LoRA tensors always train.

    Run it after LoRA is applied: PEFT freezes the whole base model, and the merger or vision tower may
    still need to train fully next to the adapter. The head and the embeddings belong to the LLM.
    """
    frozen = {"vision": freeze_vision_tower, "merger": freeze_merger, "llm": freeze_llm, "head": freeze_llm,
              "other": freeze_llm}
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_param(name) or not frozen[family.part_of(name)])


def count_parameters(model, family: Family) -> dict[str, tuple[int, int]]:
    """{part: (trainable, frozen)} with LoRA adapters counted as their own part."""
    counts = {part: [0, 0] for part in (*PARTS, "lora")}
    for name, param in model.named_parameters():
        part = "lora" if is_lora_param(name) else family.part_of(name)
        counts[part][0 if param.requires_grad else 1] += param.numel()
    return {part: (t, f) for part, (t, f) in counts.items() if t or f}


def parameter_table(model, family: Family) -> str:
    counts = count_parameters(model, family)
    rows = [f"{'part':<8} {'trainable':>14} {'frozen':>14}"]
    for part, (t, f) in counts.items():
        rows.append(f"{part:<8} {t:>14,} {f:>14,}")
    total_t = sum(t for t, _ in counts.values())
    total_f = sum(f for _, f in counts.values())
    rows.append(f"{'total':<8} {total_t:>14,} {total_f:>14,}  ({100 * total_t / max(1, total_t + total_f):.2f}% trainable)")
    return "\n".join(rows)
