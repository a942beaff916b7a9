"""Supervised fine-tuning of a Qwen-VL model on LLaVA-format data (full or LoRA).

    vlft sft --model_id Qwen/Qwen2-VL-2B-Instruct --data_path data.json --image_folder images/ \
        --output_dir output/run1 --lora_enable true --freeze_vision_tower true --bf16 true

The order matters: arguments are checked and the data is prepared before the model is loaded (a bad record
costs seconds, not a model load); the model set-up applies LoRA before the freeze flags, because PEFT freezes
the whole base model and the merger or tower may still need to train next to it (train/core/setup.py). Held-out
records (--eval_data_path) go through the same start-up check, before the model loads too.
"""
from __future__ import annotations

from vlft.check import quick_reasoning_counts, reasoning_report
from vlft.config import family_for, parse_args, validate
from vlft.data.collator import PackingCollator, SFTCollator
from vlft.data.encoding import ChatEncoder
from vlft.data.mixture import prepare_mixture
from vlft.data.packing import plan_packs
from vlft.data.prepare import CONVERSATION, length_flag_of, prepare_sft_data
from vlft.data.processor_media import apply_media_settings
from vlft.data.reasoning import Thinking
from vlft.data.sft import PackedDataset, SFTDataset
from vlft.train.core.launch import batch_warning, check_output_dir, check_training_flags, run_stage, train_and_save
from vlft.train.core.stage import length_order, trainer_kwargs
from vlft.train.sft.config import GROUPS as SFT_GROUPS
from vlft.utils import log


def run(argv: list[str]):
    """Train; returns (summary dict, trainer). The summary is also printed."""
    from vlft.models.loading import load_family, load_processor
    from vlft.train.core.setup import prepare_model
    from vlft.train.core.trainer import SFTTrainer

    model_args, data_args, tune_args, train_args = parse_args(SFT_GROUPS, argv, prog="vlft sft")
    validate(model_args, data_args, tune_args, train_args, family=family_for(model_args))
    check_training_flags(data_args, train_args, stage="sft")
    check_output_dir(train_args)

    processor = load_processor(model_args.model_id)
    media = data_args.media_settings(load_family(model_args.model_id))  # pixel defaults in the family's units
    apply_media_settings(processor, media)  # saved with every checkpoint: servers resize as training did

    thinking = Thinking.from_args(data_args)

    def prepare(path, *_):  # each training file and the eval records: the same checks, media settings and length limit
        return prepare_sft_data(
            path, processor=processor, image_folder=data_args.image_folder, media=media,
            max_seq_length=data_args.max_seq_length, reject_overlong=data_args.reject_overlong,
            skip_bad_samples=data_args.skip_bad_samples, **data_args.preparation(),
            length_flag=length_flag_of(data_args), thinking=thinking, max_bad_fraction=data_args.max_bad_fraction)

    # one or more files, each checked on its own, then each one's #N / #p selection (data/mixture.py)
    data = prepare_mixture(data_args.data_path, CONVERSATION, seed=train_args.seed, prepare=prepare)
    log(f"data: {data.summary()}")
    rows = plan_packs(data.lengths, data_args.max_seq_length) if data_args.packing else data.samples  # the items
    batch_warning(len(rows), train_args, what="packed rows" if data_args.packing else "records")
    encoder = ChatEncoder(processor, thinking)
    for line in reasoning_report(quick_reasoning_counts(encoder, data), encoder.reasoning, thinking):
        log(line)
    eval_data = prepare(data_args.eval_data_path) if data_args.eval_data_path else None
    if eval_data is not None:
        when = (f"every {train_args.eval_steps:g} steps (--eval_steps)" if train_args.eval_strategy == "steps"
                else f"every {train_args.eval_strategy.value}")
        log(f"eval data: {eval_data.summary()}; eval_loss {when}")

    prepared = prepare_model(model_args, tune_args, train_args)  # load, Liger, LoRA, freeze

    def sft_dataset(prepared_data):
        return SFTDataset(prepared_data.samples, prepared_data.image_paths, processor, media=media,
                          video_sources=prepared_data.video_sources, raw_pixels=True, thinking=thinking)

    dataset = sft_dataset(data)
    eval_dataset = sft_dataset(eval_data) if eval_data is not None else None
    pixel_norms = (dataset.image_norm, dataset.video_norm)  # uint8 pixels are normalised on the device
    collator = SFTCollator.for_model(processor, prepared.base_model, family=prepared.family,
                                     distributed=train_args.world_size > 1)
    order = None
    if data_args.packing:
        packs = plan_packs(data.lengths, data_args.max_seq_length)
        log(f"packing: {len(data.lengths)} records into {len(packs)} rows of up to {data_args.max_seq_length} "
            f"tokens ({sum(data.lengths) / (len(packs) * data_args.max_seq_length):.3f} filled)")
        dataset, collator = PackedDataset(dataset, packs), PackingCollator(collator)
        if eval_dataset is not None:  # the collator packs: eval batches are packed rows too
            eval_dataset = PackedDataset(eval_dataset, plan_packs(eval_data.lengths, data_args.max_seq_length))
    else:
        order = length_order(data.lengths, data_args, train_args)

    groups = (model_args, data_args, tune_args, train_args)
    trainer = SFTTrainer(**trainer_kwargs(prepared, processor, dataset, collator, groups, order=order,
                                          pixel_norms=pixel_norms), eval_dataset=eval_dataset)
    return train_and_save(trainer, lora=tune_args.any_lora or tune_args.virtual_tokens)


def main(argv: list[str] | None = None) -> int:
    return run_stage(run, argv)
