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
from vlft.run_dir import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ARGS_FILE,
    INITIAL_ADAPTER,
    NON_LORA_FILE,
    TRAINED_FILE,
    adapted_targets,
    base_model_of,
    is_adapter_run,
    read_adapter,
    read_non_lora,
    read_run_args,
    read_trained,
)
from vlft.utils import FlagParser, log

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


def expected_non_lora(run_dir: Path, saved: dict) -> set[str] | None:
    """The weights the run trained fully next to its adapter, as it recorded them when it saved (run_dir.py);
    None for a run saved before that record existed (then the saved file is taken as it is)."""
    trained = read_trained(run_dir)
    if trained is None:
        log(f"{run_dir} has no {TRAINED_FILE} (saved by an older vlft): its {NON_LORA_FILE} is applied as it is")
        return None
    return set(trained["non_lora"])


def load_adapted_model(run_dir: str | Path, *, base_model: str | None = None, dtype: str = "fp32"):
    """Base model + the run's fully trained weights + its adapter (not merged). Returns (peft_model, family,
    base id). Every key is checked against the model."""
    import torch
    from peft import LoraConfig, set_peft_model_state_dict

    from vlft.models.loading import DTYPES, load_model
    from vlft.models.lora import mutates_base, wrap_peft
    from vlft.models.virtual_tokens import is_virtual_token_run

    run_dir = Path(run_dir)
    if not is_adapter_run(run_dir):
        raise VlftError(f"{run_dir} holds no adapter ({ADAPTER_CONFIG}); full fine-tuning runs are already "
                        "plain checkpoints: load them directly")
    if is_virtual_token_run(run_dir):
        raise VlftError(f"{run_dir} trained virtual tokens (P-Tuning / prompt tuning): they are extra inputs placed "
                        "before every sequence, not a change of weights, so they cannot be merged into a checkpoint. "
                        "vlft predict --model on the run loads them; PeftModel.from_pretrained loads the adapter too")
    base = base_model_of(run_dir, base_model)
    model, family = load_model(base, dtype=dtype if dtype != "auto" else "fp32")

    saved = read_non_lora(run_dir)
    expected = expected_non_lora(run_dir, saved)
    params = dict(model.named_parameters())
    unexpected = sorted(k for k in saved if k not in params)
    surplus = sorted(k for k in saved if k in params and expected is not None and k not in expected)
    missing = sorted(expected - set(saved)) if expected is not None else []
    problems = []
    if missing:
        problems.append(f"trained weights missing from {NON_LORA_FILE}: {', '.join(missing[:8])}"
                        + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{NON_LORA_FILE} holds weights this model does not have: {', '.join(unexpected[:8])}")
    if surplus:
        problems.append(f"{NON_LORA_FILE} holds weights that {TRAINED_FILE} says did not train: {', '.join(surplus[:8])}")
    if problems:
        raise VlftError(f"cannot merge {run_dir} into {base}:\n  - " + "\n  - ".join(problems)
                        + "\nIs --base_model the model this run was trained from?")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].dtype))

    config = LoraConfig.from_pretrained(str(run_dir))
    config.inference_mode = True
    adapter = read_adapter(run_dir)
    if mutates_base(config.init_lora_weights):
        config, adapter = plain_lora_of(model, run_dir, config, adapter)
    peft_model = wrap_peft(model, config)
    result = set_peft_model_state_dict(peft_model, adapter)
    if result.unexpected_keys:
        raise VlftError(f"{run_dir}/{ADAPTER_WEIGHTS} holds keys the model has no place for: "
                        f"{', '.join(sorted(result.unexpected_keys)[:8])}")
    missing_lora = sorted(k for k in result.missing_keys if ".lora_" in k)
    if missing_lora:
        raise VlftError(f"{run_dir}/{ADAPTER_WEIGHTS} lacks adapter weights: {', '.join(missing_lora[:8])}")
    check_adapted_targets(run_dir, peft_model)
    if dtype not in ("auto", "fp32"):
        peft_model.to(DTYPES[dtype])
    return peft_model.eval(), family, base


def check_adapted_targets(run_dir: Path, peft_model) -> None:
    """What the adapter config adapts (modules, and routed-expert parameters through target_parameters) must be what
    the run recorded as adapted in vlft_trained.json; a run saved before that record is taken as it is."""
    trained = read_trained(run_dir)
    if trained is None:
        return
    recorded, built = set(trained["lora_modules"]), set(adapted_targets(peft_model))
    if recorded != built:
        raise VlftError(f"{run_dir}: its {ADAPTER_CONFIG} adapts other targets than {TRAINED_FILE} records (only in the "
                        f"record: {sorted(recorded - built)[:4]}; only in the config: {sorted(built - recorded)[:4]}); "
                        "the run directory was changed after training")


def plain_lora_of(model, run_dir: Path, config, adapter: dict):
    """A PiSSA / OLoRA run's adapter as a plain LoRA adapter of the *original* weights: (config, tensors).

    Training ran on residual weights W_res = W - s B0 A0 with the adapter started at (A0, B0), so the trained model is
    W_res + s B A = W + s (B A - B0 A0): a LoRA update of rank 2r, A' = [A; A0], B' = [B, -B0] (PEFT's
    `subtract_mutated_init`). PEFT computes it in `save_pretrained(path_initial_model_for_weight_conversion=...)`
    from the initial adapter the run saved (INITIAL_ADAPTER); this does that in a scratch directory (PEFT writes a
    config into the initial adapter's folder, and the run is never written to), on `model` wrapped with plain LoRA
    (the conversion reads only adapter tensors), then takes the wrapping off again. `model` is left as it came."""
    import copy

    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from vlft.models.lora import wrap_peft

    initial = run_dir / INITIAL_ADAPTER
    if not (initial / ADAPTER_WEIGHTS).is_file():
        raise VlftError(f"cannot merge {run_dir}: it trained with --init_lora_weights {config.init_lora_weights}, which "
                        f"changes the base weights, and its {INITIAL_ADAPTER}/ (the adapter as created, needed to undo "
                        "that change) is missing; its adapter only fits the residual weights of that run")
    scratch_config = copy.deepcopy(config)
    scratch_config.init_lora_weights = True  # the original weights stay untouched
    with tempfile.TemporaryDirectory(prefix="vlft-convert-") as tmp:
        shutil.copytree(initial, Path(tmp) / INITIAL_ADAPTER)
        scratch = wrap_peft(model, scratch_config)
        result = set_peft_model_state_dict(scratch, adapter)
        if result.unexpected_keys:
            raise VlftError(f"{run_dir}/{ADAPTER_WEIGHTS} holds keys the model has no place for: "
                            f"{', '.join(sorted(result.unexpected_keys)[:8])}")
        scratch.save_pretrained(str(Path(tmp) / "converted"),
                                path_initial_model_for_weight_conversion=str(Path(tmp) / INITIAL_ADAPTER))
        scratch.unload()
        converted = Path(tmp) / "converted"
        plain = LoraConfig.from_pretrained(str(converted))
        tensors = load_file(str(converted / ADAPTER_WEIGHTS))
    plain.inference_mode = True
    log(f"{run_dir}: {config.init_lora_weights} adapter converted to plain LoRA of rank {plain.r} on the original weights")
    return plain, tensors


def save_processor(run_dir: Path, out: Path, family) -> None:
    """The run's processor into `out`, with the media settings training used (vlft/data/processor_media.py) and
    their record (MEDIA_FILE) for vlft's own predict. The run's saved processor carries them already; applying
    the settings of its vlft_args.json again also serves runs saved before it did."""
    from transformers import AutoProcessor

    from vlft.data.processor_media import apply_media_settings, media_settings_from_args, write_media_record

    processor = AutoProcessor.from_pretrained(str(run_dir))
    run_args = read_run_args(run_dir)
    media = media_settings_from_args(run_args, family)
    # the reasoning flags that decide prompts (data/reasoning.py), when training set them
    thinking = {k: run_args[k] for k in ("enable_thinking", "preserve_thinking") if run_args.get(k) is not None}
    if media is None:
        log(f"{run_dir} records no media settings ({ARGS_FILE}): the processor is copied as it is, with its own "
            "pixel budgets")
    else:
        apply_media_settings(processor, media)
        write_media_record(out, media, thinking)
    processor.save_pretrained(out)


def merge(adapter: str, output: str, *, base_model: str | None = None, dtype: str = "auto",
          overwrite: bool = False) -> Path:
    import torch

    from vlft.models.loading import DTYPES, set_use_cache

    run_dir, out = Path(adapter), Path(output)
    if out.exists() and not overwrite:
        raise VlftError(f"--output {out} already exists; nothing was changed. Choose a new directory or pass "
                        "--overwrite to replace it")
    # Merge in fp32 whatever the target dtype (also for QLoRA runs: the adapter is folded into the
    # full-precision base), then cast once.
    peft_model, family, base = load_adapted_model(run_dir, base_model=base_model, dtype="fp32")
    merged = peft_model.merge_and_unload()
    if dtype == "auto":
        from transformers import AutoConfig

        target = getattr(AutoConfig.from_pretrained(base), "dtype", None) or torch.float32
        target = getattr(torch, target) if isinstance(target, str) else target
    else:
        target = DTYPES[dtype]
    merged.to(target)
    set_use_cache(merged, True)  # training switched it off; serving wants it

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, max_shard_size="5GB")
        carry_extra_tensors(base, tmp, family.extra_checkpoint_prefixes)  # e.g. Qwen3.5's mtp.*, dropped on load
        save_processor(run_dir, tmp, family)
        readable_by_all(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"merged {run_dir} with its base model {base} (left unchanged) -> {out} ({family.model_type}, "
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
