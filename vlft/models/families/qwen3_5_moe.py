"""Qwen3.5-MoE (`qwen3_5_moe`, Qwen3.5-35B-A3B ... 397B-A17B): Qwen3.5's hybrid decoder and vision tower, every MLP
a mixture of routed experts (fused 3-D parameters, a TopKRouter) plus a shared expert with its own sigmoid gate."""
from vlft.models.families.base import HEAD, LLM, VISION, Family, MoELayout, TinyBuild
from vlft.models.families.qwen3_5 import THINK_TOKENS, VISION_27, text, tiny_hybrid_text, tiny_vision


def _moe(hidden, layers, heads, kv, linear_v_heads, experts, active, expert_inter):
    return text(hidden, None, layers, heads, kv, linear_v_heads, num_experts=experts, num_experts_per_tok=active,
                moe_intermediate_size=expert_inter, shared_expert_intermediate_size=expert_inter)


def tiny_moe_text(hidden: int, layers: int, heads: int, head_dim: int) -> dict:
    return dict(tiny_hybrid_text(hidden, layers, heads, head_dim), num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=32)


FAMILY = Family(
    "qwen3_5_moe", "Qwen3.5-MoE", "Qwen3_5MoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
    "Qwen3_5Tokenizer", VISION, (VISION + "merger.",), LLM, HEAD, pixel_factor=32,
    tiny=TinyBuild("qwen3_5_think", tiny_moe_text, tiny_vision, extra_tokens=THINK_TOKENS),
    # Qwen/Qwen3.5-35B-A3B is transformers' default Qwen3_5MoeConfig; 397B-A17B written down from memory
    presets={
        "35B-A3B": (_moe(2048, 40, 16, 2, 32, 256, 8, 512), dict(VISION_27, out_hidden_size=2048), False),
        "397B-A17B": (_moe(4096, 60, 32, 2, 64, 512, 10, 1024), dict(VISION_27, out_hidden_size=4096), False),
    },
    moe=MoELayout(shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate"),
    extra_checkpoint_prefixes=("mtp.",),
    # --packing: as Qwen3.5's (models/patches/linear_attention.py)
)
