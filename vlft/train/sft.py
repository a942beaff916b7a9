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
import time

from vlft.check import check_sft_data
from vlft.config import SFT_GROUPS, check_sft_args, parse_args, resolved_args
from vlft.data.collator import SFTCollator
from vlft.data.sft import SFTDataset
from vlft.errors import VlftError
from vlft.utils import log


def _check_output_dir(train_args) -> None:
    out = train_args.output_dir
    if os.path.isdir(out) and os.listdir(out) and not (train_args.overwrite_output_dir or train_args.resume_from_checkpoint):
        raise VlftError(
            f"--output_dir {out} already holds files; nothing was changed. Choose a new directory, pass "
            "--overwrite_output_dir true to write into it, or --resume_from_checkpoint to continue that run"
        )


def make_collator(processor, model) -> SFTCollator:
    """Collator matched to what this transformers version's forward accepts."""
    config = model.config
    accepted = inspect.signature(model.forward).parameters
    wants_types = "mm_token_type_ids" in accepted
    return SFTCollator(
        processor.tokenizer.pad_token_id,
        image_token_id=config.image_token_id if wants_types else None,
        video_token_id=config.video_token_id if wants_types else None,
        second_per_grid_ts="second_per_grid_ts" in accepted,
    )


def run(argv: list[str]):
    """Train; returns (summary dict, trainer). The summary is also printed."""
    from vlft.models.loading import load_processor
    from vlft.train.common import prepare_model
    from vlft.train.trainer import VlftTrainer

    model_args, data_args, tune_args, train_args = parse_args(SFT_GROUPS, argv, prog="vlft sft")
    check_sft_args(model_args, data_args, tune_args, train_args)
    _check_output_dir(train_args)
    args_record = resolved_args(model_args, data_args, tune_args, train_args)

    processor = load_processor(model_args.model_id)
    checked = check_sft_data(
        data_args.data_path, processor=processor, image_folder=data_args.image_folder,
        media=data_args.media_settings(), max_seq_length=data_args.max_seq_length, reject_overlong=data_args.reject_overlong,
        skip_bad_samples=data_args.skip_bad_samples, workers=data_args.check_workers,
    )
    log(f"data: {checked.summary()}")
    dataset = SFTDataset(
        checked.samples, checked.image_paths, processor, media=data_args.media_settings(),
        video_sources=checked.video_sources, lengths=checked.lengths,
    )

    prepared = prepare_model(model_args, tune_args, train_args)
    trainer = VlftTrainer(
        model=prepared.model, args=train_args, train_dataset=dataset, processing_class=processor,
        data_collator=make_collator(processor, prepared.base_model), vlft_args=args_record,
        family=prepared.family, vision_lr=tune_args.vision_lr, merger_lr=tune_args.merger_lr,
        callbacks=prepared.callbacks,
    )
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
    run(list(argv or []))
    return 0
