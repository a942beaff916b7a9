"""Liger kernels on the language model of one Qwen-VL model (`apply_liger`).

Why: Liger's fused kernels cut activation memory (the fused linear cross-entropy never builds the
`tokens x vocab` logits, which for Qwen's 151,936-token vocabulary is the largest tensor of a step)
and speed up RMSNorm and the SwiGLU MLP.

Why not `liger_kernel.transformers.apply_liger_kernel_to_qwen2_vl` and its 2.5/3 siblings: with
liger-kernel <= 0.8.5 they raise `ImportError: cannot import name 'LigerQwen2VLCausalLMOutputWithPast'`
on transformers >= 5.23, and they patch classes and module globals. We use only Liger's building blocks
(`LigerRMSNormFunction`, `LigerSiLUMulFunction`, `LigerFusedLinearCrossEntropyLoss`, called with their
long-standing leading arguments only) and patch the language model of one
`Qwen*VLForConditionalGeneration` / `Qwen3_5*ForConditionalGeneration` the same way for every family.

What runs where, per family:
- RMSNorm: every single-input RMSNorm of the language model. Which formula a norm computes is read from the
  module's own behaviour (`_norm_style`), not its name: Qwen2/2.5/3-VL(-MoE) compute `w * norm(x)` with the
  scale in the input dtype (Llama casting, Liger offset 0), Qwen3.5(-MoE) the zero-centred
  `((1 + w) * norm(x))` all in fp32 (Gemma casting, offset 1; the casting liger-kernel's own
  `apply_liger_kernel_to_qwen3_5` pairs with offset 1).
- Qwen3.5's gated norm of the linear-attention layers (`norm(x) * w * silu(gate)`, two inputs) stays on its
  torch forward: liger-kernel 0.8.5 has no gated RMSNorm kernel (its own Qwen3.5 patch leaves it too).
- SwiGLU: every dense SiLU-gated MLP: the decoder MLPs of dense families and Qwen3.5-MoE's shared expert. The
  routed experts (fused 3-D parameters) keep their own forward; Qwen3-VL-MoE has no dense MLP at all.
- Fused linear cross-entropy on the training loss; on MoE models with `text_config.output_router_logits`, the
  load-balancing term `router_aux_loss_coef * aux_loss` is added as the library forward adds it.

Targets: transformers 5.17-5.24 (the forward is `outputs = self.model(...)`, `logits =
self.lm_head(slice_logits_to_keep(outputs[0]))`, `loss = ForCausalLMLoss(...)`, and for MoE with
`output_router_logits`, `loss += router_aux_loss_coef * load_balancing_loss_func(outputs.router_logits, ...)`;
the Qwen3.5 and MoE parts read against 5.24); liger-kernel >= 0.6, read against 0.8.5.

The patching code takes its kernels as arguments (`Kernels`), so the very same code runs on the CPU
with the plain torch kernels of `TORCH_KERNELS`, which is how the tests prove it exact
(tests/models/test_patches.py).
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlft.constants import IGNORE_INDEX
from vlft.errors import VlftError
from vlft.models.patches._common import _ORIGINAL_FORWARD, unwrap_model
from vlft.utils import log

# Attributes that this patch sets on patched modules, besides `_ORIGINAL_FORWARD` (the top-level forward the
# fused loss wraps).
_KERNEL = "_vlft_kernel"  # the kernel a patched norm / MLP / forward calls
_APPLIED = "_vlft_kernels"  # name of the kernel set on the model ("liger", "torch")


# ---------------------------------------------------------------- kernels


LLAMA_CASTING = "llama"  # statistics in fp32, `w * x_normed.to(input dtype)` (Qwen2-VL ... Qwen3-VL-MoE)
GEMMA_CASTING = "gemma"  # everything in fp32, one cast back at the end (Qwen3.5's zero-centred norms)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                   casting: str = LLAMA_CASTING) -> torch.Tensor:
    """Reference RMSNorm `x / sqrt(mean(x**2, -1) + eps) * (offset + weight)` over the last axis; x [..., d],
    weight [d]; the output has x's shape (and, with Llama casting, the dtype of `weight * x`).

    casting: 'llama' (transformers' Qwen2RMSNorm ... Qwen3VLMoeTextRMSNorm: the scale is applied in the input
    dtype) or 'gemma' (transformers' Qwen3_5RMSNorm: `(x_normed * (offset + w.float())).type_as(x)`), the two
    modes of Liger's `LigerRMSNormFunction` of the same names. Raises ValueError for another casting."""
    if casting == GEMMA_CASTING:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return (normed * (offset + weight.float())).type_as(x)
    if casting != LLAMA_CASTING:
        raise ValueError(f"unknown RMSNorm casting {casting!r}; use {LLAMA_CASTING!r} or {GEMMA_CASTING!r}")
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight if offset == 0 else offset + weight) * x.to(dtype)


def torch_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Reference SwiGLU gating: silu(gate) * up."""
    return F.silu(gate) * up


def torch_linear_cross_entropy_sum(weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Reference for the fused kernel: summed cross-entropy of `hidden @ weight.T (+ bias)` over the tokens
    whose label is not `ignore_index`. Materialises the logits (fp32, as transformers' loss does)."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


@dataclass(frozen=True)
class Kernels:
    """One implementation of each op that the patches swap in."""

    name: str
    rms_norm: Callable  # (x, weight, eps, offset, casting) -> x / rms(x) * (offset + weight), see torch_rms_norm
    silu_mul: Callable  # (gate, up) -> silu(gate) * up
    linear_cross_entropy_sum: Callable  # (weight, hidden_2d, labels_1d, bias, ignore_index) -> summed loss


TORCH_KERNELS = Kernels("torch", torch_rms_norm, torch_silu_mul, torch_linear_cross_entropy_sum)


def liger_kernels() -> Kernels:
    """Liger's Triton kernels (imported here, not at module import: liger-kernel is an optional extra)."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        raise VlftError(
            f"--use_liger needs the liger-kernel package, which could not be imported ({err}). "
            "Install it with `pip install liger-kernel` (or `pip install vlft[gpu]`), or drop --use_liger."
        ) from None

    def rms_norm(x, weight, eps, offset, casting):
        # (offset 0, "llama") is what Liger's own Qwen2-VL and Qwen3-VL patches use, (1, "gemma") its Qwen3.5 ones.
        # in_place=False: in-place would overwrite the incoming gradient buffer, which autograd may share with
        # another branch (Liger turns it off for Gemma2 for that reason); it saves one transient activation.
        return LigerRMSNormFunction.apply(x, weight, eps, offset, casting, False)

    def silu_mul(gate, up):
        return LigerSiLUMulFunction.apply(gate, up)

    def linear_cross_entropy_sum(weight, hidden, labels, bias, ignore_index):
        return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(weight, hidden, labels, bias)

    return Kernels("liger", rms_norm, silu_mul, linear_cross_entropy_sum)


# ---------------------------------------------------------------- finding the parts


def _language_model(model) -> nn.Module:
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if not isinstance(language_model, nn.Module) or not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise VlftError(
            f"{type(model).__name__} has no `model.language_model` and `lm_head`; Liger kernels are applied to "
            "Qwen2-VL ... Qwen3.5 *ForConditionalGeneration models (transformers >= 5)"
        )
    return language_model


_EPS_NAMES = ("variance_epsilon", "eps")  # Qwen2 ... Qwen3-VL-MoE norms; Qwen3.5's
_PROBE_WIDTH = 8
_PROBE_EPS = 0.25  # large against mean(x**2) ~ 1, so a module that reads another epsilon fails the probe
# The casting each offset comes with in transformers' Qwen norms (and in liger-kernel's own Qwen patches): the
# zero-centred norms compute in fp32 throughout (transformers' Qwen3_5RMSNorm, "Llama does x.to(float16) * w
# whilst Qwen3_5 is (x * w).to(float16)"), the others scale in the input dtype. In fp32 the two are equal, so a
# probe cannot tell them apart; tests/models/test_patches.py checks the pairing on bf16 against the modules.
_CASTING_FOR_OFFSET = {0.0: LLAMA_CASTING, 1.0: GEMMA_CASTING}


def _norm_like(module: nn.Module) -> str | None:
    """The epsilon attribute of a module shaped like a norm (a 1-D `weight`, no bias, a float epsilon), or None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or getattr(module, "bias", None) is not None:
        return None
    return next((name for name in _EPS_NAMES if isinstance(getattr(module, name, None), float)), None)


def _probe_offset(cls: type, eps_name: str) -> float | None:
    """Run a fresh `cls(8)` (the module's own class forward, a known weight, epsilon and input; never the model's
    own instance, whose weights may be ZeRO-3 partitions and whose forward may already be ours) and return the
    offset c for which it computed `x / sqrt(mean(x**2) + eps) * (c + w)`, c in {0, 1}; None when it computes
    neither (a LayerNorm, a gated norm that needs a second input, a class that takes no width)."""
    try:
        probe = cls(_PROBE_WIDTH).to(device="cpu", dtype=torch.float32)
    except Exception:  # noqa: BLE001 - any constructor we cannot call is a module we leave alone
        return None
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(_PROBE_WIDTH, generator=gen)
    x = torch.randn(3, _PROBE_WIDTH, generator=gen)
    setattr(probe, eps_name, _PROBE_EPS)
    try:
        with torch.no_grad():
            probe.weight.copy_(weight)
            y = probe(x)
    except Exception:  # noqa: BLE001 - e.g. a forward that takes two inputs
        return None
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _PROBE_EPS)
    for offset in _CASTING_FOR_OFFSET:
        if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y, normed * (offset + weight),
                                                                                   atol=1e-5, rtol=1e-5):
            return offset
    return None


def _norm_style(module: nn.Module, cache: dict) -> tuple[str, float, str] | None:
    """(epsilon attribute, offset, casting) of an RMSNorm module, or None when it is not one that Liger's
    `rms_norm(x, weight, eps, offset, casting)` reproduces. Probed once per class (`cache`)."""
    eps_name = _norm_like(module)
    if eps_name is None:
        return None
    key = (type(module), eps_name)
    if key not in cache:
        offset = _probe_offset(type(module), eps_name)
        cache[key] = None if offset is None else (eps_name, offset, _CASTING_FOR_OFFSET[offset])
    return cache[key]


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def _bind(module: nn.Module, forward: Callable, kernel: Callable) -> None:
    # Replacing, not wrapping, the forward: applying twice cannot stack, and the class forward stays intact.
    setattr(module, _KERNEL, kernel)
    module.forward = types.MethodType(forward, module)


# ---------------------------------------------------------------- RMSNorm and SwiGLU


_NORM_STYLE = "_vlft_norm_style"  # (epsilon attribute, offset, casting) of a patched norm


def _rms_norm_forward(self, hidden_states):
    eps_name, offset, casting = getattr(self, _NORM_STYLE)
    return getattr(self, _KERNEL)(hidden_states, self.weight, getattr(self, eps_name), offset, casting)


def _swiglu_forward(self, x):
    # Calls the projection submodules (not their weights), so PEFT LoRA layers on them keep working.
    return self.down_proj(getattr(self, _KERNEL)(self.gate_proj(x), self.up_proj(x)))


_rms_norm_forward._vlft_patch = "rms_norm"
_swiglu_forward._vlft_patch = "swiglu"


def _rms_norms(model) -> tuple[list[tuple[nn.Module, tuple]], int]:
    """([(module, style)] of the language model's RMSNorms that `rms_norm` reproduces, number of other norm-shaped
    modules left alone, such as Qwen3.5's gated norms)."""
    cache: dict = {}
    found, left = [], 0
    for module in _language_model(unwrap_model(model)).modules():
        style = _norm_style(module, cache)
        if style is not None:
            found.append((module, style))
        elif _norm_like(module) is not None:
            left += 1
    return found, left


def patch_rms_norms(model, rms_norm: Callable) -> int:
    """Route every RMSNorm of the language model (layer norms, final norm, Qwen3's q/k norms) through
    `rms_norm(x, weight, eps, offset, casting)`, with the offset (0: `w * norm(x)`, 1: zero-centred
    `(1 + w) * norm(x)`) found by probing the module's class and the casting that goes with it. Norms that
    compute something else (Qwen3.5's gated norm) and the vision tower are left alone. Returns how many were
    patched."""
    modules, _ = _rms_norms(model)
    for module, style in modules:
        setattr(module, _NORM_STYLE, style)
        _bind(module, _rms_norm_forward, rms_norm)
    return len(modules)


def patch_swiglu_mlps(model, silu_mul: Callable) -> int:
    """Route every SiLU-gated MLP of the language model (modules with gate/up/down projections: dense decoder
    MLPs and Qwen3.5-MoE's shared expert; routed experts are fused 3-D parameters and keep their forward)
    through `down(silu_mul(gate(x), up(x)))`. Returns how many were patched (0 for Qwen3-VL-MoE)."""
    modules = [m for m in _language_model(unwrap_model(model)).modules() if _is_swiglu_mlp(m)]
    for module in modules:
        _bind(module, _swiglu_forward, silu_mul)
    return len(modules)


# ---------------------------------------------------------------- fused linear cross-entropy

_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log(message)


def _head_params(head: nn.Module):
    """(weight, bias) of a plain linear head, or None when the fused loss cannot use the head's weight
    directly and must let the head run itself: LoRA on lm_head, a quantised or a ZeRO-3-partitioned head."""
    linear = head
    if type(head).__name__ == "ModulesToSaveWrapper":  # PEFT's trainable copy; its attributes are the active copy's
        linear = getattr(head, "original_module", None)
    if not isinstance(linear, nn.Linear):
        return None
    weight = head.weight
    if not weight.is_floating_point() or hasattr(weight, "ds_id"):
        return None
    return weight, head.bias


def _fused_loss_forward(self, *args, **kwargs):
    original = getattr(self, _ORIGINAL_FORWARD)
    labels = kwargs.get("labels")
    keep = kwargs.get("logits_to_keep", 0)
    if (labels is None or not self.training  # generation, and evaluation (which may want the logits for metrics)
            or not (isinstance(keep, int) and keep == 0)  # the caller slices logits itself
            or kwargs.get("return_dict", getattr(self.config, "return_dict", True)) is False):
        return original(*args, **kwargs)
    head = _head_params(self.lm_head)
    if head is None:
        _log_once(f"fused linear cross-entropy is off for this run: the lm_head ({type(self.lm_head).__name__}) is "
                  "LoRA-wrapped, quantised or ZeRO-3-partitioned, so the logits are materialised as usual")
        return original(*args, **kwargs)
    weight, bias = head

    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)
    shift_labels = kwargs.get("shift_labels")
    num_items_in_batch = kwargs.get("num_items_in_batch")

    # Run the model's own forward (so every argument reaches `self.model` exactly as it would), without labels
    # and with no logit position kept, and take the hidden states from `self.model`'s output.
    captured = []
    hook = self.model.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=labels.device)
        out = original(*args, **kwargs)
    finally:
        hook.remove()
    model_out = captured[-1]
    hidden = getattr(model_out, "last_hidden_state", None)
    if hidden is None:
        hidden = model_out[0]

    # transformers' ForCausalLMLoss: token t predicts label t+1; the last position gets ignore_index.
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)
    targets = shift_labels.reshape(-1).to(weight.device)
    loss = getattr(self, _KERNEL)(weight, hidden, targets, bias, ignore_index)
    if num_items_in_batch is None:  # mean over the tokens that count
        loss = loss / (targets != ignore_index).sum()
    else:  # the Trainer's count over the whole accumulated batch
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)

    # Same output class (it differs between transformers versions), with the loss and without logits.
    fields = {key: value for key, value in out.items() if key not in ("loss", "logits")}
    aux_loss = _load_balancing_loss(self, model_out, original, args, kwargs)
    if aux_loss is not None:  # as the MoE forwards add it (text_config's coefficient, on the loss's device)
        loss = loss + self.config.text_config.router_aux_loss_coef * aux_loss.to(loss.device)
        fields["aux_loss"] = aux_loss
    return type(out)(loss=loss, **fields)


def _load_balancing_loss(model, model_out, original, args, kwargs) -> torch.Tensor | None:
    """The MoE load-balancing loss (a scalar) when the forward routed with `output_router_logits` (the argument,
    else `text_config.output_router_logits`), else None (always None for dense models).

    Computed as Qwen3VLMoe / Qwen3_5Moe ForConditionalGeneration.forward compute it (transformers 5.24): the
    model module's own `load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok,
    attention_mask)` on the router logits the decoder returned. Raises VlftError when routing is on but the
    decoder returned no router logits or the module has no such function (a transformers this was not read
    against), rather than drop the term silently."""
    text_config = getattr(model.config, "text_config", model.config)
    called = inspect.signature(original).bind_partial(*args, **kwargs).arguments
    output_router_logits = called.get("output_router_logits")
    if output_router_logits is None:
        output_router_logits = getattr(text_config, "output_router_logits", False)
    if not output_router_logits:
        return None
    router_logits = getattr(model_out, "router_logits", None)
    balance = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    if router_logits is None or balance is None:
        raise VlftError(f"{type(model).__name__} routes with output_router_logits, but vlft's fused loss cannot "
                        "compute its load-balancing loss with this transformers version; run without --use_liger or "
                        "without the router auxiliary loss")
    return balance(router_logits, text_config.num_experts, text_config.num_experts_per_tok, called.get("attention_mask"))


def patch_fused_lm_loss(model, linear_cross_entropy_sum: Callable) -> None:
    """Replace the training loss of a `*ForConditionalGeneration` instance by
    `linear_cross_entropy_sum(lm_head.weight, hidden_2d, labels_1d, lm_head.bias, ignore_index)`, normalised
    exactly as transformers' `ForCausalLMLoss` does (mean over non-ignored tokens, or sum / `num_items_in_batch`
    when the Trainer passes it). The output has `loss` and `logits=None`. On MoE models that route with
    `output_router_logits` (argument or `text_config`), the loss includes `router_aux_loss_coef * aux_loss`
    and the output keeps `aux_loss` and `router_logits`, as the library forward's.

    Only training steps with labels change; without labels, in eval mode, with `logits_to_keep`, or
    `return_dict=False`, the original forward runs untouched. `inspect.signature(model.forward)` still shows
    the original parameters (the Trainer and the collator read them)."""
    base = unwrap_model(model)
    _language_model(base)
    if _ORIGINAL_FORWARD not in base.__dict__:
        original = base.forward
        if "logits_to_keep" not in inspect.signature(original).parameters:
            raise VlftError(f"{type(base).__name__}.forward takes no `logits_to_keep`; the fused loss needs "
                            "transformers >= 4.50 (vlft supports 5.17 and newer)")
        setattr(base, _ORIGINAL_FORWARD, original)
    original = getattr(base, _ORIGINAL_FORWARD)

    def forward(self, *args, **kwargs):
        return _fused_loss_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, getattr(original, "__func__", original))
    forward._vlft_patch = "fused_lm_loss"
    _bind(base, forward, linear_cross_entropy_sum)


# ---------------------------------------------------------------- entry points


def apply_kernels(model, kernels: Kernels) -> dict[str, int]:
    """Apply the three patches with one kernel set; returns how many modules each patched ('rms_norm',
    'swiglu') and how many norm-shaped modules stay on their torch forward ('norms_left': Qwen3.5's gated
    norms, one per linear-attention layer)."""
    base = unwrap_model(model)
    counts = {"rms_norm": patch_rms_norms(base, kernels.rms_norm), "swiglu": patch_swiglu_mlps(base, kernels.silu_mul),
              "norms_left": _rms_norms(base)[1]}
    patch_fused_lm_loss(base, kernels.linear_cross_entropy_sum)
    setattr(base, _APPLIED, kernels.name)
    return counts


def _runs_on_cuda(model: nn.Module) -> bool:
    devices = {p.device.type for p in model.parameters()}
    # A model still on the CPU is moved to the GPU by the Trainer (or DeepSpeed) when there is one.
    return "cuda" in devices or (devices <= {"cpu"} and torch.cuda.is_available())


def apply_liger(model, *, force: bool = False) -> bool:
    """Liger's RMSNorm, SwiGLU and fused linear cross-entropy kernels on the language model of a Qwen-VL
    model (bare or PEFT-wrapped, before or after wrapping). Returns True when applied.

    Liger's kernels run only on a CUDA GPU: when the model is not on one and none is available, nothing is
    patched, one line is logged and False is returned, unless `force` (used by tests to check the patch
    without running it). Applying twice is the same as applying once."""
    base = unwrap_model(model)
    _language_model(base)
    kernels = liger_kernels()
    if not force and not _runs_on_cuda(base):
        device = next(base.parameters()).device
        log(f"Liger kernels need a CUDA GPU; the model is on {device} and no GPU is available, so --use_liger is "
            "skipped (training runs unchanged, without Liger's memory and speed gains)")
        return False
    counts = apply_kernels(base, kernels)
    left = (f"; {counts['norms_left']} norms of another formula (Qwen3.5's gated RMSNorm, for which Liger has no "
            "kernel) stay on torch" if counts["norms_left"] else "")
    log(f"Liger kernels on: RMSNorm x{counts['rms_norm']}, SwiGLU MLP x{counts['swiglu']}, "
        f"fused linear cross-entropy (training logits are not materialised){left}")
    return True


def liger_applied(model) -> bool:
    """Whether `apply_liger` patched this model (the torch reference kernels of the tests do not count)."""
    return getattr(unwrap_model(model), _APPLIED, None) == "liger"
