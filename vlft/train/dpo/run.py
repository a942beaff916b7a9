"""Direct preference optimisation (DPO, arXiv 2305.18290) of a Qwen-VL model on preference pairs (full or LoRA).

    vlft dpo --model_id output/sft_run --data_path pairs.json --image_folder images/ \
        --output_dir output/dpo_run --lora_enable true --beta 0.1 --loss_type sigmoid --bf16 true

The same order as SFT (train/sft/run.py): arguments, data preparation (every pair checked before the model loads),
model set-up (train/core/setup.py, one definition for every stage), then the reference (train/preference/reference.py;
none for the reference-free losses orpo, simpo, cpo: train/dpo/loss.py), the data pipeline (data/dpo.py) and the
trainer (train/dpo/trainer.py). The run directory has an SFT run's shape, so
`vlft merge` and `vlft predict` take it unchanged.
"""
from __future__ import annotations

from vlft.config import family_for, parse_args, validate
from vlft.data.dpo import PreferenceFormat, build_collator, build_dataset
from vlft.data.mixture import prepare_mixture
from vlft.data.prepare import length_flag_of
from vlft.data.processor_media import apply_media_settings
from vlft.data.reasoning import Thinking
from vlft.data.store import CUT
from vlft.train.core.launch import batch_warning, check_output_dir, check_training_flags, run_stage, train_and_save
from vlft.train.core.stage import length_order, trainer_kwargs
from vlft.train.dpo.config import GROUPS as DPO_GROUPS
from vlft.train.dpo.loss import needs_reference
from vlft.train.preference.reference import reference_cache_key as shared_cache_key
from vlft.train.preference.setup import build_reference, check_reference_flags, media_and_cache
from vlft.utils import log


def _cache_extra(train_args) -> dict:
    """DPO's own parts of the reference-cache key: the truncation mode and --ld_alpha (the values are LD-weighted)."""
    return {"truncation": train_args.truncation_mode, "ld_alpha": train_args.ld_alpha}


def reference_cache_key(*, data_path, data, media_sha256: str, model_id: str, media, thinking: Thinking,
                        chat_template: str | None, model_args, tune_args, train_args, max_length: int) -> str:
    """The DPO stage's reference-cache key: train/preference/reference.py's `reference_cache_key` (data, records,
    media contents, tokenisation, model, dtype, media settings, length limit) with DPO's own parts, the truncation
    mode and --ld_alpha (the cached values are LD-weighted)."""
    return shared_cache_key(
        data_path=data_path, data=data, media_sha256=media_sha256, model_id=model_id, media=media, thinking=thinking,
        chat_template=chat_template, model_args=model_args, tune_args=tune_args, train_args=train_args,
        max_length=max_length, extra=_cache_extra(train_args), stage="dpo")


def run(argv: list[str]):
    """Train; returns (summary dict, trainer). The summary is also printed."""
    from vlft.models.loading import load_family, load_processor
    from vlft.train.core.setup import disable_dropout, prepare_model
    from vlft.train.dpo.trainer import DPOTrainer

    groups = parse_args(DPO_GROUPS, argv, prog="vlft dpo")
    model_args, data_args, tune_args, train_args = groups
    validate(*groups, family=family_for(model_args))
    check_training_flags(data_args, train_args, stage="dpo")
    with_reference = needs_reference(train_args.loss_type)  # False: orpo, simpo, cpo*: no reference at all
    check_reference_flags(data_args, tune_args, train_args, command="vlft dpo", rows="a pair's two rows",
                          with_reference=with_reference)
    check_output_dir(train_args)

    processor = load_processor(model_args.model_id)
    media = data_args.media_settings(load_family(model_args.model_id))
    apply_media_settings(processor, media)  # saved with every checkpoint: servers resize as training did
    max_length, thinking = data_args.max_seq_length, Thinking.from_args(data_args)
    data = prepare_mixture(  # one or more files, each checked on its own, then each one's #N / #p selection
        data_args.data_path, PreferenceFormat(max_length, train_args.truncation_mode).record_format(),
        seed=train_args.seed, processor=processor, image_folder=data_args.image_folder, media=media,
        max_seq_length=max_length, reject_overlong=data_args.reject_overlong,
        skip_bad_samples=data_args.skip_bad_samples, **data_args.preparation(),
        length_flag=length_flag_of(data_args), thinking=thinking, max_bad_fraction=data_args.max_bad_fraction)
    truncated = data.count_flag(CUT)
    cut = f"; {truncated} with answers cut to {length_flag_of(data_args)} {max_length}" if truncated else ""
    log(f"data: {data.summary()}{cut}")
    batch_warning(len(data.samples), train_args, what="pairs")

    prepared = prepare_model(model_args, tune_args, train_args)  # load, Liger, LoRA, freeze
    if train_args.disable_dropout:
        disable_dropout(prepared.model)
    if with_reference:
        reference = build_reference(prepared, model_args, tune_args, train_args)
    else:
        reference = None
        log(f"reference: none (--loss_type {train_args.loss_type[0]} is reference-free)")

    dataset = build_dataset(data, processor, media=media, max_length=max_length, thinking=thinking, raw_pixels=True)
    collator = build_collator(processor, prepared.base_model, family=prepared.family,
                              distributed=train_args.world_size > 1)
    # the pictures' contents, record by record: the reference cache's key and the resume identity
    media_sha256, ref_cache = media_and_cache(data, dataset, groups, media=media, thinking=thinking, stage="dpo",
                                              extra=_cache_extra(train_args), with_reference=with_reference)
    trainer = DPOTrainer(**trainer_kwargs(prepared, processor, dataset, collator, groups,
                                          order=length_order(data.lengths, data_args, train_args)),
                         reference=reference, ref_cache=ref_cache, media_sha256=media_sha256)
    return train_and_save(trainer, lora=tune_args.any_lora)


def main(argv: list[str] | None = None) -> int:
    return run_stage(run, argv)
