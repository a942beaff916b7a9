"""LoRA / DoRA on the language model and/or the vision blocks, with exact module names.

Targets are full module names (never bare suffixes: in Qwen2.5-VL the vision MLP has the same
names as the LLM's), so PEFT matches exactly what is listed here and nothing else. The vision
patch embedding (a Conv3d) and the merger never get LoRA: the merger trains fully or not at all.
"""
from __future__ import annotations

import re
import warnings

from torch import nn

from vlft.errors import VlftError
from vlft.models.registry import Family


def _excluded(name: str, patterns: list[str]) -> bool:
    """True when a pattern equals a run of whole dotted parts of the name ('layers.1' does not hit 'layers.11')."""
    dotted = f".{name}."
    return any(f".{p.strip('.')}." in dotted for p in patterns)


def lora_targets(model, family: Family, *, llm: bool, vision: bool, exclude: list[str] | None = None,
                 num_llm_modules: int = -1, skip_layers: dict[str, set[int]] | None = None) -> list[str]:
    """Full names of the nn.Linear modules to adapt (bitsandbytes' quantised linears are nn.Linear too).

    `skip_layers` ({'llm': {...}, 'vision': {...}}) holds layers that train fully (--unfreeze_topk_*):
    LoRA on them would be redundant. `num_llm_modules` keeps only the last N language-model targets.
    """
    exclude = exclude or []
    skip_layers = skip_layers or {}
    llm_names, vision_names = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or _excluded(name, exclude):
            continue
        part = family.part_of(name)
        found = family.layer_index(name)
        if found and found[1] in skip_layers.get(found[0], set()):
            continue
        if llm and part == "llm":
            llm_names.append(name)
        elif vision and part == "vision" and not name.removeprefix("base_model.model.").startswith(family.patch_embed_prefix):
            vision_names.append(name)
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
    """PEFT's LoRA on `targets`. `use_rslora` scales the update by alpha / sqrt(r) (rsLoRA, arXiv 2312.03732) instead
    of alpha / r; `init_lora_weights` is PEFT's (see `lora_init_value`)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, bias=bias, use_dora=use_dora, task_type="CAUSAL_LM",
        target_modules=targets, use_rslora=use_rslora, init_lora_weights=init_lora_weights,
    )
    return wrap_peft(model, config)


def wrap_peft(model, config):
    """`peft.get_peft_model`, without the FutureWarning peft (<= 0.21) triggers by reading
    `model.is_gradient_checkpointing`, which transformers 5.2x deprecates: every LoRA run and every merge
    would print a warning about code the user does not own and cannot change."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        return get_peft_model(model, config)
