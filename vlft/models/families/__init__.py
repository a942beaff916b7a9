"""One descriptor per model family (`config.model_type`): the table FAMILIES and its lookup.

Each module of this package describes one family (classes, module prefixes, pixel factor, text shape, MoE layout,
tokenizer, extra checkpoint keys, the tiny build, `vlft plan`'s released sizes, capabilities) as one `Family`.
Adding a family is one module here plus its tests: the test matrices that are parametrised by family read
TINY_FAMILIES.

The table is plain data: importing it imports neither transformers nor torch, so `vlft plan --help` and
`vlft tiny-model --help` answer at once. Whether this transformers has a family's classes (an old transformers on
a GPU image may lack Qwen3.5's) is asked when the family is used (`get_family`), from transformers' table of the
names it exports, without importing any model code.
"""
from __future__ import annotations

from functools import lru_cache

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
FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in _MODULES}

__all__ = ["FAMILIES", "FULL_ATTENTION", "LINEAR_ATTENTION", "Family", "MoELayout", "TextShape", "TinyBuild",
           "VisionShape", "family_available", "get_family", "read_text_shape"]


@lru_cache(maxsize=1)
def _transformers_names() -> frozenset[str]:
    """The names the installed transformers exports. Its top-level package is lazy (`_LazyModule`): `dir()` lists
    every exported name from its import table, where `hasattr` would import the class's module (and torch, seconds)."""
    import transformers

    return frozenset(dir(transformers))


def family_available(family: Family) -> bool:
    """Whether the installed transformers exports `family.model_class` (its model code is not imported)."""
    return family.model_class in _transformers_names()


def get_family(model_type: str) -> Family:
    """The descriptor of `model_type`. VlftError naming the supported families for any other model_type, and naming
    the missing class and what to install for a family this transformers lacks."""
    family = FAMILIES.get(model_type)
    if family is None:
        names = ", ".join(f"{f.display_name} ({f.model_type})" for f in FAMILIES.values())
        raise VlftError(f"model_type {model_type!r} is not supported; vlft supports: {names}. Give a checkpoint of one "
                        "of these families.")
    if not family_available(family):
        import transformers

        raise VlftError(f"{family.display_name} ({model_type}) needs transformers' {family.model_class}, which the "
                        f"installed transformers {transformers.__version__} does not have; upgrade it "
                        "(pip install -U transformers) or use a checkpoint of another family.")
    return family
