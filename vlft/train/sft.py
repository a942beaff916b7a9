"""Supervised fine-tuning of a Qwen-VL model on LLaVA-format data (full or LoRA).

    vlft sft --model_id Qwen/Qwen2-VL-2B-Instruct --data_path data.json --image_folder images/ \
        --output_dir output/run1 --lora_enable true --freeze_vision_tower true --bf16 true

The order matters: arguments are checked and the data is validated before the model is loaded
(a bad record costs seconds, not a model load); LoRA is applied before the freeze flags, because
PEFT freezes the whole base model and the merger or tower may still need to train next to it.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import time

from vlft.check import check_sft_data
from vlft.config import SFT_GROUPS, check_sft_args, parse_args, resolved_args
from vlft.data.collator import DummyMedia, PackingCollator, SFTCollator
from vlft.data.sft import PackedDataset, SFTDataset
from vlft.errors import VlftError
from vlft.utils import log


def shutdown_distributed(wait: bool = True) -> bool:
    """Leave the process group cleanly: a gloo/DeepSpeed group still alive at interpreter exit can abort the
    process ("terminate called without an active exception") after a successful run."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    return False


def _check_output_dir(train_args) -> None:
    out = train_args.output_dir
    if os.path.isdir(out) and os.listdir(out) and not (train_args.overwrite_output_dir or train_args.resume_from_checkpoint):
        raise VlftError(
            f"--output_dir {out} already holds files; nothing was changed. Choose a new directory, pass "
            "--overwrite_output_dir true to write into it, or --resume_from_checkpoint to continue that run"
        )


def make_collator(processor, model, *, distributed: bool = False) -> SFTCollator:
    """Collator matched to what this transformers version's forward accepts; in distributed runs it gives
    media-less batches a masked one-token image/video (see DummyMedia)."""
    config = model.config
    accepted = inspect.signature(type(model).forward).parameters  # the class's: instance patches take **kwargs
    dummy = None
    if distributed:
        weight = model.model.visual.patch_embed.proj.weight  # Conv3d [embed, channels, temporal, patch, patch]
        shape = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3 keeps the real shape aside
        dummy = DummyMedia(patch_dim=shape[1] * shape[2] * shape[3] * shape[4],
                           merge_size=model.model.visual.spatial_merge_size,
                           vision_start_id=config.vision_start_token_id, vision_end_id=config.vision_end_token_id)
    return SFTCollator(
        processor.tokenizer.pad_token_id, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        mm_token_type_ids="mm_token_type_ids" in accepted, second_per_grid_ts="second_per_grid_ts" in accepted,
        dummy_media=dummy,
    )


def run(argv: list[str]):
    """Train; returns (summary dict, trainer). The summary is also printed."""
    from vlft.models.loading import load_family, load_processor
    from vlft.models.patches import normalize_pixels_on_device
    from vlft.train.common import init_distributed_early, prepare_model
    from vlft.train.throughput import ThroughputCallback
    from vlft.train.trainer import VlftTrainer

    init_distributed_early(argv)
    model_args, data_args, tune_args, train_args = parse_args(SFT_GROUPS, argv, prog="vlft sft")
    check_sft_args(model_args, data_args, tune_args, train_args)
    _check_output_dir(train_args)
    # fills the pixel budgets left to the family's default first, so that the record holds the numbers used
    media = data_args.media_settings(load_family(model_args.model_id))
    args_record = resolved_args(model_args, data_args, tune_args, train_args)

    processor = load_processor(model_args.model_id)
    checked = check_sft_data(
        data_args.data_path, processor=processor, image_folder=data_args.image_folder,
        media=media, max_seq_length=data_args.max_seq_length, reject_overlong=data_args.reject_overlong,
        skip_bad_samples=data_args.skip_bad_samples, workers=data_args.check_workers,
    )
    log(f"data: {checked.summary()}")
    dataset = SFTDataset(
        checked.samples, checked.image_paths, processor, media=media,
        video_sources=checked.video_sources, raw_pixels=True,
    )

    prepared = prepare_model(model_args, tune_args, train_args)
    normalize_pixels_on_device(prepared.model, dataset.image_norm, dataset.video_norm)
    collator = make_collator(processor, prepared.base_model, distributed=train_args.world_size > 1)
    train_order = None
    if data_args.packing:
        from vlft.data.packing import plan_packs
        from vlft.models.patches import packed_positions

        packs = plan_packs(checked.lengths, data_args.max_seq_length)
        log(f"packing: {len(checked.lengths)} records into {len(packs)} rows of up to {data_args.max_seq_length} "
            f"tokens ({sum(checked.lengths) / (len(packs) * data_args.max_seq_length):.3f} filled)")
        dataset, collator = PackedDataset(dataset, packs), PackingCollator(collator)
        packed_positions(prepared.model)
    elif data_args.group_by_length:
        from vlft.data.packing import length_grouped_order

        train_order = lambda epoch: length_grouped_order(  # noqa: E731 - reshuffled every epoch
            checked.lengths, train_args.per_device_train_batch_size * train_args.world_size, train_args.seed + epoch)
    trainer = VlftTrainer(
        model=prepared.model, args=train_args, train_dataset=dataset, processing_class=processor,
        data_collator=collator, vlft_args=args_record, family=prepared.family, vision_lr=tune_args.vision_lr,
        merger_lr=tune_args.merger_lr, callbacks=prepared.callbacks, train_order=train_order,
    )
    trainer.add_callback(ThroughputCallback(
        prepared.model, prepared.family, real_tokens=lambda: int(trainer.real_tokens.item()),
        real_samples=lambda: int(trainer.real_records.item())))
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
    elapsed = time.perf_counter() - start
    trainer.save_model(train_args.output_dir)
    trainer.save_state()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "steps": result.global_step,
        "train_seconds": elapsed,
        "tokens_per_second": float(trainer.real_tokens.item()) / max(elapsed, 1e-9),
        "output_dir": os.path.abspath(train_args.output_dir),
        "lora": tune_args.any_lora,
    }
    log(
        f"done: {summary['steps']} steps in {elapsed:.1f}s; loss {summary['first_loss']:.4f} -> "
        f"{summary['last_loss']:.4f}; {summary['tokens_per_second']:.0f} tokens/s (non-pad)\n"
        f"       {'adapter' if tune_args.any_lora else 'model'}, processor and {os.path.basename('vlft_args.json')} "
        f"in {summary['output_dir']}"
    )
    return summary, trainer


def main(argv: list[str] | None = None) -> int:
    try:
        run(list(argv or []))
    except BaseException:
        shutdown_distributed(wait=False)  # the other ranks may never reach a barrier
        raise
    if shutdown_distributed():
        # Everything is saved and the group is closed. On the CPU (gloo / DeepSpeed shared-memory comm) a
        # communication thread can still abort the interpreter's teardown ("terminate called without an
        # active exception") and turn a finished run into a failed one: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
