"""What the model sees, in which order (a concern of VlftTrainerMixin, train/core/trainer.py): `InputsMixin`."""
from __future__ import annotations

import torch

from vlft.train.core.model_inputs import model_inputs


class InputsMixin:
    """Owns the batches' order and the model's inputs:

    train_order: epoch -> list of dataset indices (length-grouped batches), or None for the Trainer's sampler;
    pixel_norms: (image, video) callables mapping uint8 patch rows to the processor's float values
        (data/pixels.py: PixelNorm); None when the dataset sends float pixels. With them each batch becomes the
        model's inputs on the device (train/core/model_inputs.py: pixels normalised, packed rows' per-record
        positions), so the model keeps its library forward.

    Overrides the private `_get_train_sampler` and `_prepare_inputs` (rows in train/core/overrides.py)."""

    def __init__(self, *args, train_order=None, pixel_norms=None, **kwargs):
        self.train_order = train_order
        self.pixel_norms = pixel_norms
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, *args, **kwargs):
        if self.train_order is None:
            return super()._get_train_sampler(*args, **kwargs)
        return _EpochOrderSampler(self.train_order, self)

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        image_norm, video_norm = self.pixel_norms or (None, None)
        return model_inputs(inputs, self.accelerator.unwrap_model(self.model), image_norm=image_norm,
                            video_norm=video_norm)


class _EpochOrderSampler(torch.utils.data.Sampler):
    """Yields the order a function gives for the current epoch (length-grouped batches)."""

    def __init__(self, order, trainer):
        self.order = order
        self.trainer = trainer

    def __len__(self) -> int:
        return len(self.trainer.train_dataset)

    def __iter__(self):
        epoch = int(self.trainer.state.epoch or 0)
        return iter(self.order(epoch))
