"""Vision input gradients for adapted frozen towers (`vision_input_require_grads`).

Why: reentrant activation checkpointing only back-propagates into a checkpointed block when one of its
inputs requires grad. transformers hooks the vision `patch_embed` for that in Qwen2-VL and Qwen2.5-VL
(their vision models set `_input_embed_layer = "patch_embed"`), but not in Qwen3-VL (5.17-5.24): there,
LoRA on the vision blocks silently gets no gradient and torch warns "None of the inputs have
requires_grad". The hook marks the patch-embedding output as requiring grad when vision blocks train
but the patch embedding does not.
"""
from __future__ import annotations

import torch

_INPUT_GRAD_HOOK = "_vlft_input_grad_hook"  # on patch_embed: the hook handle, so applying twice hooks once


def _require_grad_output(module, args, output):
    return output.requires_grad_(True) if torch.is_tensor(output) and not output.requires_grad else output


def vision_input_require_grads(model, family) -> bool:
    """Hook the vision patch embedding so checkpointed vision blocks see an input that requires grad, when
    something in the blocks trains (LoRA, unfrozen blocks) but the patch embedding itself is frozen."""
    patch_embed = family.patch_embed(model)
    if patch_embed is None:
        return False
    blocks_train = any(p.requires_grad for n, p in model.named_parameters() if family.part_of(n) == "vision"
                       and not n.removeprefix("base_model.model.").startswith(family.patch_embed_prefix))
    embed_trains = any(p.requires_grad for p in patch_embed.parameters())
    if not blocks_train or embed_trains or getattr(patch_embed, _INPUT_GRAD_HOOK, None) is not None:
        return False
    setattr(patch_embed, _INPUT_GRAD_HOOK, patch_embed.register_forward_hook(_require_grad_output))
    return True
