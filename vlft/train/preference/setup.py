"""What every reference-based stage (DPO, KTO) sets up the same way around its reference (train/preference/
reference.py): the start-up refusals that would otherwise come after the model load, the reference itself, and the
precomputed log-probs' cache with the media digest it is keyed on."""
from __future__ import annotations

from vlft.errors import VlftError
from vlft.utils import log


def check_reference_flags(data_args, tune_args, train_args, *, command: str, rows: str,
                          with_reference: bool = True) -> None:
    """Before the data and the model load: --packing (a record's rows share one prompt: `rows` says which) and,
    when the stage keeps a reference, the ZeRO-3 rule of make_reference (LoRA with fully trained parameters next
    to the adapters needs --precompute_ref_log_probs). VlftError naming the flags and the way out."""
    from vlft.train.core.setup import refuse_base_mutating_init, zero_stage
    from vlft.train.preference.reference import freezing_flags, trained_next_to_lora

    refuse_base_mutating_init(tune_args, command)
    if data_args.packing:
        raise VlftError(f"--packing is not available for {train_args.stage_name}: {rows} share one prompt; drop --packing")
    trained = trained_next_to_lora(tune_args)
    if with_reference and trained and zero_stage(train_args) == 3 and not train_args.precompute_ref_log_probs:
        raise VlftError(  # the same rule as make_reference's
            f"under ZeRO-3, LoRA with fully trained parameters next to the adapters ({'; '.join(trained)}) needs "
            "--precompute_ref_log_probs true: their starting values must stay the reference and ZeRO-3 keeps them as "
            f"shards vlft cannot swap. Or freeze them ({freezing_flags(tune_args)})")


def build_reference(prepared, model_args, tune_args, train_args):
    """The stage's reference for the prepared policy (make_reference: adapters off under LoRA, a frozen copy for
    full fine-tuning, None when precomputed from the step-0 policy), logged."""
    from vlft.train.core.setup import load_model_copy, zero_stage
    from vlft.train.preference.reference import make_reference

    reference = make_reference(prepared, load_copy=lambda: load_model_copy(model_args, tune_args, train_args),
                               precompute=train_args.precompute_ref_log_probs, zero_stage=zero_stage(train_args))
    log(reference.describe() if reference is not None else "reference: precomputed before the first step")
    return reference


def media_and_cache(data, dataset, groups, *, media, thinking, stage: str, extra: dict, columns: int = 2,
                    with_reference: bool = True):
    """(media_sha256, ReferenceCache or None): the training records' media contents (train/core/checkpoints.py
    media_digest: the cache key's and the resume identity's) and, under --precompute_ref_log_probs, the cache of
    reference log-probs keyed on the data, media, tokenisation, model and settings (`extra`: the stage's own)."""
    from vlft.train.core.checkpoints import media_digest
    from vlft.train.preference.reference import ReferenceCache, reference_cache_key

    model_args, data_args, tune_args, train_args = groups
    media_sha256 = media_digest(data, workers=data_args.check_workers)
    if not (with_reference and train_args.precompute_ref_log_probs):
        return media_sha256, None
    key = reference_cache_key(
        data_path=data_args.data_path, data=data, media_sha256=media_sha256, model_id=model_args.model_id,
        media=media, thinking=thinking, chat_template=dataset.encoder.template, model_args=model_args,
        tune_args=tune_args, train_args=train_args, max_length=data_args.max_seq_length, extra=extra, stage=stage)
    return media_sha256, ReferenceCache(train_args.output_dir, key, len(dataset), columns=columns)
