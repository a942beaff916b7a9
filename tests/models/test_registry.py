"""The family table agrees with transformers and with real module names of each tiny family."""
from __future__ import annotations

import pytest
import transformers

from vlft.errors import VlftError
from vlft.models.freezing import apply_freeze, count_parameters, parameter_table
from vlft.models.registry import FAMILIES, get_family
from vlft.models.tiny import FAMILIES as TINY_FAMILIES
from vlft.models.tiny import build_model, build_processor, build_tokenizer


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request):
    family = request.param
    return get_family(family), build_model(family, build_tokenizer(family))


def test_table_points_at_real_classes():
    assert set(TINY_FAMILIES) <= set(FAMILIES)
    for fam in FAMILIES.values():
        assert hasattr(transformers, fam.model_class), fam.model_class
        assert hasattr(transformers, fam.processor_class), fam.processor_class
        assert hasattr(transformers, fam.video_processor_class), fam.video_processor_class
        assert getattr(transformers, fam.model_class).config_class.model_type == fam.model_type


def test_vision_config_fields_exist_in_the_released_configs():
    """The field names the family reads are there in transformers' default configs (those of the released
    checkpoints), with the values vision_shape turns into the FLOPs model's shape."""
    for fam in FAMILIES.values():
        vision = getattr(transformers, fam.model_class).config_class().vision_config
        shape = fam.vision_shape(vision)
        assert shape.patch_size * shape.merge_size == fam.pixel_factor
        assert shape.depth == vision.depth and shape.width in (getattr(vision, "embed_dim", None), vision.hidden_size)
        if fam.model_type == "qwen2_vl":
            assert shape.width == vision.embed_dim != vision.hidden_size  # hidden_size is the LLM's there
        if fam.model_type == "qwen2_5_vl":
            assert (shape.window_blocks, shape.window_patches) == (32 - 4, 8 * 8)  # 112-pixel windows of 14-pixel patches
        else:
            assert (shape.window_blocks, shape.window_patches) == (0, 0)


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
    embed = family.patch_embed(model)
    assert embed is model.model.visual.patch_embed
    assert embed.proj.weight.shape[0] == family.vision_shape(model.config.vision_config).width
    assert family.patch_embed_prefix + "proj.weight" in dict(model.named_parameters())


def test_patch_embed_is_found_under_peft(tiny):
    from peft import LoraConfig, get_peft_model

    family, _ = tiny
    model = build_model(family.model_type, build_tokenizer(family.model_type))  # the fixture's stays unwrapped
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert family.patch_embed(wrapped) is model.model.visual.patch_embed


def test_tiny_processor_is_the_family_class(tiny):
    family, _ = tiny
    processor = build_processor(family.model_type, build_tokenizer(family.model_type))
    assert type(processor).__name__ == family.processor_class
    assert type(processor.video_processor).__name__ == family.video_processor_class


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
