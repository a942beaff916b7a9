"""Checkpoint key names after a ZeRO-3 load (`fix_zero3_weight_conversions`).

Why: `from_pretrained` remembers the key renamings it applied, and `save_pretrained` reverses them so a
saved checkpoint keeps the original key names. The regular load path (transformers 5.2x) keeps only the
renamings that matched a key; the ZeRO-3 path keeps every registered one, and reversing the unused
prefix changes writes `model.model.layers.*` instead of `model.layers.*`: a checkpoint that other tools
(and a later merge) do not read as the same model. Keep only the renamings that were used.
"""
from __future__ import annotations


def fix_zero3_weight_conversions(model) -> bool:
    """Drop the key renamings a ZeRO-3 load recorded without using them (see the module docstring)."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions or not all(hasattr(c, "was_used") for c in conversions):
        return False
    used = [c for c in conversions if c.was_used()]
    if len(used) == len(conversions):
        return False
    model._weight_conversions = used
    return True
