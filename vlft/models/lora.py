"""LoRA / DoRA on the language model and/or the vision blocks, with exact module names.

Targets are full module names (never bare suffixes: in Qwen2.5-VL the vision MLP has the same
names as the LLM's), so PEFT matches exactly what is listed here and nothing else. The vision
patch embedding (a Conv3d) and the merger never get LoRA: the merger trains fully or not at all.

Language model: every nn.Linear of the decoder layers (PEFT's "all-linear" without the head), except:
- Qwen3.5's Gated DeltaNet layers: `in_proj_qkv`, `in_proj_z` and `out_proj` get LoRA; `in_proj_a` and `in_proj_b`
  (`_PER_HEAD_PROJECTIONS`) do not. They give one value per value head (32-64 in the released sizes): the decay
  step and the write strength of the delta rule, as Mamba's `dt_proj` gives its step. A rank-r adapter on them is
  no low-rank restriction at the usual ranks (r >= their width: more parameters than the weight itself), and the
  recurrence is sensitive to them: on the tiny Qwen3.5 the adapter model and its merge (weights float32 rounding
  apart) differ by 2-4e-4 in the logits with adapters there, 2e-5 without. Peers leave them out too (axolotl's
  Qwen3.5 example: in_proj_qkv, in_proj_z, out_proj; PEFT's Mamba examples leave out dt_proj). The depthwise
  `conv1d` (nn.Conv1d) never gets LoRA.
- Mixture-of-experts families (Family.moe): the routed experts are fused 3-D parameters, not nn.Linear; LoRA
  reaches them through PEFT's `target_parameters` (one adapter of rank r per expert), unless
  --lora_target_experts false. The router and Qwen3.5-MoE's shared-expert gate (MoELayout.gates; the gate is an
  nn.Linear of width 1) never get LoRA: they stay frozen under LoRA, or train fully with --train_router.
"""
from __future__ import annotations

import re
import warnings

from torch import nn

from vlft.errors import VlftError
from vlft.models.freezing import is_moe_gate, layer_relative
from vlft.models.registry import Family

# Gated DeltaNet projections with one output per value head (see the module docstring), relative to a decoder layer
_PER_HEAD_PROJECTIONS = ("linear_attn.in_proj_a", "linear_attn.in_proj_b")


def _excluded(name: str, patterns: list[str]) -> bool:
    """True when a pattern equals a run of whole dotted parts of the name ('layers.1' does not hit 'layers.11')."""
    dotted = f".{name}."
    return any(f".{p.strip('.')}." in dotted for p in patterns)


def lora_targets(model, family: Family, *, llm: bool, vision: bool, exclude: list[str] | None = None,
                 num_llm_modules: int = -1, skip_layers: dict[str, set[int]] | None = None,
                 experts: bool = True) -> list[str]:
    """Full names of what to adapt, in the model's order: nn.Linear modules (bitsandbytes' quantised linears are
    nn.Linear too) and, with `experts` on a mixture-of-experts family, the routed experts' fused 3-D parameters
    (`...mlp.experts.gate_up_proj` [E, 2I, d], `...mlp.experts.down_proj` [E, d, I]; `apply_lora` hands those to
    PEFT's `target_parameters`). The MoE gates (router, shared-expert gate) and the Gated DeltaNet per-head
    projections (in_proj_a, in_proj_b) are never targets (module docstring).

    `skip_layers` ({'llm': {...}, 'vision': {...}}) holds layers that train fully (--unfreeze_topk_*):
    LoRA on them would be redundant. `num_llm_modules` keeps only the last N language-model targets (expert
    parameters count as targets). `exclude` patterns apply to expert parameters too (`experts`, `experts.down_proj`).
    Raises VlftError when a requested part has no target left.
    """
    exclude = exclude or []
    skip_layers = skip_layers or {}
    expert_params = set(family.moe.experts) if (experts and family.moe is not None) else set()
    llm_names, vision_names = [], []
    for name, module in model.named_modules():
        candidates = [name] if isinstance(module, nn.Linear) else []
        if expert_params and llm:
            candidates += [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)
                           if layer_relative(family, f"{name}.{p}") in expert_params]
        for target in candidates:
            if _excluded(target, exclude) or is_moe_gate(family, target) or \
                    layer_relative(family, target) in _PER_HEAD_PROJECTIONS:
                continue
            part = family.part_of(target)
            found = family.layer_index(target)
            if found and found[1] in skip_layers.get(found[0], set()):
                continue
            if llm and part == "llm":
                llm_names.append(target)
            elif vision and part == "vision" and \
                    not target.removeprefix("base_model.model.").startswith(family.patch_embed_prefix):
                vision_names.append(target)
    if num_llm_modules > 0:
        llm_names = llm_names[-num_llm_modules:]
    if llm and not llm_names:
        raise VlftError(f"--lora_enable found no linear layers in the language model ({family.llm_prefix})"
                        + _left_out_by(exclude, skip_layers.get("llm"), "--unfreeze_topk_llm"))
    if vision and not vision_names:
        raise VlftError(f"--vision_lora found no linear layers in the vision blocks ({family.vision_blocks_prefix})"
                        + _left_out_by(exclude, skip_layers.get("vision"), "--unfreeze_topk_vision"))
    return llm_names + vision_names


def _left_out_by(exclude: list[str], skipped: set[int] | None, topk_flag: str) -> str:
    """What left a part without LoRA targets, naming only the flags the run set."""
    reasons = [f"--lora_namespan_exclude {' '.join(exclude)}"] if exclude else []
    if skipped:
        reasons.append(f"{topk_flag} (its {len(skipped)} layer(s) train fully, without LoRA)")
    return (" after " + " and ".join(reasons) + "; exclude less") if reasons else ""


# --init_lora_weights values PEFT's LoraConfig runs on its own (no data pass, no extra config). The others it
# accepts (eva, corda, lora_ga: a pass over training data; loftq: a LoftQConfig and a quantised base; mica) need
# set-up vlft does not do, so they are refused by name rather than half-run.
_INIT_NAMED = ("gaussian", "orthogonal", "pissa", "olora")
_INIT_NEEDS_SETUP = ("eva", "corda", "lora_ga", "loftq", "mica")


def lora_init_value(text: str) -> bool | str:
    """The `init_lora_weights` of PEFT's LoraConfig for the flag's text: True / False, or PEFT's name of the method
    ('gaussian', 'orthogonal', 'pissa', 'pissa_niter_N' (N subspace iterations of the fast SVD), 'olora').
    Raises ValueError naming the accepted values."""
    low = str(text).strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in _INIT_NAMED or re.fullmatch(r"pissa_niter_\d+", low):
        return low
    if low in _INIT_NEEDS_SETUP:
        raise ValueError(f"--init_lora_weights {text}: PEFT's {low} initialisation needs set-up of its own (training data "
                         "passes or an extra config) that vlft does not run")
    raise ValueError(f"--init_lora_weights must be true, false, {', '.join(_INIT_NAMED)} or pissa_niter_N, got {text!r}")


def mutates_base(init) -> bool:
    """True for initialisations that move part of each adapted base weight into the adapter (PiSSA: its top-r
    singular values and vectors, arXiv 2404.02948; OLoRA: the QR decomposition's first r columns, arXiv 2406.01775):
    the trained model is then residual base + adapter, not base + adapter."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def apply_lora(model, *, targets: list[str], rank: int, alpha: int, dropout: float, bias: str = "none",
               use_dora: bool = False, use_rslora: bool = False, init_lora_weights: bool | str = True):
    """PEFT's LoRA on `targets` (`lora_targets`: module names, and expert parameter names that go to PEFT's
    `target_parameters`). `use_rslora` scales the update by alpha / sqrt(r) (rsLoRA, arXiv 2312.03732) instead
    of alpha / r; `init_lora_weights` is PEFT's (see `lora_init_value`).

    Dropout with expert parameters: PEFT's ParamWrapper refuses `lora_dropout` > 0 (dropout on the input cannot be
    factored out of a fused expert matmul), so the config is built with 0 and every nn.Linear adapter gets its
    nn.Dropout(`dropout`) afterwards: the experts' adapters run without dropout, the others with it. The saved
    adapter_config.json then says lora_dropout 0, which is what lets PEFT load it again (dropout does not act at
    inference). Raises VlftError for what PEFT cannot put on expert parameters (DoRA, PiSSA / OLoRA / orthogonal)."""
    from peft import LoraConfig

    parameters = set(dict(model.named_parameters()))
    target_parameters = [t for t in targets if t in parameters]
    target_modules = [t for t in targets if t not in parameters]
    if target_parameters:
        refused = expert_lora_refusal(use_dora=use_dora, init_lora_weights=init_lora_weights)
        if refused:
            raise VlftError(refused)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0 if target_parameters else dropout, bias=bias, use_dora=use_dora,
        task_type="CAUSAL_LM", target_modules=target_modules, target_parameters=target_parameters or None,
        use_rslora=use_rslora, init_lora_weights=init_lora_weights,
    )
    peft_model = wrap_peft(model, config)
    if target_parameters and dropout > 0:
        from peft.tuners.lora.layer import LoraLayer, ParamWrapper

        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
                for adapter in module.lora_dropout:
                    module.lora_dropout[adapter] = nn.Dropout(p=dropout)
    return peft_model


def expert_lora_refusal(*, use_dora: bool, init_lora_weights: bool | str) -> str | None:
    """Why PEFT 0.21 cannot put this LoRA on the routed experts' fused parameters (its ParamWrapper), or None.
    DoRA is refused by PEFT itself; PiSSA, OLoRA and orthogonal initialisation read the adapted module's `weight`,
    which the experts module does not have."""
    fix = "; add --lora_target_experts false to keep LoRA off the routed experts"
    if use_dora:
        return "--use_dora: PEFT's DoRA cannot adapt the routed experts' fused 3-D parameters" + fix
    if isinstance(init_lora_weights, str) and (mutates_base(init_lora_weights) or init_lora_weights == "orthogonal"):
        return (f"--init_lora_weights {init_lora_weights}: PEFT runs it on a module's weight matrix, which the routed "
                "experts' fused 3-D parameters are not" + fix)
    return None


def wrap_peft(model, config):
    """`peft.get_peft_model`, without the FutureWarning peft (<= 0.21) triggers by reading
    `model.is_gradient_checkpointing`, which transformers 5.2x deprecates: every LoRA run and every merge
    would print a warning about code the user does not own and cannot change."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, config)
