"""Optimizer parameter groups: a learning rate per part (vision tower, merger, the rest) and no
weight decay on biases and norms."""
from __future__ import annotations

from vlft.models.registry import Family


def _no_decay(name: str, param) -> bool:
    # 1-D tensors are biases, norm scales and DoRA magnitudes: decaying them towards zero only hurts.
    # (ZeRO-3 replaces a partitioned parameter's data by an empty tensor and keeps its shape in ds_shape.)
    return len(getattr(param, "ds_shape", param.shape)) < 2 or name.endswith(".bias")


def build_param_groups(model, family: Family, *, lr: float, weight_decay: float, vision_lr: float | None = None,
                       merger_lr: float | None = None, loraplus_lr_ratio: float | None = None) -> list[dict]:
    """Groups named 'base' (language model, head, embeddings), 'merger', 'vision', each split into decay and
    no-decay halves; LoRA tensors follow the part they adapt (vision LoRA gets vision_lr). Empty groups are dropped.

    With `loraplus_lr_ratio` (LoRA+, arXiv 2402.12354: B learns at ratio x A's rate) every LoRA B matrix goes to a
    group '<part>/lora_B' at ratio x its part's rate, with its part's weight decay; everything else is unchanged.
    LoRA+'s separate rate for LoRA on embedding layers does not arise: vlft puts LoRA on linear layers only."""
    rates = {"vision": vision_lr if vision_lr is not None else lr,
             "merger": merger_lr if merger_lr is not None else lr,
             "base": lr}
    buckets: dict[tuple[str, str], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = family.part_of(name)
        kind = part if part in ("vision", "merger") else "base"
        if loraplus_lr_ratio is not None and ".lora_B." in name:
            sub = "lora_B"
        else:
            sub = "no_decay" if _no_decay(name, param) else ""
        buckets.setdefault((kind, sub), []).append(param)
    groups = []
    # "base" first: the Trainer logs the first group's rate as `learning_rate`, which should be --learning_rate
    for kind in ("base", "merger", "vision"):
        for sub in ("", "no_decay", "lora_B"):
            params = buckets.get((kind, sub))
            if params:
                rate = rates[kind] * (loraplus_lr_ratio if sub == "lora_B" else 1)
                groups.append({"params": params, "lr": rate, "weight_decay": 0.0 if sub == "no_decay" else weight_decay,
                               "name": kind + (f"/{sub}" if sub else "")})
    return groups


def groups_table(groups: list[dict]) -> str:
    rows = [f"{'group':<18} {'params':>12} {'lr':>10} {'wd':>6}"]
    for g in groups:
        n = sum(getattr(p, "ds_numel", None) or p.numel() for p in g["params"])
        rows.append(f"{g['name']:<18} {n:>12,} {g['lr']:>10.2e} {g['weight_decay']:>6.3g}")
    return "\n".join(rows)
