"""The family table agrees with transformers and with real module names of each tiny family."""
from __future__ import annotations

import pytest
import transformers

from vlft.errors import VlftError
from vlft.models.freezing import apply_freeze, count_parameters, parameter_table
from vlft.models.registry import FAMILIES, get_family
from vlft.models.tiny import FAMILIES as TINY_FAMILIES
from vlft.models.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request):
    family = request.param
    return get_family(family), build_model(family, build_tokenizer(family))


def test_table_points_at_real_classes():
    assert set(TINY_FAMILIES) <= set(FAMILIES)
    for fam in FAMILIES.values():
        assert hasattr(transformers, fam.model_class), fam.model_class
        assert hasattr(transformers, fam.processor_class), fam.processor_class


def test_unknown_model_type_lists_supported():
    with pytest.raises(VlftError) as err:
        get_family("llava")
    for name in FAMILIES:
        assert name in str(err.value)


def test_every_parameter_belongs_to_a_known_part(tiny):
    family, model = tiny
    assert model.config.model_type == family.model_type
    parts = {name: family.part_of(name) for name, _ in model.named_parameters()}
    assert "other" not in parts.values(), [n for n, p in parts.items() if p == "other"]
    assert {"vision", "merger", "llm", "head"} == set(parts.values())
    assert parts["lm_head.weight"] == "head"
    assert parts["model.language_model.embed_tokens.weight"] == "head"  # counted with the head: embeddings
    assert all(p == "vision" for n, p in parts.items() if "patch_embed" in n)


@pytest.mark.parametrize("flags,trainable_parts", [
    (dict(freeze_vision_tower=True, freeze_merger=False, freeze_llm=False), {"merger", "llm", "head"}),
    (dict(freeze_vision_tower=True, freeze_merger=True, freeze_llm=False), {"llm", "head"}),
    (dict(freeze_vision_tower=False, freeze_merger=False, freeze_llm=True), {"vision", "merger"}),
    (dict(freeze_vision_tower=True, freeze_merger=False, freeze_llm=True), {"merger"}),
])
def test_freeze_flags_select_parts(tiny, flags, trainable_parts):
    family, model = tiny
    apply_freeze(model, family, **flags)
    counts = count_parameters(model, family)
    assert {part for part, (t, _) in counts.items() if t} == trainable_parts
    assert {part for part, (_, f) in counts.items() if f} == set(counts) - trainable_parts
    table = parameter_table(model, family)
    assert "trainable" in table and "total" in table
