"""What every stage's run(argv) builds the same way, once its own pieces exist: the batch order under
--group_by_length and the keyword arguments every vlft trainer takes (train/core/trainer.py VlftTrainerMixin and
its concerns). A stage's run stays a short linear main (train/sft/run.py is the example) and calls these."""
from __future__ import annotations

from collections.abc import Callable, Sequence


def length_order(lengths: Sequence, data_args, train_args) -> Callable[[int], list[int]] | None:
    """--group_by_length: epoch -> the dataset's indices in batches of similar length (data/packing.py
    length_grouped_order over one global batch, seeded by --seed + epoch); None without the flag."""
    if not data_args.group_by_length:
        return None
    from vlft.data.packing import length_grouped_order

    batch = train_args.per_device_train_batch_size * train_args.world_size
    return lambda epoch: length_grouped_order(lengths, batch, train_args.seed + epoch)


def trainer_kwargs(prepared, processor, dataset, collator, groups, *, order=None, pixel_norms=None) -> dict:
    """The keyword arguments of every vlft trainer, from the prepared model (train/core/setup.py PreparedModel),
    the processor, the training dataset and collator, and the run's parsed argument groups (model, data, tune,
    train): the resolved arguments saved with the run, the family, the per-part learning rates, the batch order
    and the pixel normalisation (default: the dataset's image and video norms)."""
    from vlft.config import resolved_args

    model_args, data_args, tune_args, train_args = groups
    return dict(
        model=prepared.model, args=train_args, train_dataset=dataset, processing_class=processor,
        data_collator=collator, callbacks=prepared.callbacks, vlft_args=resolved_args(*groups),
        family=prepared.family, vision_lr=tune_args.vision_lr, merger_lr=tune_args.merger_lr,
        loraplus_lr_ratio=tune_args.loraplus_lr_ratio, train_order=order,
        pixel_norms=pixel_norms or (dataset.image_norm, dataset.video_norm))
