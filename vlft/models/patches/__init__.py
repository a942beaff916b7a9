"""Every monkey patch of vlft: one module per mechanism, re-exported here for importers.

Each patch changes one model *instance* (never a class or a module global, so two models in one process do
not affect each other), works around one library behaviour, says in its module's docstring why it exists and
which library versions it targets, and has tests against the unpatched forward.

Data features that let the model take vlft's own inputs (packed rows, uint8 pixels) are not patches of a
library and live with the training code: vlft/train/model_inputs.py.
"""
from __future__ import annotations

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
from vlft.models.patches.vision_grads import vision_input_require_grads
from vlft.models.patches.zero3 import fix_zero3_weight_conversions

__all__ = [
    "TORCH_KERNELS",
    "Kernels",
    "apply_kernels",
    "apply_liger",
    "fix_zero3_weight_conversions",
    "liger_applied",
    "liger_kernels",
    "patch_fused_lm_loss",
    "patch_rms_norms",
    "patch_swiglu_mlps",
    "patched_parts",
    "skip_frozen_vision_graph",
    "torch_linear_cross_entropy_sum",
    "torch_rms_norm",
    "torch_silu_mul",
    "uncheckpoint_frozen_blocks",
    "unwrap_model",
    "vision_input_require_grads",
]
