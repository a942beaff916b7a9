"""Trainer callbacks."""
from __future__ import annotations

from transformers import TrainerCallback

from vlft.models.patches import uncheckpoint_frozen_blocks


class FrozenVisionCallback(TrainerCallback):
    """The Trainer enables activation checkpointing on the whole model at the start of `train()`, after the
    model was prepared; switch it off again in the frozen vision blocks (see models/patches/frozen_vision.py)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            uncheckpoint_frozen_blocks(model)
