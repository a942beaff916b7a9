"""Qwen2-VL (`qwen2_vl`): 14-pixel patches merged 2x2 (28-pixel tokens), full-attention vision blocks with a
quick-GELU MLP whose width is `embed_dim`, 3-section mRoPE."""
from vlft.models.families.base import HEAD, LLM, VISION, Family, TinyBuild

# Published config.json of Qwen/Qwen2-VL-*-Instruct, written down from memory (no download here); Qwen2-VL-72B
# gives 73.4B parameters on the meta device, the published size.
_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, hidden_act="quick_gelu")


def _text(hidden, inter, layers, heads, kv, vocab):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab)


def mrope_text(hidden: int, layers: int, heads: int, head_dim: int) -> dict:
    """Tiny text fields of the Qwen2/2.5-VL kind: mRoPE sections (T, H, W) summing to head_dim / 2."""
    third = head_dim // 6
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [head_dim // 2 - 2 * third, third, third]}}


def _tiny_vision(hidden: int, width: int, depth: int) -> dict:
    # the tower's width is `embed_dim`; its `hidden_size` is the LLM's, which the merger projects to
    return dict(embed_dim=width, hidden_size=hidden, mlp_ratio=2)


FAMILY = Family(
    "qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor",
    "Qwen2Tokenizer", VISION, (VISION + "merger.",), LLM, HEAD, pixel_factor=28,
    tiny=TinyBuild("qwen2_5_vl", mrope_text, _tiny_vision),  # TRL's Qwen2.5-VL template is Qwen2-VL's
    presets={
        "2B": (_text(1536, 8960, 28, 12, 2, 151936), dict(_VISION, hidden_size=1536), True),
        "7B": (_text(3584, 18944, 28, 28, 4, 152064), dict(_VISION, hidden_size=3584), False),
        "72B": (_text(8192, 29568, 80, 64, 8, 152064), dict(_VISION, hidden_size=8192), False),
    },
    vision_width_key="embed_dim",
)
