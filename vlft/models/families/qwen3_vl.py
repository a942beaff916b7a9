"""Qwen3-VL (`qwen3_vl`): 16-pixel patches merged 2x2 (32-pixel tokens), learned vision position embeddings,
deepstack mergers feeding early decoder layers, interleaved mRoPE, video timestamps written into the text."""
from vlft.models.families.base import HEAD, LLM, VISION, Family, TinyBuild

# Published config.json of Qwen/Qwen3-VL-*-Instruct, written down from memory; Qwen3-VL-8B gives 8.77B parameters
# on the meta device, the published size, and the 4B vision config matched a copy found in public code.
VISION_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh")
VISION_LARGE = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
MERGERS = (VISION + "merger.", VISION + "deepstack_merger_list.")


def _text(hidden, inter, layers, heads, kv, vocab, head_dim):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=vocab, head_dim=head_dim)


def interleaved_mrope_text(hidden: int, layers: int, heads: int, head_dim: int) -> dict:
    """Tiny text fields of the Qwen3 kind: explicit head_dim, interleaved mRoPE sections summing to head_dim / 2."""
    third = head_dim // 6
    return {"head_dim": head_dim, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
        "mrope_section": [head_dim // 2 - 2 * third, third, third]}}


def tiny_vision(hidden: int, width: int, depth: int) -> dict:
    # learned position embeddings (an 8x8 grid, interpolated) and one deepstack merger, after block 0
    return dict(hidden_size=width, intermediate_size=2 * width, out_hidden_size=hidden, num_position_embeddings=64,
                deepstack_visual_indexes=[0])


FAMILY = Family(
    "qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
    "Qwen2Tokenizer", VISION, MERGERS, LLM, HEAD, pixel_factor=32,
    tiny=TinyBuild("qwen3_vl", interleaved_mrope_text, tiny_vision),
    presets={
        "2B": (_text(2048, 6144, 28, 16, 8, 151936, 128), dict(VISION_SMALL, out_hidden_size=2048), True),
        "4B": (_text(2560, 9728, 36, 32, 8, 151936, 128), dict(VISION_SMALL, out_hidden_size=2560), True),
        "8B": (_text(4096, 12288, 36, 32, 8, 151936, 128), dict(VISION_LARGE, out_hidden_size=4096), False),
        "32B": (_text(5120, 25600, 64, 64, 8, 151936, 128), dict(VISION_LARGE, out_hidden_size=5120), False),
    },
)
