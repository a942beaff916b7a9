"""The reference policy of the preference stages: the model as training started, evaluated without gradients.

Three ways, chosen at start-up by `make_reference` (DPO, arXiv 2305.18290, and KTO, arXiv 2402.01306, need pi_ref
fixed for the whole run):

FrozenCopy   full fine-tuning: a second copy of the starting model, loaded like the policy (same dtype,
             attention, Liger kernels), frozen, in eval mode; under DeepSpeed wrapped in an inference engine
             (ZeRO-3 shards it like the policy). What TRL does.
AdaptersOff  LoRA / QLoRA: the policy itself with its adapters disabled (PEFT `disable_adapter`), which is the
             base model only if nothing else trains. Everything that trains fully next to the adapters (a merger,
             unfrozen blocks, biases under --lora_bias) is updated in place by the optimizer, so disabling the
             adapters alone would give a reference that drifts with training (2U1's DPO does exactly that). Their
             starting values are kept aside (`snapshot`) and swapped in for the reference forward, then swapped
             back: a pointer swap of `param.data`, no copy. Under ZeRO-3 the parameters are shards owned by
             DeepSpeed, so that combination needs --precompute_ref_log_probs (refused at start-up otherwise).
None         --precompute_ref_log_probs: the log-probs come from a cache computed before the first optimizer
             step (`ReferenceCache`, filled by train/preference/trainer.py), when the policy still is the starting
             model; no second model is kept. Also None for a reference-free loss (ORPO, SimPO, CPO): nothing is
             made, loaded or computed.

Every reference-based stage (DPO, KTO) takes its reference from here and its reference pass from
train/preference/trainer.py (`ReferenceTrainerMixin`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from vlft.errors import VlftError
from vlft.models.freezing import is_lora_param
from vlft.run_dir import REF_CACHE_DIR


class AdaptersOff:
    """See the module docstring. `snapshot`: name -> starting value of each fully trained parameter."""

    def __init__(self, model):
        self.model = model
        self.snapshot = {n: p.detach().clone() for n, p in model.named_parameters()
                         if p.requires_grad and not is_lora_param(n)}

    @contextlib.contextmanager
    def active(self, model=None):
        """Inside: the model computes the reference (adapters off, starting values of the fully trained parts)."""
        peft_model = self.model
        params = dict(peft_model.named_parameters())
        swapped = []
        try:
            for name, start in self.snapshot.items():
                param = params[name]
                current = param.data
                param.data = start
                swapped.append((param, current))
            with peft_model.disable_adapter():
                yield
        finally:
            for param, current in swapped:
                param.data = current

    def describe(self) -> str:
        extra = f", with the starting values of {len(self.snapshot)} fully trained tensor(s)" if self.snapshot else ""
        return f"reference: the model with its adapters disabled{extra}"


class FrozenCopy:
    """See the module docstring; `model` is the loaded copy, moved and wrapped by `prepare(trainer)`."""

    def __init__(self, model):
        self.model = model
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.prepared = None

    def prepare(self, trainer) -> None:
        if self.prepared is not None:
            return
        if trainer.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            self.prepared = prepare_deepspeed(self.model, trainer.accelerator)
        else:
            self.prepared = trainer.accelerator.prepare_model(self.model, evaluation_mode=True)

    def describe(self) -> str:
        return "reference: a frozen copy of the starting model"


def make_reference(prepared, *, load_copy, precompute: bool, zero_stage: int, can_precompute: bool = True):
    """The reference for a prepared policy (train/core/setup.py's PreparedModel): AdaptersOff under LoRA, else a
    FrozenCopy from `load_copy()` (a callable loading the starting model like the policy), or None when
    the log-probs are precomputed and the policy at step 0 gives them (full fine-tuning). Under LoRA the
    AdaptersOff object is returned even with precompute: the reference pass runs through it.

    VlftError when LoRA trains other parameters fully under ZeRO-3 without --precompute_ref_log_probs; its advice
    names that flag only where the stage has it (`can_precompute`: DPO, not GRPO)."""
    from peft import PeftModel

    if isinstance(prepared.model, PeftModel):
        reference = AdaptersOff(prepared.model)
        if reference.snapshot and zero_stage == 3 and not precompute:
            names = sorted({n.split(".weight")[0].split(".bias")[0] for n in reference.snapshot})
            trained = (f"LoRA with fully trained parameters next to the adapters ({len(names)} module(s), e.g. "
                       f"{names[0]}: the merger, --unfreeze_topk_*, or --lora_bias)")
            why = "their starting values must stay the reference and ZeRO-3 keeps them as shards vlft cannot swap"
            raise VlftError(f"under ZeRO-3, {trained} needs --precompute_ref_log_probs true: {why}. Or freeze them"
                            if can_precompute else
                            f"under ZeRO-3, {trained} cannot keep a reference: {why}. Freeze them, or use --beta 0")
        return reference
    if precompute:
        return None
    return FrozenCopy(load_copy())


def _trained_next_to_lora(tune_args) -> list[tuple[str, str]]:
    """(what makes parameters train fully next to LoRA adapters, the flag value that freezes them) per cause."""
    t = tune_args
    if not t.any_lora:
        return []
    causes = []
    if not t.freeze_merger:
        causes.append(("--freeze_merger false (the merger trains)", "--freeze_merger true"))
    if not t.vision_frozen:
        causes.append(("--freeze_vision_tower false", "--freeze_vision_tower true"))
    if not t.llm_frozen:
        causes.append(("--freeze_llm false", "--freeze_llm true"))
    if t.unfreeze_topk_llm:
        causes.append((f"--unfreeze_topk_llm {t.unfreeze_topk_llm}", "--unfreeze_topk_llm 0"))
    if t.unfreeze_topk_vision:
        causes.append((f"--unfreeze_topk_vision {t.unfreeze_topk_vision}", "--unfreeze_topk_vision 0"))
    if t.lora_bias != "none":
        causes.append((f"--lora_bias {t.lora_bias}", "--lora_bias none"))
    return causes


def trained_next_to_lora(tune_args) -> list[str]:
    """The flags that make parameters train fully next to LoRA adapters (their starting values must stay the
    reference: train/preference/reference.py); empty without LoRA."""
    return [cause for cause, _ in _trained_next_to_lora(tune_args)]


def freezing_flags(tune_args) -> str:
    """The flag values that would freeze what `trained_next_to_lora` lists, for a message: only those that differ
    from the run's own (a flag the run already has is never suggested)."""
    return " ".join(fix for _, fix in _trained_next_to_lora(tune_args))


class ReferenceCache:
    """Reference log-probs of every training item, `values` [n_rows, columns] float32 (nats; DPO: the chosen and the
    rejected answer of each pair, LD-weighted under --ld_alpha), in `<directory>/<run_dir.REF_CACHE_DIR>/<key>.pt`.
    The key (`reference_cache_key`) covers everything the values depend on: a file with this key holds exactly these
    values. --overwrite_output_dir removes the folder before anything loads (train/core/launch.py).

    `source` says where the values came from: "loaded" (`load`), "computed" (set by the filler), None while empty."""

    def __init__(self, directory: str | os.PathLike, key: str, n_rows: int, columns: int = 2):
        self.path = Path(directory) / REF_CACHE_DIR / f"{key}.pt"
        self.key = key
        self.n_rows = n_rows
        self.columns = columns
        self.values: torch.Tensor | None = None
        self.source: str | None = None  # "loaded" or "computed"

    def load(self) -> bool:
        """Read the file when it exists (True); False when there is none. VlftError, naming the file, when it holds
        another key's values or another shape than [n_rows, columns]."""
        if not self.path.is_file():
            return False
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if saved["key"] != self.key or tuple(saved["values"].shape) != (self.n_rows, self.columns):
            raise VlftError(f"{self.path} does not hold this run's reference log-probs; delete it to recompute")
        self.values, self.source = saved["values"], "loaded"
        return True

    def save(self, values: torch.Tensor) -> None:
        """Write `values` [n_rows, columns] atomically (a killed run never leaves half a file)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"key": self.key, "values": values.cpu()}, tmp)
        os.replace(tmp, self.path)


def reference_cache_key(*, data_path, data, media_sha256: str, model_id: str, media, thinking, chat_template: str | None,
                        model_args, tune_args, train_args, max_length: int, extra: dict,
                        stage: str | None = None) -> str:
    """What a stage's reference log-probs depend on, hashed (16 hex digits): the stage (`stage`, default
    `train_args.stage_name`: two stages never share a file), the data files' bytes (each with its #N / #p) and the
    records kept, in order (data/mixture.py `record_keys`: a mix's file of each record too), the media's contents
    record by record (`media_sha256`: train/core/checkpoints.py's `media_digest`; a changed --image_folder or a
    picture redrawn in place changes it), the tokenisation (the chat template's text and the reasoning flags
    `thinking` renders it with), the model's files (name, size, modification time; or the hub id), the weights
    dtype, quantisation and attention kernel, the media settings (pixel budgets, frame sampling), the length limit,
    and `extra`: the stage's own parts (JSON-able values; DPO: truncation mode and --ld_alpha).

    ValueError when no stage name is given and `train_args` has none."""
    from vlft.data.mixture import record_keys
    from vlft.train.core.checkpoints import data_digest

    stage = stage or getattr(train_args, "stage_name", None)
    if not stage:
        raise ValueError("reference_cache_key needs the stage's name (stage=, or train_args.stage_name)")
    model = Path(model_id)
    files = (sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model.iterdir() if p.is_file())
             if model.is_dir() else model_id)
    parts = {
        "stage": stage,
        "data": data_digest(data_path),  # each file (with its #N / #p), or every file of a dataset folder
        "records": record_keys(data),  # each record's file and index, in order, repeats included
        "media_files": media_sha256,
        "chat_template": hashlib.sha256((chat_template or "").encode()).hexdigest(),
        "thinking": thinking.template_kwargs(),
        "model": files,
        "dtype": "bf16" if train_args.bf16 else "fp16" if train_args.fp16 else "fp32",
        "quantisation": [tune_args.bits, tune_args.quant_type, tune_args.double_quant] if tune_args.bits < 16 else None,
        "attn": model_args.attn_implementation,
        "media": repr(media),
        "max_length": max_length,
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
