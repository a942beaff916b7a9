"""One descriptor per model family (`config.model_type`): the table FAMILIES and its lookup.

Each module of this package describes one family (classes, module prefixes, pixel factor, text shape, MoE layout,
tokenizer, extra checkpoint keys, the tiny build, `vlft plan`'s released sizes, capabilities) as one `Family`.
Adding a family is one module here plus its tests: the test matrices that are parametrised by family read
TINY_FAMILIES. A family whose classes this transformers lacks is left out of the table (an old transformers on a
GPU image), so loading one of its checkpoints names the families that are there.
"""
from __future__ import annotations

import transformers

from vlft.errors import VlftError
from vlft.models.families import qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe
from vlft.models.families.base import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    Family,
    MoELayout,
    TextShape,
    TinyBuild,
    VisionShape,
    read_text_shape,
)

_MODULES = (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe)
FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in _MODULES
                               if hasattr(transformers, m.FAMILY.model_class)}

__all__ = ["FAMILIES", "FULL_ATTENTION", "LINEAR_ATTENTION", "Family", "MoELayout", "TextShape", "TinyBuild",
           "VisionShape", "get_family", "read_text_shape"]


def get_family(model_type: str) -> Family:
    """The descriptor of `model_type`; VlftError naming the supported ones for any other."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        names = ", ".join(f"{f.display_name} ({f.model_type})" for f in FAMILIES.values())
        raise VlftError(f"model_type {model_type!r} is not supported; vlft supports: {names}. Give a checkpoint of one "
                        "of these families.") from None
