"""Qwen2.5-VL (`qwen2_5_vl`): Qwen2-VL's token size and mRoPE, a vision tower with windowed attention in all but
a few full-attention blocks and a SwiGLU MLP, video timing from `second_per_grid_ts`."""
from vlft.models.families.base import HEAD, LLM, VISION, Family, TinyBuild
from vlft.models.families.qwen2_vl import mrope_text

# Published config.json of Qwen/Qwen2.5-VL-*-Instruct, written down from memory; Qwen2.5-VL-7B gives 8.29B
# parameters on the meta device, the published size.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")


def _text(hidden, inter, layers, heads, kv, vocab):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab)


def _tiny_vision(hidden: int, width: int, depth: int) -> dict:
    # windowed attention (windows of 2x2 merged tokens) in every block but the last
    return dict(hidden_size=width, intermediate_size=2 * width, out_hidden_size=hidden, window_size=16 * 2,
                fullatt_block_indexes=[depth - 1], tokens_per_second=2)


FAMILY = Family(
    "qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor",
    "Qwen2Tokenizer", VISION, (VISION + "merger.",), LLM, HEAD, pixel_factor=28,
    tiny=TinyBuild("qwen2_5_vl", mrope_text, _tiny_vision),
    presets={
        "3B": (_text(2048, 11008, 36, 16, 2, 151936), dict(_VISION, out_hidden_size=2048), True),
        "7B": (_text(3584, 18944, 28, 28, 4, 152064), dict(_VISION, out_hidden_size=3584), False),
        "32B": (_text(5120, 27648, 64, 40, 8, 152064), dict(_VISION, out_hidden_size=5120), False),
        "72B": (_text(8192, 29568, 80, 64, 8, 152064), dict(_VISION, out_hidden_size=8192), False),
    },
    vision_window_key="window_size", vision_full_attention_key="fullatt_block_indexes", vision_mlp_values=4,
)
