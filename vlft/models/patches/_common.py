"""What more than one patch module needs: finding the model under a PEFT wrapper, the attribute names under
which a patch keeps a replaced forward and marks its own, and the listing of what was patched."""
from __future__ import annotations

from torch import nn

_ORIGINAL_FORWARD = "_vlft_original_forward"  # the forward a patch replaced (liger: the model's; frozen_vision: a block's)
_PATCH_TAG = "_vlft_patch"  # set on our forward functions: which patch they are


def unwrap_model(model) -> nn.Module:
    """The `Qwen*VLForConditionalGeneration` inside a PEFT wrapper (or the model itself). Patching it is
    enough: PEFT's forward ends in this instance's `forward`."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def patched_parts(model) -> dict[str, list[str]]:
    """Names of the modules whose forward a vlft patch replaced, by patch (the tag on the forward: 'rms_norm',
    'swiglu', 'fused_lm_loss', 'frozen_vision'); for tests and for the CLI to report."""
    parts: dict[str, list[str]] = {}
    for name, module in unwrap_model(model).named_modules():
        forward = module.__dict__.get("forward")
        tag = getattr(getattr(forward, "__func__", None), _PATCH_TAG, None)
        if tag is not None:
            parts.setdefault(tag, []).append(name)
    return parts
