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
             step (train/dpo_trainer.py), when the policy still is the starting model; no second model is kept.
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


def make_reference(prepared, *, load_copy, precompute: bool, zero_stage: int):
    """The reference for a prepared policy (train/setup.py's PreparedModel): AdaptersOff under LoRA, else a
    FrozenCopy from `load_copy()` (a callable loading the starting model like the policy), or None when
    the log-probs are precomputed and the policy at step 0 gives them (full fine-tuning). Under LoRA the
    AdaptersOff object is returned even with precompute: the reference pass runs through it.

    VlftError when LoRA trains other parameters fully under ZeRO-3 without --precompute_ref_log_probs."""
    from peft import PeftModel

    if isinstance(prepared.model, PeftModel):
        reference = AdaptersOff(prepared.model)
        if reference.snapshot and zero_stage == 3 and not precompute:
            names = sorted({n.split(".weight")[0].split(".bias")[0] for n in reference.snapshot})
            raise VlftError(
                f"under ZeRO-3, LoRA with fully trained parameters next to the adapters ({len(names)} module(s), e.g. "
                f"{names[0]}: --freeze_merger false, --unfreeze_topk_*, or --lora_bias) needs "
                "--precompute_ref_log_probs true: their starting values must stay the reference and ZeRO-3 keeps them "
                "as shards vlft cannot swap. Or freeze them (--freeze_merger true ...)")
        return reference
    if precompute:
        return None
    return FrozenCopy(load_copy())


def trained_next_to_lora(tune_args) -> list[str]:
    """The flags that make parameters train fully next to LoRA adapters (their starting values must stay the
    reference: train/reference.py); empty without LoRA."""
    t = tune_args
    if not t.any_lora:
        return []
    flags = []
    if not t.freeze_merger:
        flags.append("--freeze_merger false (the merger trains)")
    if not t.vision_frozen:
        flags.append("--freeze_vision_tower false")
    if not t.llm_frozen:
        flags.append("--freeze_llm false")
    if t.unfreeze_topk_llm or t.unfreeze_topk_vision:
        flags.append("--unfreeze_topk_llm / --unfreeze_topk_vision")
    if t.lora_bias != "none":
        flags.append(f"--lora_bias {t.lora_bias}")
    return flags
