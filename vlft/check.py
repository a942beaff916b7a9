"""`vlft check-data`: run a stage's data preparation (data/prepare.py) against a model's processor, without
loading the model or training: every record parsed, every image and video decoded, every sequence measured.

    vlft check-data --model_id DIR --data_path data.json --image_folder images/ [--stage sft|dpo|grpo|predict]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlft.errors import VlftError
from vlft.utils import log


@dataclass
class CheckArguments:
    stage: str = field(
        default="sft", metadata={"help": "Which stage's records the file holds: sft (conversations ending with a gpt "
                                         "turn), dpo (preference pairs), grpo (prompts with reward columns), predict "
                                         "(prompts, answers optional).", "choices": ["sft", "dpo", "grpo", "predict"]})
    truncation_mode: str = field(
        default="keep_start", metadata={"help": "dpo: over-long pairs get their answers cut (keep_start, vlft dpo's "
                                                "default) or are dropped (drop).", "choices": ["keep_start", "drop"]})


def main(argv: list[str] | None = None) -> int:
    from vlft.config import DataArguments, ModelArguments, family_for, parse_args, validate
    from vlft.data.prepare import RECORD_FORMATS, length_flag_of, prepare_data
    from vlft.models.loading import load_family, load_processor

    check_args, model_args, data_args = parse_args((CheckArguments, ModelArguments, DataArguments), argv or [],
                                                   prog="vlft check-data")
    if not model_args.model_id or not data_args.data_path:
        raise VlftError("vlft check-data needs --model_id and --data_path")
    if not Path(data_args.data_path).exists():
        raise VlftError(f"--data_path {data_args.data_path}: file not found")
    validate(model_args, data_args, family=family_for(model_args))
    processor = load_processor(model_args.model_id)
    media = data_args.media_settings(load_family(model_args.model_id))  # pixel defaults in the family's units
    record_format, truncated = RECORD_FORMATS.get(check_args.stage), None
    if check_args.stage == "grpo":  # prompts; they are limited by --max_prompt_length in `vlft grpo`
        from vlft.data.grpo import PROMPT

        record_format = PROMPT
    elif check_args.stage == "dpo":  # the over-long policy of `vlft dpo` (data/dpo.py)
        from vlft.data.dpo import PreferenceFormat

        preference = PreferenceFormat(data_args.max_seq_length, check_args.truncation_mode)
        record_format, truncated = preference.record_format(), preference.truncated
    prepared = prepare_data(
        data_args.data_path, record_format, processor=processor,
        image_folder=data_args.image_folder, media=media, max_seq_length=data_args.max_seq_length,
        reject_overlong=data_args.reject_overlong, skip_bad_samples=data_args.skip_bad_samples,
        workers=data_args.check_workers, length_flag=length_flag_of(data_args),
    )
    cut = f"; {len(truncated)} with answers to be cut to {length_flag_of(data_args)}" if truncated else ""
    log(f"{check_args.stage} data: {prepared.summary()}{cut}")
    return 0
