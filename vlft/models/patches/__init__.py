"""Every monkey patch of vlft: one module per mechanism, and one table of them, `PATCHES`.

Each patch changes one model *instance* (never a class or a module global, so two models in one process do
not affect each other), works around one library behaviour, says in its module's docstring why it exists and
which library versions it targets, and has tests against the unpatched forward. `PATCHES` lists them with
those tests; tests/models/test_patch_table.py checks that every tabled test exists and that no patch
function of this package is missing from the table.

Data features that let the model take vlft's own inputs (packed rows, uint8 pixels) are not patches of a
library and live with the training code: vlft/train/core/model_inputs.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlft.models.patches._common import patched_parts, unwrap_model
from vlft.models.patches.frozen_vision import skip_frozen_vision_graph, uncheckpoint_frozen_blocks
from vlft.models.patches.liger import (
    TORCH_KERNELS,
    Kernels,
    apply_kernels,
    apply_liger,
    liger_applied,
    liger_kernels,
    patch_fused_lm_loss,
    patch_rms_norms,
    patch_swiglu_mlps,
    torch_linear_cross_entropy_sum,
    torch_rms_norm,
    torch_silu_mul,
)
from vlft.models.patches.linear_attention import record_spans, separate_packed_records, varlen_linear_attention
from vlft.models.patches.vision_grads import vision_input_require_grads
from vlft.models.patches.zero3 import fix_zero3_weight_conversions


@dataclass(frozen=True)
class PatchInfo:
    """One patch: what a reader needs before touching it, or before dropping it when a library fixes itself."""

    name: str
    functions: tuple[str, ...]  # qualified names of the functions that change the model, entry point first
    fixes: str  # the library behaviour it works around, and what the patch does instead
    versions: str  # the library versions it was written and tested against
    tests: tuple[str, ...]  # pytest node ids that prove it against the unpatched forward


_LIGER_TESTS = "tests/models/test_patches.py::"
_CHECKPOINTING_TESTS = "tests/train/test_checkpointing.py::"
_PACKING_TESTS = "tests/train/test_packing_hybrid.py::"

PATCHES: tuple[PatchInfo, ...] = (
    PatchInfo(
        name="liger",
        functions=("vlft.models.patches.liger.apply_liger", "vlft.models.patches.liger.apply_kernels",
                   "vlft.models.patches.liger.patch_rms_norms", "vlft.models.patches.liger.patch_swiglu_mlps",
                   "vlft.models.patches.liger.patch_fused_lm_loss"),
        fixes="liger-kernel's own Qwen-VL patches fail to import on transformers >= 5.23 and patch classes; these "
              "route the language model's RMSNorms (offset 0 or zero-centred 1 + w, probed per norm class; Qwen3.5's "
              "gated norm stays on torch), dense and shared-expert SwiGLU MLPs and training loss of one instance "
              "through Liger's kernels (fused linear cross-entropy: no tokens x vocab logits; MoE load-balancing "
              "term kept)",
        versions="transformers 5.17-5.24; liger-kernel >= 0.6, read against 0.8.5",
        tests=tuple(_LIGER_TESTS + name for name in (
            "test_reference_kernels_reproduce_loss_and_gradients", "test_norm_casting_is_each_norm_class_own_in_bf16",
            "test_fused_loss_keeps_the_load_balancing_term", "test_reference_kernels_with_gradient_checkpointing",
            "test_reference_kernels_under_peft_lora", "test_lora_on_lm_head_falls_back_to_the_materialised_loss",
            "test_without_labels_or_in_eval_the_original_forward_runs", "test_patched_forward_keeps_the_signature",
            "test_apply_liger_forced_puts_liger_kernels_in_place")),
    ),
    PatchInfo(
        name="frozen_vision",
        functions=("vlft.models.patches.frozen_vision.skip_frozen_vision_graph",
                   "vlft.models.patches.frozen_vision.uncheckpoint_frozen_blocks"),
        fixes="with activation checkpointing, transformers hooks the vision patch_embed to require grad, so a frozen "
              "tower records, checkpoints and recomputes a graph for nothing; its blocks run under no_grad instead",
        versions="transformers 5.17-5.24",
        tests=(_CHECKPOINTING_TESTS + "test_frozen_tower_patch_changes_nothing_but_the_graph",
               _CHECKPOINTING_TESTS + "test_checkpointing_with_frozen_or_lora_tower"),
    ),
    PatchInfo(
        name="vision_input_grads",
        functions=("vlft.models.patches.vision_grads.vision_input_require_grads",),
        fixes="transformers does not hook Qwen3-VL's vision patch_embed, so under reentrant checkpointing vision LoRA "
              "gets no gradient; a hook marks the patch-embedding output as requiring grad",
        versions="transformers 5.17-5.24",
        tests=(_CHECKPOINTING_TESTS + "test_checkpointing_with_frozen_or_lora_tower",),
    ),
    PatchInfo(
        name="linear_attention",
        functions=("vlft.models.patches.linear_attention.separate_packed_records",),
        fixes="Qwen3.5's Gated DeltaNet layers see no record boundaries in a packed row (their convolution and "
              "recurrent state ran from one record into the next; transformers' torch kernels refuse cu_seqlens); "
              "each linear-attention decoder layer reads the records from the text position ids, as the "
              "full-attention mask does, and its linear_attn runs once per record (fla's varlen kernels on CUDA)",
        versions="transformers 5.24 (Qwen3_5GatedDeltaNet, Qwen3_5MoeGatedDeltaNet); flash-linear-attention's "
                 "varlen causal_conv1d and chunk_gated_delta_rule (CUDA path, plumbing tested on CPU only)",
        tests=tuple(_PACKING_TESTS + name for name in (
            "test_one_row_of_image_video_and_text_steps_like_padding", "test_padded_batch_gives_each_record_its_own_logits",
            "test_record_spans_follow_the_restarts_of_the_positions", "test_patch_leaves_unpacked_batches_to_the_library",
            "test_fla_path_plumbing_with_reference_kernels")) + ("tests/train/test_packing.py::test_packed_equals_padded",),
    ),
    PatchInfo(
        name="zero3_key_names",
        functions=("vlft.models.patches.zero3.fix_zero3_weight_conversions",),
        fixes="a ZeRO-3 load keeps every registered key renaming, used or not, and save_pretrained then writes "
              "model.model.layers.*; only the renamings that were used are kept",
        versions="transformers 5.2x (read against 5.24), DeepSpeed ZeRO-3",
        tests=("tests/distributed/test_distributed.py::test_same_loss_curve_as_one_process",),
    ),
)

__all__ = [
    "PATCHES",
    "TORCH_KERNELS",
    "Kernels",
    "PatchInfo",
    "apply_kernels",
    "apply_liger",
    "fix_zero3_weight_conversions",
    "liger_applied",
    "liger_kernels",
    "patch_fused_lm_loss",
    "patch_rms_norms",
    "patch_swiglu_mlps",
    "patched_parts",
    "record_spans",
    "separate_packed_records",
    "skip_frozen_vision_graph",
    "torch_linear_cross_entropy_sum",
    "torch_rms_norm",
    "torch_silu_mul",
    "uncheckpoint_frozen_blocks",
    "unwrap_model",
    "varlen_linear_attention",
    "vision_input_require_grads",
]
