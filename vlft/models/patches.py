"""Every monkey patch of vlft lives here.

Each patch changes one model *instance* (never a class or a module global, so two models in one
process do not affect each other), says why it exists and which library versions it targets, and has
a test against the unpatched forward in `tests/models/test_patches.py`.

Liger kernels (`apply_liger`)
    Why: Liger's fused kernels cut activation memory (the fused linear cross-entropy never builds the
    `tokens x vocab` logits, which for Qwen's 151,936-token vocabulary is the largest tensor of a step)
    and speed up RMSNorm and the SwiGLU MLP.
    Why not `liger_kernel.transformers.apply_liger_kernel_to_qwen2_vl` and its 2.5/3 siblings: with
    liger-kernel <= 0.8.5 they raise `ImportError: cannot import name 'LigerQwen2VLCausalLMOutputWithPast'`
    on transformers >= 5.23, and they patch classes and module globals. We use only Liger's building blocks
    (`LigerRMSNormFunction`, `LigerSiLUMulFunction`, `LigerFusedLinearCrossEntropyLoss`, called with their
    long-standing leading arguments only) and patch the language model of one
    `Qwen*VLForConditionalGeneration` the same way for the three families.
    Targets: transformers 5.17-5.24 (the forward is `outputs = self.model(...)`, `logits =
    self.lm_head(slice_logits_to_keep(outputs[0]))`, `loss = ForCausalLMLoss(...)`); liger-kernel >= 0.6,
    read against 0.8.5.

    The patching code takes its kernels as arguments (`Kernels`), so the very same code runs on the CPU
    with the plain torch kernels of `TORCH_KERNELS`, which is how the tests prove it exact.

Frozen vision tower without an autograd graph (`skip_frozen_vision_graph`)
    Why: with activation checkpointing on, transformers 5 (`_activation_checkpointing_enable`, 5.17-5.24)
    calls `enable_input_require_grads()`, which hooks the input embeddings of every sub-model, the vision
    tower's `patch_embed` included. A frozen tower then records a full autograd graph and is checkpointed and
    recomputed in the backward pass for nothing (2U1 and most peers pay this). When no parameter of the tower
    (merger excluded) trains, each vision block runs under `torch.no_grad()` and is not checkpointed
    (`uncheckpoint_frozen_blocks`, called once the Trainer has enabled checkpointing). Loss and gradients
    are unchanged: nothing below the merger has a gradient to compute.

Packed sequences (`packed_positions`)
    Why: with `--packing` a row holds several records back to back. Qwen-VL's mRoPE positions must restart
    for every record and be computed per record (images and videos advance them by their grids), and
    attention must not cross records. transformers 5.2x builds a block-diagonal mask itself when the language
    model gets 4-row position ids ([text, t, h, w]) whose text row restarts at 0 and no attention mask (and no
    cache). The collator sends `pack_layout` (tokens, images, videos per record); this patch turns it into
    those position ids with the model's own `get_rope_index`, record by record, before the forward runs.

uint8 pixels, normalised on the device (`normalize_pixels_on_device`)
    Why: the training dataset sends images and video frames as uint8 patch rows (data/pixels.py: 4x fewer
    bytes through the DataLoader, shared memory and the host-to-device copy, and no float pass on the CPU).
    A forward pre-hook on the inner `Qwen*VLModel` turns uint8 `pixel_values` / `pixel_values_videos` into
    the processor's float32 values (its `image_mean`, `image_std`, `rescale_factor`) on whatever device they
    arrived; float inputs pass untouched, so `predict`, `generate` and callers that use the processor still
    work. The inner model, not the top-level one: PEFT calls the top-level `forward` directly, which skips
    that module's hooks, while the top-level forward calls the inner model as a module. The Trainer moves
    uint8 tensors to the device without casting them (only floating tensors follow the DeepSpeed dtype), and
    the vision tower casts the float32 result to its own dtype, as it does with the processor's output.

Checkpoint key names after a ZeRO-3 load (`fix_zero3_weight_conversions`)
    Why: `from_pretrained` remembers the key renamings it applied, and `save_pretrained` reverses them so a
    saved checkpoint keeps the original key names. The regular load path (transformers 5.2x) keeps only the
    renamings that matched a key; the ZeRO-3 path keeps every registered one, and reversing the unused
    prefix changes writes `model.model.layers.*` instead of `model.layers.*`: a checkpoint that other tools
    (and a later merge) do not read as the same model. Keep only the renamings that were used.

Vision input gradients for adapted frozen towers (`vision_input_require_grads`)
    Why: reentrant activation checkpointing only back-propagates into a checkpointed block when one of its
    inputs requires grad. transformers hooks the vision `patch_embed` for that in Qwen2-VL and Qwen2.5-VL
    (their vision models set `_input_embed_layer = "patch_embed"`), but not in Qwen3-VL (5.17-5.24): there,
    LoRA on the vision blocks silently gets no gradient and torch warns "None of the inputs have
    requires_grad". The hook marks the patch-embedding output as requiring grad when vision blocks train
    but the patch embedding does not.
"""
from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlft.constants import IGNORE_INDEX
from vlft.errors import VlftError
from vlft.utils import log

# Attributes that vlft sets on patched modules.
_KERNEL = "_vlft_kernel"  # the kernel a patched norm / MLP / forward calls
_ORIGINAL_FORWARD = "_vlft_original_forward"  # the top-level forward the fused loss wraps
_APPLIED = "_vlft_kernels"  # name of the kernel set on the model ("liger", "torch")
_PATCH_TAG = "_vlft_patch"  # set on our forward functions: which patch they are


# ---------------------------------------------------------------- kernels


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm, exactly Qwen's (Llama casting: statistics in fp32, scale in the input dtype)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


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
    rms_norm: Callable  # (x, weight, eps) -> y, Llama casting, offset 0
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

    def rms_norm(x, weight, eps):
        # offset 0 and casting "llama" are what Liger's own Qwen2-VL and Qwen3-VL patches use. in_place=False:
        # in-place would overwrite the incoming gradient buffer, which autograd may share with another branch
        # (Liger turns it off for Gemma2 for that reason); the memory it saves is one transient activation.
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    def silu_mul(gate, up):
        return LigerSiLUMulFunction.apply(gate, up)

    def linear_cross_entropy_sum(weight, hidden, labels, bias, ignore_index):
        return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(weight, hidden, labels, bias)

    return Kernels("liger", rms_norm, silu_mul, linear_cross_entropy_sum)


# ---------------------------------------------------------------- finding the parts


def unwrap_model(model) -> nn.Module:
    """The `Qwen*VLForConditionalGeneration` inside a PEFT wrapper (or the model itself). Patching it is
    enough: PEFT's forward ends in this instance's `forward`."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _language_model(model) -> nn.Module:
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if not isinstance(language_model, nn.Module) or not isinstance(getattr(model, "lm_head", None), nn.Module):
        raise VlftError(
            f"{type(model).__name__} has no `model.language_model` and `lm_head`; Liger kernels are applied to "
            "Qwen2-VL, Qwen2.5-VL and Qwen3-VL *ForConditionalGeneration models (transformers >= 5)"
        )
    return language_model


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def _bind(module: nn.Module, forward: Callable, kernel: Callable) -> None:
    # Replacing, not wrapping, the forward: applying twice cannot stack, and the class forward stays intact.
    setattr(module, _KERNEL, kernel)
    module.forward = types.MethodType(forward, module)


# ---------------------------------------------------------------- RMSNorm and SwiGLU


def _rms_norm_forward(self, hidden_states):
    return getattr(self, _KERNEL)(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    # Calls the projection submodules (not their weights), so PEFT LoRA layers on them keep working.
    return self.down_proj(getattr(self, _KERNEL)(self.gate_proj(x), self.up_proj(x)))


_rms_norm_forward._vlft_patch = "rms_norm"
_swiglu_forward._vlft_patch = "swiglu"


def patch_rms_norms(model, rms_norm: Callable) -> int:
    """Route every RMSNorm of the language model (layer norms, final norm, Qwen3's q/k norms) through
    `rms_norm(x, weight, eps)`. The vision tower is left alone. Returns how many were patched."""
    modules = [m for m in _language_model(unwrap_model(model)).modules() if _is_rms_norm(m)]
    for module in modules:
        _bind(module, _rms_norm_forward, rms_norm)
    return len(modules)


def patch_swiglu_mlps(model, silu_mul: Callable) -> int:
    """Route every SiLU-gated MLP of the language model through `down(silu_mul(gate(x), up(x)))`.
    Returns how many were patched."""
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
    return type(out)(loss=loss, **fields)


def patch_fused_lm_loss(model, linear_cross_entropy_sum: Callable) -> None:
    """Replace the training loss of a `*ForConditionalGeneration` instance by
    `linear_cross_entropy_sum(lm_head.weight, hidden_2d, labels_1d, lm_head.bias, ignore_index)`, normalised
    exactly as transformers' `ForCausalLMLoss` does (mean over non-ignored tokens, or sum / `num_items_in_batch`
    when the Trainer passes it). The output has `loss` and `logits=None`.

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
    """Apply the three patches with one kernel set; returns how many modules each patched."""
    base = unwrap_model(model)
    counts = {"rms_norm": patch_rms_norms(base, kernels.rms_norm), "swiglu": patch_swiglu_mlps(base, kernels.silu_mul)}
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
    log(f"Liger kernels on: RMSNorm x{counts['rms_norm']}, SwiGLU MLP x{counts['swiglu']}, "
        "fused linear cross-entropy (training logits are not materialised)")
    return True


def liger_applied(model) -> bool:
    return getattr(unwrap_model(model), _APPLIED, None) == "liger"


def patched_parts(model) -> dict[str, list[str]]:
    """Names of the modules whose forward a vlft patch replaced, by patch ('rms_norm', 'swiglu',
    'fused_lm_loss'); for tests and for the CLI to report."""
    parts: dict[str, list[str]] = {}
    for name, module in unwrap_model(model).named_modules():
        forward = module.__dict__.get("forward")
        tag = getattr(getattr(forward, "__func__", None), _PATCH_TAG, None)
        if tag is not None:
            parts.setdefault(tag, []).append(name)
    return parts


# ---------------------------------------------------------------- frozen vision tower

_FROZEN_BLOCK = "_vlft_frozen_block"


def _vision_blocks(model, family) -> list[nn.Module]:
    blocks = []
    for name, module in model.named_modules():
        found = family.layer_index(name)
        bare = name.removeprefix("base_model.model.")
        if found and found[0] == "vision" and bare == f"{family.vision_blocks_prefix}{found[1]}":
            blocks.append(module)
    return blocks


def _no_grad_forward(self, *args, **kwargs):
    with torch.no_grad():
        return self.__dict__[_ORIGINAL_FORWARD](*args, **kwargs)


_no_grad_forward._vlft_patch = "frozen_vision"


def skip_frozen_vision_graph(model, family) -> int:
    """Run the vision blocks without autograd when nothing in them trains (see the module docstring).
    Returns the number of blocks patched (0 when some tower parameter or vision LoRA trains)."""
    if any(p.requires_grad for n, p in model.named_parameters() if family.part_of(n) == "vision"):
        return 0
    blocks = _vision_blocks(model, family)
    for block in blocks:
        if getattr(block, _FROZEN_BLOCK, False):
            continue
        block.__dict__[_ORIGINAL_FORWARD] = block.forward
        block.forward = types.MethodType(_no_grad_forward, block)
        setattr(block, _FROZEN_BLOCK, True)
    uncheckpoint_frozen_blocks(model)
    return len(blocks)


def uncheckpoint_frozen_blocks(model) -> int:
    """Turn activation checkpointing off again in patched frozen blocks: enabling it on the whole model
    (the Trainer does so at the start of `train()`) reaches them too, and checkpointing a block that builds
    no graph only costs a recomputation (and, with reentrant checkpointing, warns or fails)."""
    n = 0
    for module in model.modules():
        if getattr(module, _FROZEN_BLOCK, False) and getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
            n += 1
    return n


_INPUT_GRAD_HOOK = "_vlft_input_grad_hook"


def _require_grad_output(module, args, output):
    return output.requires_grad_(True) if torch.is_tensor(output) and not output.requires_grad else output


def vision_input_require_grads(model, family) -> bool:
    """Hook the vision patch embedding so checkpointed vision blocks see an input that requires grad, when
    something in the blocks trains (LoRA, unfrozen blocks) but the patch embedding itself is frozen."""
    patch_embed = family.patch_embed(model)
    if patch_embed is None:
        return False
    blocks_train = any(p.requires_grad for n, p in model.named_parameters() if family.part_of(n) == "vision"
                       and not n.removeprefix("base_model.model.").startswith(family.patch_embed_prefix))
    embed_trains = any(p.requires_grad for p in patch_embed.parameters())
    if not blocks_train or embed_trains or getattr(patch_embed, _INPUT_GRAD_HOOK, None) is not None:
        return False
    setattr(patch_embed, _INPUT_GRAD_HOOK, patch_embed.register_forward_hook(_require_grad_output))
    return True


def fix_zero3_weight_conversions(model) -> bool:
    """Drop the key renamings a ZeRO-3 load recorded without using them (see the module docstring)."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions or not all(hasattr(c, "was_used") for c in conversions):
        return False
    used = [c for c in conversions if c.was_used()]
    if len(used) == len(conversions):
        return False
    model._weight_conversions = used
    return True


# ---------------------------------------------------------------- packed sequences

_PACKED = "_vlft_packed_original_forward"


def pack_position_ids(inner, input_ids, layout, *, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                      second_per_grid_ts=None) -> torch.Tensor:
    """[4, B, L] position ids for packed rows: text positions restarting at 0 per record, then the model's
    own mRoPE (t, h, w) positions computed for each record alone."""
    accepted = inspect.signature(inner.get_rope_index).parameters
    batch, length = input_ids.shape
    out = torch.zeros((4, batch, length), dtype=torch.long, device=input_ids.device)
    image_at = video_at = 0
    for b in range(batch):
        start = 0
        for n_tokens, n_images, n_videos, _ in layout[b].tolist():
            if n_tokens == 0:
                break
            end = start + n_tokens
            out[0, b, start:end] = torch.arange(n_tokens, device=input_ids.device)
            kwargs = {"attention_mask": torch.ones((1, n_tokens), dtype=torch.long, device=input_ids.device)}
            if mm_token_type_ids is not None:
                kwargs["mm_token_type_ids"] = mm_token_type_ids[b:b + 1, start:end]
            if n_images:
                kwargs["image_grid_thw"] = image_grid_thw[image_at:image_at + n_images]
            if n_videos:
                kwargs["video_grid_thw"] = video_grid_thw[video_at:video_at + n_videos]
                if second_per_grid_ts is not None:
                    kwargs["second_per_grid_ts"] = second_per_grid_ts[video_at:video_at + n_videos]
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
            rope, _ = inner.get_rope_index(input_ids[b:b + 1, start:end], **kwargs)
            out[1:, b, start:end] = rope[:, 0]
            image_at += n_images
            video_at += n_videos
            start = end
    return out


def _packed_forward(self, *args, **kwargs):
    layout = kwargs.pop("pack_layout", None)
    if layout is None:
        return self.__dict__[_PACKED](*args, **kwargs)
    kwargs["position_ids"] = pack_position_ids(
        self, kwargs["input_ids"], layout, mm_token_type_ids=kwargs.get("mm_token_type_ids"),
        image_grid_thw=kwargs.get("image_grid_thw"), video_grid_thw=kwargs.get("video_grid_thw"),
        second_per_grid_ts=kwargs.get("second_per_grid_ts"))
    kwargs["attention_mask"] = None  # the mask comes from the text positions: block-diagonal
    kwargs["use_cache"] = False  # with a cache transformers would not look for packed sequences
    return self.__dict__[_PACKED](*args, **kwargs)


_PIXEL_NORM = "_vlft_pixel_norm"  # on the inner Qwen*VLModel: the hook handle of normalize_pixels_on_device


def normalize_pixels_on_device(model, image_norm: Callable, video_norm: Callable) -> bool:
    """Let the model take uint8 patch rows (see the module docstring); `image_norm` / `video_norm` map them to
    float32 (data/pixels.py: `PixelNorm`). Idempotent."""
    inner = unwrap_model(model).model
    if _PIXEL_NORM in inner.__dict__:
        return False

    def hook(module, args, kwargs):
        for key, norm in (("pixel_values", image_norm), ("pixel_values_videos", video_norm)):
            value = kwargs.get(key)
            if value is not None and value.dtype == torch.uint8:
                kwargs[key] = norm(value)
        return args, kwargs

    inner.__dict__[_PIXEL_NORM] = inner.register_forward_pre_hook(hook, with_kwargs=True)
    return True


def packed_positions(model) -> bool:
    """Let the inner `Qwen*VLModel` accept `pack_layout` (see the module docstring). Idempotent."""
    inner = unwrap_model(model).model
    if _PACKED in inner.__dict__:
        return False
    original = inner.forward
    inner.__dict__[_PACKED] = original

    def forward(self, *args, **kwargs):
        return _packed_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, getattr(original, "__func__", original))
    forward._vlft_patch = "packed_positions"
    inner.forward = types.MethodType(forward, inner)
    return True
