"""Qwen3.5 (`qwen3_5`, and the releases on its architecture): a hybrid decoder, three Gated DeltaNet
(linear-attention) layers to one gated full-attention layer, zero-centred RMSNorms `(1 + w)`, interleaved mRoPE on a
`partial_rotary_factor` of each head, a multi-token-prediction head (`mtp.*`) in the checkpoint that transformers
does not load; Qwen3-VL's vision tower without deepstack mergers, 32-pixel tokens."""
from vlft.models.families.base import HEAD, LLM, VISION, Family, TinyBuild

VISION_27 = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, spatial_merge_size=2,
                 temporal_patch_size=2, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
HYBRID_ROPE = {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
               "mrope_section": [11, 11, 10], "mrope_interleaved": True}


def hybrid_layers(layers: int, full_every: int = 4) -> list[str]:
    """transformers' layer_types for `layers` decoder layers: every `full_every`-th full attention, the rest linear."""
    return ["full_attention" if (i + 1) % full_every == 0 else "linear_attention" for i in range(layers)]


def text(hidden, inter, layers, heads, kv, linear_v_heads, **extra):
    # head_dim 256 and 16 linear key heads of 128 in every released size
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=256, vocab_size=248320, layer_types=hybrid_layers(layers),
                linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                linear_num_value_heads=linear_v_heads, rope_parameters=dict(HYBRID_ROPE), **extra)


def tiny_hybrid_text(hidden: int, layers: int, heads: int, head_dim: int) -> dict:
    """One linear-attention layer to one full-attention layer; rotary on half of each head, whose interleaved mRoPE
    sections (T, H, W) sum to rotary_dim / 2."""
    rotary = head_dim // 2
    third = rotary // 6 or 1
    return dict(head_dim=head_dim, layer_types=hybrid_layers(layers, full_every=2), linear_conv_kernel_dim=4,
                linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [rotary // 2 - 2 * third, third, third], "mrope_interleaved": True})


def tiny_vision(hidden: int, width: int, depth: int) -> dict:
    return dict(hidden_size=width, intermediate_size=2 * width, out_hidden_size=hidden, num_position_embeddings=64)


THINK_TOKENS = ("<think>", "</think>")  # added, non-special tokens of the real Qwen3 / Qwen3.5 tokenizers

FAMILY = Family(
    "qwen3_5", "Qwen3.5", "Qwen3_5ForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
    "Qwen3_5Tokenizer", VISION, (VISION + "merger.",), LLM, HEAD, pixel_factor=32,
    tiny=TinyBuild("qwen3_5_think", tiny_hybrid_text, tiny_vision, extra_tokens=THINK_TOKENS),
    # Qwen/Qwen3.5-9B is transformers' default Qwen3_5Config; 27B written down from memory of its config.json
    presets={
        "9B": (text(4096, 12288, 32, 16, 4, 32), dict(VISION_27, out_hidden_size=4096), False),
        "27B": (text(5120, 17408, 64, 24, 4, 48), dict(VISION_27, out_hidden_size=5120), False),
    },
    extra_checkpoint_prefixes=("mtp.",),
    # --packing: the Gated DeltaNet layers keep packed records apart through models/patches/linear_attention.py
)
