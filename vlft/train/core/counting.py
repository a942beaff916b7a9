"""What a run trained on, and its throughput (a concern of VlftTrainerMixin, train/core/trainer.py): `CountingMixin`."""
from __future__ import annotations

from vlft.train.core.throughput import ThroughputCallback


class TrainCounts:
    """What this process trained on, accumulated at every training step. The sums stay tensors on the batch's
    device (the Trainer's data loader may already have moved it there): counting never waits for the GPU; the
    throughput callback reads them (`int(...)`) only when it logs."""

    def __init__(self):
        self.tokens = self.records = self.patches = self.pairs = 0

    def add(self, inputs: dict) -> None:
        """Count one batch as vlft's collators build it: `attention_mask` (padded; with `pair_index`, a preference
        batch of two rows per record) or `pack_layout` (packed rows: per segment tokens, images, videos, is_record),
        and the `*_grid_thw` rows of its images and videos."""
        if "pack_layout" in inputs:
            layout = inputs["pack_layout"]
            self.tokens = self.tokens + (layout[..., 0] * layout[..., 3]).sum()
            self.records = self.records + layout[..., 3].sum()
        elif "attention_mask" in inputs:
            self.tokens = self.tokens + inputs["attention_mask"].sum()
            # preference batches (data/dpo.py) hold two rows per record: a record is a pair there
            rows = inputs["pair_index"] if "pair_index" in inputs else inputs["attention_mask"]
            self.records = self.records + rows.shape[0]
        for key in ("image_grid_thw", "video_grid_thw"):
            grid = inputs.get(key)
            if grid is not None:
                frame = grid[:, 1] * grid[:, 2]  # the tower attends within one temporal patch of one image / video
                self.patches = self.patches + (grid[:, 0] * frame).sum()
                self.pairs = self.pairs + (grid[:, 0] * frame * frame).sum()


class CountingMixin:
    """Owns `counts` (TrainCounts: non-pad tokens, records, vision patches and attention pairs) and `throughput`,
    the ThroughputCallback wired to them, so every run logs tokens/s and MFU with the vision tower in it. Reads
    `self.family` (VlftTrainerMixin sets it) for the FLOPs estimate. A stage whose model sees other than the batch
    overrides `count_batch`.

    Overrides the public `training_step` (counts the batch first); no private Trainer method."""

    def __init__(self, *args, **kwargs):
        self.counts = TrainCounts()
        super().__init__(*args, **kwargs)
        c = self.counts
        self.throughput = ThroughputCallback(
            self.model, self.family, real_tokens=lambda: int(c.tokens), real_samples=lambda: int(c.records),
            vision_tokens=lambda: int(c.patches), vision_pairs=lambda: int(c.pairs))
        # right after DefaultFlowCallback: the figures it adds to a log line reach the reporters and the printer
        self.callback_handler.callbacks.insert(1, self.throughput)

    def count_batch(self, inputs: dict) -> None:
        """What a batch adds to the throughput counts (a stage whose model sees other than the batch overrides)."""
        self.counts.add(inputs)

    def training_step(self, model, inputs, *args, **kwargs):
        self.count_batch(inputs)
        return super().training_step(model, inputs, *args, **kwargs)
