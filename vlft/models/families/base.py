"""The shape of a family descriptor: what vlft needs to know about one `config.model_type`.

Every module of `vlft/models/families/` builds one `Family`; the rest of vlft asks the family (its module
prefixes, its text shape, its capabilities) and never matches on a model's name or path.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from vlft.constants import (
    DEFAULT_IMAGE_MAX_TOKENS,
    DEFAULT_IMAGE_MIN_TOKENS,
    DEFAULT_VIDEO_MAX_TOKENS,
    DEFAULT_VIDEO_MAX_TOTAL_TOKENS,
    DEFAULT_VIDEO_MIN_TOKENS,
)

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"  # Gated DeltaNet (Qwen3.5): a recurrent state and a short causal convolution


@dataclass(frozen=True)
class VisionShape:
    """The vision tower's shape as the FLOPs model (vlft.train.core.throughput) needs it, read from a vision_config."""

    depth: int  # vision blocks
    width: int  # hidden size of the blocks (attention and residual width)
    patch_size: int  # pixels per side of one patch
    merge_size: int  # patches per side merged into one LLM token
    window_blocks: int = 0  # blocks that attend within windows only (Qwen2.5-VL); 0: every block attends fully
    window_patches: int = 0  # patches in one attention window (0 without windows)


@dataclass(frozen=True)
class TextShape:
    """The language model's shape, read from a text_config: what the FLOPs model, MFU and `vlft plan` count.

    layer_kinds: one entry per decoder layer, FULL_ATTENTION or LINEAR_ATTENTION (transformers' `layer_types`).
    moe_layers: indices of the decoder layers whose MLP is a mixture of experts (empty for dense models).
    Widths are per token, in features; `experts_per_token` of `experts` routed experts run for each token."""

    hidden: int
    vocab: int
    layer_kinds: tuple[str, ...]
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int = 0  # dense MLP width (0 when every layer is MoE)
    moe_layers: tuple[int, ...] = ()
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0

    @property
    def layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def full_attention_layers(self) -> int:
        return sum(kind == FULL_ATTENTION for kind in self.layer_kinds)

    @property
    def linear_attention_layers(self) -> int:
        return sum(kind == LINEAR_ATTENTION for kind in self.layer_kinds)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers) and self.experts > 0

    @property
    def is_hybrid(self) -> bool:
        return self.linear_attention_layers > 0

    @property
    def linear_key_width(self) -> int:
        """Features of a linear-attention layer's queries (and of its keys): key heads x key head dim."""
        return self.linear_key_heads * self.linear_key_head_dim

    @property
    def linear_value_width(self) -> int:
        """Features of a linear-attention layer's values (and of its output gate z): value heads x value head dim."""
        return self.linear_value_heads * self.linear_value_head_dim


def read_text_shape(text) -> TextShape:
    """A TextShape from a transformers text_config (Qwen2-VL ... Qwen3.5-MoE field names). Raises AttributeError for
    a config without the dense fields every Qwen decoder has."""
    layers = text.num_hidden_layers
    kinds = tuple(getattr(text, "layer_types", None) or (FULL_ATTENTION,) * layers)
    experts = getattr(text, "num_experts", None) or 0
    moe_layers: tuple[int, ...] = ()
    if experts:
        step = getattr(text, "decoder_sparse_step", None) or 1
        dense = set(getattr(text, "mlp_only_layers", None) or ())
        moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    heads = text.num_attention_heads
    return TextShape(
        hidden=text.hidden_size, vocab=text.vocab_size, layer_kinds=kinds, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=getattr(text, "intermediate_size", None) or 0, moe_layers=moe_layers, experts=experts,
        experts_per_token=getattr(text, "num_experts_per_tok", None) or 0,
        expert_intermediate=getattr(text, "moe_intermediate_size", None) or 0,
        shared_expert_intermediate=getattr(text, "shared_expert_intermediate_size", None) or 0,
        linear_key_heads=getattr(text, "linear_num_key_heads", None) or 0,
        linear_value_heads=getattr(text, "linear_num_value_heads", None) or 0,
        linear_key_head_dim=getattr(text, "linear_key_head_dim", None) or 0,
        linear_value_head_dim=getattr(text, "linear_value_head_dim", None) or 0,
        linear_conv_kernel=getattr(text, "linear_conv_kernel_dim", None) or 0,
    )


@dataclass(frozen=True)
class MoELayout:
    """Where a mixture-of-experts decoder layer keeps its parts (names relative to the decoder layer).

    experts: the routed experts' fused 3-D parameters ([experts, out, in]); not nn.Linear, so LoRA reaches them
        only through PEFT's `target_parameters`.
    router: the router module (a TopKRouter with a raw `weight` [experts, hidden]).
    shared_expert: the shared expert's module (nn.Linear projections), or None.
    shared_expert_gate: the shared expert's sigmoid gate (nn.Linear, hidden -> 1), or None.

    `gates` (the router and the shared expert's gate) decide how much each expert adds: models/lora.py keeps LoRA
    off them and --train_router trains them fully."""

    experts: tuple[str, ...] = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    router: str = "mlp.gate"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None

    @property
    def gates(self) -> tuple[str, ...]:
        return (self.router,) + ((self.shared_expert_gate,) if self.shared_expert_gate else ())


@dataclass(frozen=True)
class TinyBuild:
    """How `vlft tiny-model` builds a random model of the family offline (vlft/models/tiny.py).

    chat_template: the default file under TRL's chat_templates/ (others: `vlft tiny-model --chat_template`).
    text: (hidden, layers, heads, head_dim) -> the family's own text_config fields (mRoPE, layer kinds, experts).
    vision: (LLM width, vision width, vision depth) -> its own vision_config fields.
    extra_tokens: added (non-special) tokens the real tokenizer has, such as `<think>`."""

    chat_template: str
    text: Callable[[int, int, int, int], dict]
    vision: Callable[[int, int, int], dict]
    extra_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    model_type: str
    display_name: str  # as Qwen names the release ("Qwen2.5-VL"), for messages and plan
    model_class: str  # *ForConditionalGeneration class name in transformers (the tiny builder instantiates it)
    processor_class: str  # processor class name in transformers (the tiny builder instantiates it)
    video_processor_class: str
    tokenizer_class: str  # what AutoTokenizer builds for this model_type
    vision_prefix: str  # whole vision tower, merger included
    merger_prefixes: tuple[str, ...]  # parts of the tower that project into the LLM (deepstack mergers included)
    llm_prefix: str
    head_prefix: str
    # patch_size x merge_size of the released checkpoints, in pixels: the side of the square one LLM token covers
    # (28 for Qwen2/2.5-VL, 32 for Qwen3-VL and Qwen3.5). Pixel budgets are token counts times pixel_factor**2.
    pixel_factor: int
    tiny: TinyBuild
    # released sizes for `vlft plan`: size -> (text_config fields, vision_config fields, tie_word_embeddings)
    presets: Mapping[str, tuple[dict, dict, bool]] = field(default_factory=dict)
    moe: MoELayout | None = None
    # checkpoint keys transformers drops on load (`_keys_to_ignore_on_load_unexpected`) that servers still read,
    # such as Qwen3.5's multi-token-prediction head `mtp.*`: merge and save carry them over from the base files
    extra_checkpoint_prefixes: tuple[str, ...] = ()
    # feature -> why this family cannot do it (yet); validate() refuses the feature with that reason
    unsupported: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # vision_config field holding the width of the vision blocks: Qwen2-VL's `hidden_size` is the LLM's width
    vision_width_key: str = "hidden_size"
    vision_depth_key: str = "depth"
    vision_window_key: str | None = None  # field with the attention window's side in pixels (Qwen2.5-VL)
    vision_full_attention_key: str | None = None  # field listing the blocks that attend fully despite windows
    # values one vision MLP keeps per patch and intermediate unit for backward (`vlft plan`): 4 for a SwiGLU MLP;
    # None: from the vision_config's activation (quick GELU 3, GELU 2)
    vision_mlp_values: int | None = None
    vision_blocks_prefix: str = "model.visual.blocks."
    patch_embed_prefix: str = "model.visual.patch_embed."  # Conv3d `proj` inside: [width, channels, t, p, p]
    llm_layers_prefix: str = "model.language_model.layers."
    embed_prefix: str = "model.language_model.embed_tokens."

    def refusal(self, feature: str) -> str | None:
        """Why this family cannot do `feature` ('packing', 'liger', ...), or None when it can."""
        return self.unsupported.get(feature)

    def text_shape(self, text_config) -> TextShape:
        """Layer kinds, attention and MLP widths, experts: see TextShape."""
        return read_text_shape(text_config)

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


# The module layout every Qwen-VL family of transformers 5.x shares.
VISION = "model.visual."
LLM = "model.language_model."
HEAD = "lm_head"
