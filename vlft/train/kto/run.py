"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306) of a Qwen-VL model on single answers marked good or bad (full or
LoRA).

    vlft kto --model_id output/sft_run --data_path thumbs.json --image_folder images/ \
        --output_dir output/kto_run --lora_enable true --beta 0.1 --bf16 true

DPO's order (train/dpo/run.py): arguments, data preparation (every record checked before the model loads, then the
balance of desirable and undesirable records), model set-up (train/core/setup.py), the reference
(train/preference/reference.py), the data pipeline (data/kto.py) and the trainer (train/kto/trainer.py). The run
directory has an SFT run's shape, so `vlft merge` and `vlft predict` take it unchanged.
"""
from __future__ import annotations

from vlft.config import family_for, parse_args, validate
from vlft.data.kto import KL_PAIRING, build_collator, build_dataset, label_balance, record_format
from vlft.data.mixture import prepare_mixture
from vlft.data.prepare import length_flag_of
from vlft.data.processor_media import apply_media_settings
from vlft.data.reasoning import Thinking
from vlft.data.store import CUT
from vlft.train.core.launch import batch_warning, check_output_dir, check_training_flags, run_stage, train_and_save
from vlft.train.core.stage import length_order, trainer_kwargs
from vlft.train.kto.config import GROUPS as KTO_GROUPS
from vlft.train.preference.setup import build_reference, check_reference_flags, media_and_cache
from vlft.utils import log


def run(argv: list[str]):
    """Train; returns (summary dict, trainer). The summary is also printed."""
    from vlft.models.loading import load_family, load_processor
    from vlft.train.core.setup import disable_dropout, prepare_model
    from vlft.train.kto.trainer import KTOTrainer

    groups = parse_args(KTO_GROUPS, argv, prog="vlft kto")
    model_args, data_args, tune_args, train_args = groups
    validate(*groups, family=family_for(model_args))
    check_training_flags(data_args, train_args, stage="kto")
    check_reference_flags(data_args, tune_args, train_args, command="vlft kto", rows="a record's two rows")
    check_output_dir(train_args)

    processor = load_processor(model_args.model_id)
    media = data_args.media_settings(load_family(model_args.model_id))
    apply_media_settings(processor, media)  # saved with every checkpoint: servers resize as training did
    max_length, thinking = data_args.max_seq_length, Thinking.from_args(data_args)
    data = prepare_mixture(  # one or more files, each checked on its own, then each one's #N / #p selection
        data_args.data_path, record_format(max_length, train_args), seed=train_args.seed, processor=processor,
        image_folder=data_args.image_folder, media=media, max_seq_length=max_length,
        reject_overlong=data_args.reject_overlong, skip_bad_samples=data_args.skip_bad_samples,
        **data_args.preparation(), length_flag=length_flag_of(data_args), thinking=thinking,
        max_bad_fraction=data_args.max_bad_fraction)
    truncated = data.count_flag(CUT)
    cut = f"; {truncated} with the answer cut to {length_flag_of(data_args)} {max_length}" if truncated else ""
    log(f"data: {data.summary()}{cut}")
    # the balance of thumbs up and down, and the loss weights the KTO paper's rule (eq. 8) would set
    balance = label_balance(data, desirable_weight=train_args.desirable_weight,
                            undesirable_weight=train_args.undesirable_weight, where=", ".join(data_args.data_path))
    log(balance.line())
    if balance.advice():
        log(f"warning: {balance.advice()}")
    batch_warning(len(data.samples), train_args, what="records")

    prepared = prepare_model(model_args, tune_args, train_args)  # load, Liger, LoRA, freeze
    if train_args.disable_dropout:
        disable_dropout(prepared.model)
    reference = build_reference(prepared, model_args, tune_args, train_args)

    dataset = build_dataset(data, processor, media=media, max_length=max_length, thinking=thinking)
    collator = build_collator(processor, prepared.base_model, family=prepared.family,
                              distributed=train_args.world_size > 1)
    # the pictures' contents, record by record: the reference cache's key and the resume identity
    media_sha256, ref_cache = media_and_cache(
        data, dataset, groups, media=media, thinking=thinking, stage="kto", columns=KTOTrainer.ref_columns,
        extra={"truncation": train_args.truncation_mode, "kl_pairing": KL_PAIRING})
    trainer = KTOTrainer(**trainer_kwargs(prepared, processor, dataset, collator, groups,
                                          order=length_order(data.lengths, data_args, train_args)),
                         reference=reference, ref_cache=ref_cache, media_sha256=media_sha256)
    return train_and_save(trainer, lora=tune_args.any_lora)


def main(argv: list[str] | None = None) -> int:
    return run_stage(run, argv)
