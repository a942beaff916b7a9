"""Qwen3-VL-MoE (`qwen3_vl_moe`, Qwen3-VL-30B-A3B / 235B-A22B): Qwen3-VL's vision tower and layout, with every
decoder MLP a mixture of routed experts (fused 3-D parameters, a TopKRouter, no shared expert)."""
from vlft.models.families.base import HEAD, LLM, VISION, Family, MoELayout, TinyBuild
from vlft.models.families.qwen3_vl import MERGERS, VISION_LARGE, interleaved_mrope_text, tiny_vision


def _text(hidden, layers, heads, kv, experts, active, expert_inter):
    # Qwen3-30B-A3B / Qwen3-235B-A22B's decoders, which the VL releases keep (from memory of the published configs;
    # the meta-device counts give 31.1B / 236B parameters with the vision tower)
    return dict(hidden_size=hidden, intermediate_size=6144, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=128, vocab_size=151936, num_experts=experts,
                num_experts_per_tok=active, moe_intermediate_size=expert_inter, decoder_sparse_step=1)


def tiny_moe_text(hidden: int, layers: int, heads: int, head_dim: int) -> dict:
    return dict(interleaved_mrope_text(hidden, layers, heads, head_dim), num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, decoder_sparse_step=1)


FAMILY = Family(
    "qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
    "Qwen2Tokenizer", VISION, MERGERS, LLM, HEAD, pixel_factor=32,
    tiny=TinyBuild("qwen3_vl", tiny_moe_text, tiny_vision),
    presets={
        "30B-A3B": (_text(2048, 48, 32, 4, 128, 8, 768), dict(VISION_LARGE, out_hidden_size=2048), False),
        "235B-A22B": (_text(4096, 94, 64, 4, 128, 8, 1536), dict(VISION_LARGE, out_hidden_size=4096), False),
    },
    moe=MoELayout(),
)
