"""The family table agrees with transformers and with real module names of each tiny family, and the pixel
budgets default to the same token counts in every family's units."""
from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from vlft.config import DataArguments, parse_args, resolved_args, validate
from vlft.errors import VlftError
from vlft.models.freezing import apply_freeze, count_parameters, parameter_table
from vlft.models.registry import FAMILIES, Family, get_family
from vlft.models.tiny import FAMILIES as TINY_FAMILIES
from vlft.models.tiny import build_model, build_processor, build_tokenizer
from vlft.train.sft.config import GROUPS as SFT_GROUPS


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


def test_every_field_is_used():
    """A field nothing reads is dead knowledge that drifts: each one appears somewhere in vlft outside the table."""
    from pathlib import Path

    import vlft

    root = Path(vlft.__file__).parent
    sources = "".join(p.read_text() for p in root.rglob("*.py") if "families" not in p.parts)
    registry = "".join(p.read_text() for p in (root / "models" / "families").glob("*.py"))
    for field in dataclasses.fields(Family):
        used = f".{field.name}" in sources or f"self.{field.name}" in registry
        assert used, f"Family.{field.name} is read nowhere"


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


# --- default pixel budgets ---


def test_qwen3_defaults_are_in_its_own_units():
    """Qwen3-VL's token is 32x32 pixels: its defaults are multiples of 32*32 and give the token counts that
    Qwen2-VL's (the 2U1 numbers, in 28x28 units) give."""
    qwen2 = DataArguments().media_settings(get_family("qwen2_vl"))
    qwen3 = DataArguments().media_settings(get_family("qwen3_vl"))
    names = ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels", "video_max_total_pixels")
    assert [getattr(qwen2, n) for n in names] == [3136, 12845056, 128 * 28 * 28, 768 * 28 * 28, 4096 * 28 * 28 * 2]
    for name in names:
        assert getattr(qwen3, name) % (32 * 32) == 0, name
        assert getattr(qwen3, name) // (32 * 32) == getattr(qwen2, name) // (28 * 28), name
    assert DataArguments().media_settings(get_family("qwen2_5_vl")) == qwen2


def test_given_budgets_win_and_the_record_holds_numbers():
    model, data, tune, train = parse_args(SFT_GROUPS, ["--model_id", "m", "--data_path", "d.json", "--output_dir", "o",
                                                       "--image_max_pixels", "1003520", "--video_min_pixels", "2048"])
    assert data.image_min_pixels is None and data.image_max_pixels == 1003520  # None: the family's, once known
    media = data.media_settings(get_family("qwen3_vl"))
    assert (media.image_min_pixels, media.image_max_pixels, media.video_min_pixels) == (4 * 1024, 1003520, 2048)
    record = json.loads(json.dumps(resolved_args(model, data, tune, train)))
    assert (record["image_min_pixels"], record["video_max_pixels"]) == (4 * 1024, 768 * 1024)
    # the record passed back as a config gives the same settings, whatever the family
    again = DataArguments(**{f.name: record[f.name] for f in dataclasses.fields(DataArguments)})
    assert again.media_settings(get_family("qwen2_vl")) == media
    # legacy 2U1 spelling (translated right after parsing: vlft/compat_2u1.py)
    legacy = parse_args((DataArguments,), ["--min_pixels", "200704"])[0].media_settings(get_family("qwen3_vl"))
    assert (legacy.image_min_pixels, legacy.image_max_pixels) == (200704, 16384 * 1024)


def test_a_budget_below_the_family_default_is_named():
    with pytest.raises(VlftError, match=r"--image_min_pixels \(4096, the default\) must be <= --image_max_pixels \(2000\)"):
        DataArguments(image_max_pixels=2000).media_settings(get_family("qwen3_vl"))
    # given budgets are checked before anything loads, by the one validation every command runs
    with pytest.raises(VlftError, match="--video_min_pixels"):
        validate(DataArguments(data_path="d.json", video_min_pixels=5000, video_max_pixels=4000))
    with pytest.raises(VlftError, match="--image_max_pixels"):
        validate(DataArguments(data_path="d.json", image_max_pixels=0))


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


# --- the descriptors of the newer families ---


def test_text_shape_reads_layer_kinds_and_experts(tiny):
    """The text shape the FLOPs model and plan count is the one transformers builds: a linear-attention layer has a
    `linear_attn` module, a full-attention one `self_attn`, an MoE layer the descriptor's routed experts and router."""
    family, model = tiny
    shape = family.text_shape(model.config.text_config)
    layers = model.model.language_model.layers
    assert shape.layers == len(layers)
    for i, layer in enumerate(layers):
        assert hasattr(layer, "linear_attn" if shape.layer_kinds[i] == "linear_attention" else "self_attn"), i
        moe = i in shape.moe_layers
        assert (family.moe is not None and moe) == hasattr(layer.mlp, "experts"), i
        if moe:
            params = dict(layer.named_parameters())
            for name in family.moe.experts:  # fused [experts, out, in] parameters
                assert params[name].shape[0] == shape.experts
            assert layer.get_submodule(family.moe.router).weight.shape == (shape.experts, shape.hidden)
            if family.moe.shared_expert:
                layer.get_submodule(family.moe.shared_expert)
    assert shape.is_hybrid == (family.model_type in ("qwen3_5", "qwen3_5_moe"))
    assert shape.is_moe == (family.moe is not None)


def test_tiny_rotary_sections_cover_the_rotary_part(tiny):
    """mRoPE sections (T, H, W) sum to half the rotary dimensions: head_dim x partial_rotary_factor for Qwen3.5."""
    family, model = tiny
    text = model.config.text_config
    rope = text.rope_parameters
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    assert sum(rope["mrope_section"]) == rotary // 2
    assert min(rope["mrope_section"]) > 0


def test_saved_tiny_model_loads_with_the_family_tokenizer(tiny_model_factory):
    """AutoTokenizer builds the family's tokenizer class from a saved tiny model, with the think tokens Qwen3.5 has."""
    from transformers import AutoTokenizer

    for name in ("qwen3_5", "qwen3_vl_moe"):
        family = get_family(name)
        tok = AutoTokenizer.from_pretrained(tiny_model_factory(name))
        assert type(tok).__name__ in (family.tokenizer_class, family.tokenizer_class + "Fast")
        for token in family.tiny.extra_tokens:
            assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token


@pytest.mark.parametrize("name", ["qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_released_sizes_count_what_their_names_say(name):
    """Each row these families add to `vlft plan`'s table (written down from memory of the published configs), built
    on the meta device, has the total parameter count its name states, within 5% (the older families' rows were
    cross-checked when written: their small sizes' names round more loosely, Qwen2.5-VL-3B has 3.75B)."""
    import re

    from vlft.plan import model_shape, preset_config

    for size in get_family(name).presets:
        stated = float(re.match(r"([\d.]+)B", size).group(1))
        total = sum(model_shape(preset_config(name, size)).params.values()) / 1e9
        assert abs(total - stated) / stated < 0.05, (size, total)


def test_a_family_refusal_names_the_flag_the_family_and_the_reason():
    from types import MappingProxyType

    from vlft.config import DataArguments, TuneArguments

    family = dataclasses.replace(get_family("qwen2_vl"), unsupported=MappingProxyType({
        "packing": "its layers cannot see record boundaries", "liger": "no kernel for its norm"}))
    data = DataArguments(data_path="d.json", packing=True)
    validate(data)  # without the family, nothing to refuse
    with pytest.raises(VlftError) as err:
        validate(data, TuneArguments(use_liger=True), family=family)
    text = str(err.value)
    assert "--packing is not available for Qwen2-VL (qwen2_vl): its layers cannot see record boundaries" in text
    assert "--use_liger is not available for Qwen2-VL (qwen2_vl): no kernel for its norm" in text
    validate(DataArguments(data_path="d.json"), TuneArguments(), family=family)  # not asked for: no refusal
    for fam in FAMILIES.values():  # every refusal a family declares is a reason, for a feature validate knows
        from vlft.config import _FAMILY_FEATURES
        from vlft.stages import STAGES

        assert set(fam.unsupported) <= {f[0] for f in _FAMILY_FEATURES} | set(STAGES), fam.model_type
        assert all(len(reason) > 20 for reason in fam.unsupported.values())


def test_a_family_can_refuse_a_stage_and_validate_reports_it_with_every_other_problem(tmp_path):
    """validate() gathers the flag rules, the stage config's problems() and the family's refusal of the stage
    (Family.unsupported keyed by the stage's name) into one error."""
    from types import MappingProxyType

    from vlft.train.dpo.config import GROUPS as DPO_GROUPS

    family = dataclasses.replace(get_family("qwen2_vl"), unsupported=MappingProxyType({
        "dpo": "its preference data path is not proven yet"}))
    groups = parse_args(DPO_GROUPS, ["--model_id", "m", "--data_path", "d.json", "--output_dir", str(tmp_path),
                                     "--beta", "-1", "--lora_rank", "0", "--lora_enable", "true"])
    with pytest.raises(VlftError) as err:
        validate(*groups, family=family)
    text = str(err.value)
    assert "vlft dpo is not available for Qwen2-VL (qwen2_vl): its preference data path is not proven yet" in text
    assert "--lora_rank must be >= 1" in text and "--beta must be > 0" in text  # the other groups' problems, in the same error
    validate(*parse_args(DPO_GROUPS, ["--model_id", "m", "--data_path", "d.json", "--output_dir", str(tmp_path)]),
             family=get_family("qwen2_vl"))  # the family as it is: nothing refused
