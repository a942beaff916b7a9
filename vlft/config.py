"""Argument dataclasses grouped by concern, `--config run.yaml`, and the cross-field checks.

Every field is a command-line flag of the same name; a YAML (or JSON) config uses the same names as
keys, and flags given on the command line win over the file. Flag names follow 2U1/Qwen2-VL-Finetune.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from vlft.constants import DEFAULT_IMAGE_MAX_PIXELS, DEFAULT_IMAGE_MIN_PIXELS
from vlft.errors import VlftError

ARGS_FILE = "vlft_args.json"


@dataclass
class ModelArguments:
    model_id: str | None = field(
        default=None, metadata={"help": "Hugging Face model id or local checkpoint dir (Qwen2-VL / 2.5-VL / 3-VL)."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel.", "choices": ["sdpa", "eager", "flash_attention_2"]}
    )


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA-format JSON list or JSONL file."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that relative image paths resolve against (default: the data file's folder)."}
    )
    image_min_pixels: int = field(default=DEFAULT_IMAGE_MIN_PIXELS, metadata={"help": "Lower pixel budget per image."})
    image_max_pixels: int = field(default=DEFAULT_IMAGE_MAX_PIXELS, metadata={"help": "Upper pixel budget per image."})
    max_seq_length: int = field(
        default=8192, metadata={"help": "Longest tokenised record, vision tokens included; longer ones are dropped."}
    )
    reject_overlong: bool = field(
        default=False, metadata={"help": "Stop with an error listing over-long records instead of dropping them."}
    )
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Train without invalid records (counted and listed) instead of stopping."}
    )
    check_workers: int = field(default=4, metadata={"help": "Threads that decode images during the start-up data check."})


@dataclass
class TuneArguments:
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters on the language model's linear layers."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Freeze the vision blocks and patch embedding."})
    freeze_merger: bool = field(default=False, metadata={"help": "Freeze the vision-to-language merger."})
    freeze_llm: bool = field(
        default=False, metadata={"help": "Freeze the language model and head (always true for its base weights under LoRA)."}
    )


@dataclass
class SFTTrainingArguments(TrainingArguments):
    """HF TrainingArguments, with defaults suited to VLM SFT and the flags transformers 5 dropped."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds files."}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of steps for LR warm-up (kept for 2U1 scripts; sets warmup_steps)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: vlft's collator builds the batch."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.label_names is None:
            self.label_names = ["labels"]  # PeftModel hides the signature the Trainer would read it from
        if self.dataloader_pin_memory and not _has_cuda():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        if self.gradient_checkpointing_kwargs is None:
            # Non-reentrant checkpointing works with frozen inputs (frozen tower, LoRA) without hooks.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        super().__post_init__()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


SFT_GROUPS = (ModelArguments, DataArguments, TuneArguments, SFTTrainingArguments)


def _config_to_argv(path: str, parser) -> list[str]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise VlftError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise VlftError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise VlftError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(set(data) - set(actions))
    if unknown:
        raise VlftError(f"--config {path}: unknown key(s) {', '.join(unknown)}; keys are the command-line flag names")
    argv: list[str] = []
    for key, value in data.items():
        if value is None or value == []:
            continue  # the default stands
        if isinstance(value, (list, tuple)):
            if actions[key].nargs in ("+", "*"):
                argv += [f"--{key}", *map(str, value)]
            elif len(value) == 1:
                argv += [f"--{key}", str(value[0])]
            else:  # e.g. report_to: TrainingArguments takes several integrations as one comma-separated value
                argv += [f"--{key}", ",".join(map(str, value))]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _raise_parse_error(message: str):
    raise VlftError(f"{message} (run with --help for the list of flags)")


def parse_args(groups: tuple[type, ...], argv: list[str], prog: str = "vlft"):
    """Parse flags (after an optional `--config FILE`) into the given dataclasses."""
    argv = list(argv)
    parser = HfArgumentParser(groups, prog=prog)
    parser.error = _raise_parse_error  # a one-line VlftError instead of argparse's usage dump
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise VlftError("--config needs a file path")
        config_argv = _config_to_argv(argv[i + 1], parser)
        argv = config_argv + argv[:i] + argv[i + 2:]  # command-line flags come last, so they win
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:  # raised by dataclass __post_init__ checks (TrainingArguments among them)
        raise VlftError(f"invalid arguments: {err}") from None
    if remaining:
        raise VlftError(f"unknown argument(s): {' '.join(remaining)}; run with --help for the list of flags")
    return parsed


def check_sft_args(model_args: ModelArguments, data_args: DataArguments, tune_args: TuneArguments,
                   train_args: SFTTrainingArguments) -> None:
    """Cross-field checks; every message names the flags involved."""
    errors = []
    if not model_args.model_id:
        errors.append("--model_id is required (a Hugging Face id or a local Qwen-VL checkpoint dir)")
    if not data_args.data_path:
        errors.append("--data_path is required (a LLaVA-format JSON or JSONL file)")
    if not train_args.output_dir:
        errors.append("--output_dir is required")
    if data_args.image_folder and not os.path.isdir(data_args.image_folder):
        errors.append(f"--image_folder {data_args.image_folder}: no such directory")
    if not 0 < data_args.image_min_pixels <= data_args.image_max_pixels:
        errors.append(f"--image_min_pixels ({data_args.image_min_pixels}) must be > 0 and <= --image_max_pixels "
                      f"({data_args.image_max_pixels})")
    if data_args.max_seq_length < 8:
        errors.append(f"--max_seq_length {data_args.max_seq_length} is too small")
    if tune_args.lora_enable:
        if tune_args.lora_rank < 1:
            errors.append("--lora_rank must be >= 1")
    elif tune_args.freeze_vision_tower and tune_args.freeze_merger and tune_args.freeze_llm:
        errors.append("--freeze_vision_tower, --freeze_merger and --freeze_llm together leave nothing to train; "
                      "unfreeze a part or add --lora_enable")
    if errors:
        raise VlftError("invalid arguments:\n  - " + "\n  - ".join(errors))


def resolved_args(*groups) -> dict:
    """Flat {flag: value} of every group, JSON-safe; usable again as --config."""
    out: dict = {}
    for g in groups:
        if isinstance(g, TrainingArguments):
            out.update(g.to_dict())
        else:
            out.update(dataclasses.asdict(g))
    return out
