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


class ReleaseSharedMemoryCallback(TrainerCallback):
    """A single-process DeepSpeed run (the CPU rehearsal with one process) starts its process group only when the
    Trainer wraps the model, after `init_distributed_early` had nothing to do: unlink its CPU all-reduce segment's
    name once training begins (train/launch.py: release_cpu_allreduce_names says why; a no-op elsewhere)."""

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        from vlft.train.launch import release_cpu_allreduce_names

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            release_cpu_allreduce_names()
