"""Frozen vision tower without an autograd graph (`skip_frozen_vision_graph`).

Why: with activation checkpointing on, transformers 5 (`_activation_checkpointing_enable`, 5.17-5.24)
calls `enable_input_require_grads()`, which hooks the input embeddings of every sub-model, the vision
tower's `patch_embed` included. A frozen tower then records a full autograd graph and is checkpointed and
recomputed in the backward pass for nothing (2U1 and most peers pay this). When no parameter of the tower
(merger excluded) trains, each vision block runs under `torch.no_grad()` and is not checkpointed
(`uncheckpoint_frozen_blocks`, called once the Trainer has enabled checkpointing). Loss and gradients
are unchanged: nothing below the merger has a gradient to compute (tests/train/test_checkpointing.py).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from vlft.models.patches._common import _ORIGINAL_FORWARD

_FROZEN_BLOCK = "_vlft_frozen_block"  # set on a vision block once its forward runs without autograd


def _vision_blocks(model, family) -> list[nn.Module]:
    blocks = []
    for name, module in model.named_modules():
        found = family.layer_index(name)
        bare = name.removeprefix("base_model.model.")
        if found and found[0] == "vision" and bare == f"{family.vision_blocks_prefix}{found[1]}":
            blocks.append(module)
    return blocks


def _no_grad_forward(self, *args, **kwargs):
    with torch.no_grad():
        return self.__dict__[_ORIGINAL_FORWARD](*args, **kwargs)


_no_grad_forward._vlft_patch = "frozen_vision"


def skip_frozen_vision_graph(model, family) -> int:
    """Run the vision blocks without autograd when nothing in them trains (see the module docstring).
    Returns the number of blocks patched (0 when some tower parameter or vision LoRA trains)."""
    if any(p.requires_grad for n, p in model.named_parameters() if family.part_of(n) == "vision"):
        return 0
    blocks = _vision_blocks(model, family)
    for block in blocks:
        if getattr(block, _FROZEN_BLOCK, False):
            continue
        block.__dict__[_ORIGINAL_FORWARD] = block.forward
        block.forward = types.MethodType(_no_grad_forward, block)
        setattr(block, _FROZEN_BLOCK, True)
    uncheckpoint_frozen_blocks(model)
    return len(blocks)


def uncheckpoint_frozen_blocks(model) -> int:
    """Turn activation checkpointing off again in patched frozen blocks: enabling it on the whole model
    (the Trainer does so at the start of `train()`) reaches them too, and checkpointing a block that builds
    no graph only costs a recomputation (and, with reentrant checkpointing, warns or fails)."""
    n = 0
    for module in model.modules():
        if getattr(module, _FROZEN_BLOCK, False) and getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
            n += 1
    return n
