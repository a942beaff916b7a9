"""One table: `config.model_type` -> what vlft needs to know about a Qwen-VL family.

The family is always read from the checkpoint's config, never guessed from its path.
Module prefixes are those of transformers 5.x (`model.visual`, `model.language_model`).
Whatever differs between the families lives here (module names, vision-config field names, pixel units,
transformers class names), so that the rest of vlft asks the family instead of trying names in turn.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlft.constants import (
    DEFAULT_IMAGE_MAX_TOKENS,
    DEFAULT_IMAGE_MIN_TOKENS,
    DEFAULT_VIDEO_MAX_TOKENS,
    DEFAULT_VIDEO_MAX_TOTAL_TOKENS,
    DEFAULT_VIDEO_MIN_TOKENS,
)
from vlft.errors import VlftError


@dataclass(frozen=True)
class VisionShape:
    """The vision tower's shape as the FLOPs model (vlft.train.throughput) needs it, read from a vision_config."""

    depth: int  # vision blocks
    width: int  # hidden size of the blocks (attention and residual width)
    patch_size: int  # pixels per side of one patch
    merge_size: int  # patches per side merged into one LLM token
    window_blocks: int = 0  # blocks that attend within windows only (Qwen2.5-VL); 0: every block attends fully
    window_patches: int = 0  # patches in one attention window (0 without windows)


@dataclass(frozen=True)
class Family:
    model_type: str
    model_class: str  # *ForConditionalGeneration class name in transformers (the tiny builder instantiates it)
    processor_class: str  # processor class name in transformers (the tiny builder instantiates it)
    video_processor_class: str
    vision_prefix: str  # whole vision tower, merger included
    merger_prefixes: tuple[str, ...]  # parts of the tower that project into the LLM (deepstack mergers included)
    llm_prefix: str
    head_prefix: str
    # patch_size x merge_size of the released checkpoints, in pixels: the side of the square one LLM token covers
    # (28 for Qwen2/2.5-VL, 32 for Qwen3-VL). Pixel budgets are token counts times pixel_factor**2.
    pixel_factor: int
    # vision_config field holding the width of the vision blocks: Qwen2-VL's `hidden_size` is the LLM's width
    vision_width_key: str = "hidden_size"
    vision_depth_key: str = "depth"
    vision_window_key: str | None = None  # field with the attention window's side in pixels (Qwen2.5-VL)
    vision_full_attention_key: str | None = None  # field listing the blocks that attend fully despite windows
    vision_blocks_prefix: str = "model.visual.blocks."
    patch_embed_prefix: str = "model.visual.patch_embed."  # Conv3d `proj` inside: [width, channels, t, p, p]
    llm_layers_prefix: str = "model.language_model.layers."
    embed_prefix: str = "model.language_model.embed_tokens."

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

    def patch_embed(self, model):
        """The vision patch embedding module of `model` (bare or wrapped by PEFT), or None when it has none.
        Its `proj.weight` is a Conv3d weight [width, channels, temporal_patch, patch, patch]."""
        path = self.patch_embed_prefix.rstrip(".")
        for candidate in (path, "base_model.model." + path):
            try:
                return model.get_submodule(candidate)
            except AttributeError:
                continue
        return None

    def vision_shape(self, vision_config) -> VisionShape:
        """Depth, width, patch and merge size and attention windows of a checkpoint's vision tower, read through
        this family's field names."""
        depth = getattr(vision_config, self.vision_depth_key)
        window = getattr(vision_config, self.vision_window_key, 0) if self.vision_window_key else 0
        full = getattr(vision_config, self.vision_full_attention_key, None) if self.vision_full_attention_key else None
        windowed = depth - len(full) if window and full is not None else 0
        return VisionShape(
            depth=depth, width=getattr(vision_config, self.vision_width_key), patch_size=vision_config.patch_size,
            merge_size=vision_config.spatial_merge_size, window_blocks=windowed,
            window_patches=(window // vision_config.patch_size) ** 2 if windowed else 0,
        )

    def default_pixel_budgets(self) -> dict[str, int]:
        """The default pixel budgets (pixels; per image, per video frame, and all frames of one video) in this
        family's units, keyed by their DataArguments field names: the same token counts for every family."""
        tokens = {
            "image_min_pixels": DEFAULT_IMAGE_MIN_TOKENS, "image_max_pixels": DEFAULT_IMAGE_MAX_TOKENS,
            "video_min_pixels": DEFAULT_VIDEO_MIN_TOKENS, "video_max_pixels": DEFAULT_VIDEO_MAX_TOKENS,
            "video_max_total_pixels": DEFAULT_VIDEO_MAX_TOTAL_TOKENS,
        }
        return {name: count * self.pixel_factor**2 for name, count in tokens.items()}


_VISION = "model.visual."
_LLM = "model.language_model."
_QWEN3_MERGERS = ("model.visual.merger.", "model.visual.deepstack_merger_list.")

FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(
        "qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor",
        _VISION, ("model.visual.merger.",), _LLM, "lm_head", pixel_factor=28, vision_width_key="embed_dim",
    ),
    "qwen2_5_vl": Family(
        "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor",
        _VISION, ("model.visual.merger.",), _LLM, "lm_head", pixel_factor=28,
        vision_window_key="window_size", vision_full_attention_key="fullatt_block_indexes",
    ),
    "qwen3_vl": Family(
        "qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
        _VISION, _QWEN3_MERGERS, _LLM, "lm_head", pixel_factor=32,
    ),
}
if hasattr(__import__("transformers"), "Qwen3VLMoeForConditionalGeneration"):
    # Same layout as Qwen3-VL; its experts are fused parameters, so LLM LoRA lands on attention (and any
    # nn.Linear the MoE block keeps, such as the router).
    FAMILIES["qwen3_vl_moe"] = Family(
        "qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor",
        _VISION, _QWEN3_MERGERS, _LLM, "lm_head", pixel_factor=32,
    )


def get_family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise VlftError(
            f"model_type {model_type!r} is not supported; vlft supports: {', '.join(sorted(FAMILIES))}. "
            "Give a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint."
        ) from None
