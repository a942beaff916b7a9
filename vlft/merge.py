"""Merge a LoRA run (language model and/or vision tower, plus the weights trained fully next to the adapter)
into a plain Hugging Face checkpoint that transformers, vLLM and other servers load without vlft.

    vlft merge --adapter output/finetune_lora/latest --output output/merged/my-model [--dtype bf16]

--adapter is a finished run or any checkpoint-N inside it; the base model comes from its vlft_args.json
(--base_model overrides). Every key is checked: a trained weight missing from the run, or a saved weight
the model does not have, stops the merge and names it. The processor written carries training's pixel budgets
and frame sampling (vlft/data/processor_media.py) and vlft_media.json records them exactly. The output is
written to a temporary directory and renamed into place at the end, so a failed merge leaves nothing behind.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from vlft.errors import VlftError
from vlft.models.extra_keys import carry_extra_tensors
from vlft.run_dir import ADAPTER_CONFIG, ARGS_FILE, REWARD_HEAD_CONFIG, REWARD_HEAD_WEIGHTS
from vlft.utils import FlagParser, log

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def lora_run(adapter: str | Path, base_model: str | None = None):
    """What `adapter` holds (models/loading.py `describe_trained`), when it is what merge folds: a LoRA run or a
    checkpoint-N of one. VlftError, saying why and what to do instead, for every other kind."""
    from vlft.models.loading import KINDS, LORA_RUN, VIRTUAL_TOKEN_RUN, describe_trained

    trained = describe_trained(adapter, base_model=base_model)
    if trained.kind == VIRTUAL_TOKEN_RUN:
        raise VlftError(f"{adapter} trained virtual tokens (P-Tuning / prompt tuning): they are extra inputs placed "
                        "before every sequence, not a change of weights, so they cannot be merged into a checkpoint. "
                        "vlft predict --model on the run loads them; PeftModel.from_pretrained loads the adapter too")
    if trained.kind != LORA_RUN:
        raise VlftError(f"{adapter} holds no adapter ({ADAPTER_CONFIG}): it is {KINDS[trained.kind]}, already a plain "
                        "checkpoint that transformers and vLLM load directly; vlft merge folds a LoRA run")
    return trained


def load_adapted_model(run_dir: str | Path, *, base_model: str | None = None, dtype: str = "fp32"):
    """A LoRA run opened with its adapter not merged (PEFT's forward, what a merged model must equal): (peft_model,
    family, base model id). `open_trained(..., merge_adapter=False)` on `lora_run`'s answer."""
    from vlft.models.loading import open_trained

    opened = open_trained(lora_run(run_dir, base_model), dtype=dtype, merge_adapter=False)
    return opened.model, opened.family, opened.base_model


def save_processor(opened, out: Path) -> None:
    """The run's processor into `out`, with the media settings training used (vlft/data/processor_media.py) and
    their record (MEDIA_FILE) for vlft's own predict. `opened`: the run as models/loading.py `open_trained` opened
    it. The run's saved processor carries the settings already; applying those of its vlft_args.json again also
    serves runs saved before it did."""
    from transformers import AutoProcessor

    from vlft.data.processor_media import apply_media_settings, media_settings_from_args, write_media_record

    processor = AutoProcessor.from_pretrained(opened.processor_source)
    run_args = opened.run_args
    media = media_settings_from_args(run_args, opened.family)
    # the reasoning flags that decide prompts (data/reasoning.py), when training set them
    thinking = {k: run_args[k] for k in ("enable_thinking", "preserve_thinking") if run_args.get(k) is not None}
    if media is None:
        log(f"{opened.path} records no media settings ({ARGS_FILE}): the processor is copied as it is, with its own "
            "pixel budgets")
    else:
        apply_media_settings(processor, media)
        write_media_record(out, media, thinking)
    processor.save_pretrained(out)


def merge(adapter: str, output: str, *, base_model: str | None = None, dtype: str = "auto",
          overwrite: bool = False) -> Path:
    import torch

    from vlft.models.loading import DTYPES, open_trained

    out = Path(output)
    if out.exists() and not overwrite:
        raise VlftError(f"--output {out} already exists; nothing was changed. Choose a new directory or pass "
                        "--overwrite to replace it")
    # Merge in fp32 whatever the target dtype (also for QLoRA runs: the adapter is folded into the
    # full-precision base), then cast once; the KV cache on (training switched it off; serving wants it)
    opened = open_trained(lora_run(adapter, base_model), dtype="fp32")
    merged, family, base = opened.model, opened.family, opened.base_model
    if dtype == "auto":
        from transformers import AutoConfig

        target = getattr(AutoConfig.from_pretrained(base), "dtype", None) or torch.float32
        target = getattr(torch, target) if isinstance(target, str) else target
    else:
        target = DTYPES[dtype]
    merged.to(target)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, max_shard_size="5GB")
        carry_extra_tensors(base, tmp, family.extra_checkpoint_prefixes)  # e.g. Qwen3.5's mtp.*, dropped on load
        save_processor(opened, tmp)
        for name in (REWARD_HEAD_WEIGHTS, REWARD_HEAD_CONFIG):  # a reward model's scalar head (vlft rm), as saved
            if (Path(opened.path) / name).is_file():
                shutil.copy2(Path(opened.path) / name, tmp / name)
                log(f"reward model: {name} copied next to the merged weights")
        readable_by_all(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"merged {adapter} with its base model {base} (left unchanged) -> {out} ({family.model_type}, "
        f"{str(target).removeprefix('torch.')})")
    return out


def readable_by_all(folder: Path) -> None:
    """Give a merged model the permissions of a normal folder (the umask's, usually 755 / 644): mkdtemp creates it
    0700 and transformers writes its weight files 0600, so a server running as another user could not read it."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="vlft merge", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a LoRA run directory or a checkpoint-N inside it")
    parser.add_argument("--output", required=True, help="directory to create for the merged model")
    parser.add_argument("--base_model", default=None, help="base model id or path (default: the run's --model_id)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights dtype of the merged model (auto: the base model's)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    merge(args.adapter, args.output, base_model=args.base_model, dtype=args.dtype, overwrite=args.overwrite)
    return 0
