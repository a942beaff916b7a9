"""One table: `config.model_type` -> what vlft needs to know about a Qwen-VL family.

The family is always read from the checkpoint's config, never guessed from its path.
Module prefixes are those of transformers 5.x (`model.visual`, `model.language_model`).
"""
from __future__ import annotations

from dataclasses import dataclass

from vlft.errors import VlftError


@dataclass(frozen=True)
class Family:
    model_type: str
    model_class: str  # class name in transformers
    processor_class: str
    vision_prefix: str  # whole vision tower, merger included
    merger_prefixes: tuple[str, ...]  # parts of the tower that project into the LLM
    llm_prefix: str
    head_prefix: str
    pixel_factor: int  # patch_size * merge_size of the released checkpoints
    vision_blocks_prefix: str = "model.visual.blocks."
    llm_layers_prefix: str = "model.language_model.layers."
    embed_prefix: str = "model.language_model.embed_tokens."
    liger: str = "generic"  # how --use_liger patches it: vlft.models.patches.apply_liger (same for every family)

    def part_of(self, name: str) -> str:
        """'merger', 'vision', 'llm', 'head' (lm_head and the token embeddings) or 'other' for a parameter or
        module name of the bare model (PEFT's `base_model.model.` prefix and LoRA infixes are tolerated)."""
        name = name.removeprefix("base_model.model.")
        if name.startswith(self.merger_prefixes):
            return "merger"
        if name.startswith(self.vision_prefix):
            return "vision"
        if name.startswith(self.embed_prefix):
            return "head"
        if name.startswith(self.llm_prefix):
            return "llm"
        if name.startswith(self.head_prefix):
            return "head"
        return "other"

    def layer_index(self, name: str) -> tuple[str, int] | None:
        """('llm', i) for names inside decoder layer i, ('vision', i) inside vision block i, else None."""
        name = name.removeprefix("base_model.model.")
        for part, prefix in (("llm", self.llm_layers_prefix), ("vision", self.vision_blocks_prefix)):
            if name.startswith(prefix):
                index = name[len(prefix):].split(".", 1)[0]
                if index.isdigit():
                    return part, int(index)
        return None


_VISION = "model.visual."
_LLM = "model.language_model."

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        "qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor",
        _VISION, ("model.visual.merger.",), _LLM, "lm_head", pixel_factor=28,
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
        _VISION, ("model.visual.merger.",), _LLM, "lm_head", pixel_factor=28,
    ),
    "qwen3_vl": Family(
        "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor",
        _VISION, ("model.visual.merger.", "model.visual.deepstack_merger_list."), _LLM, "lm_head", pixel_factor=32,
    ),
}
if hasattr(__import__("transformers"), "Qwen3VLMoeForConditionalGeneration"):
    # Same layout as Qwen3-VL; its experts are fused parameters, so LLM LoRA lands on attention (and any
    # nn.Linear the MoE block keeps, such as the router).
    FAMILIES["qwen3_vl_moe"] = Family(
        "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor",
        _VISION, ("model.visual.merger.", "model.visual.deepstack_merger_list."), _LLM, "lm_head", pixel_factor=32,
    )


def get_family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise VlftError(
            f"model_type {model_type!r} is not supported; vlft supports: {', '.join(sorted(FAMILIES))}. "
            "Pass a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint to --model_id."
        ) from None
