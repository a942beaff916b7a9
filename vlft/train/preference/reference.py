"""The DPO reference policy: the model as training started, evaluated without gradients.

Three ways, chosen at start-up by `make_reference` (DPO, arXiv 2305.18290, needs pi_ref fixed for the whole run):

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
             step (train/dpo/trainer.py), when the policy still is the starting model; no second model is kept.
"""
from __future__ import annotations

import contextlib

from vlft.errors import VlftError
from vlft.models.freezing import is_lora_param


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
