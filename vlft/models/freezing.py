"""Decide which parameters learn, and report it per part of the model."""
from __future__ import annotations

from vlft.errors import VlftError
from vlft.models.registry import Family

PARTS = ("vision", "merger", "llm", "head", "other")


def is_lora_param(name: str) -> bool:
    # PEFT's adapter tensors: lora_A / lora_B / lora_embedding_* / lora_magnitude_vector (DoRA), and the virtual
    # tokens' prompt encoder of P-Tuning / prompt tuning (models/virtual_tokens.py), saved in the adapter file too
    return ".lora_" in name or name.startswith("prompt_encoder.")


def layer_relative(family: Family, name: str) -> str | None:
    """The part of a parameter or module name after its decoder layer's prefix ('mlp.experts.down_proj' for
    'model.language_model.layers.3.mlp.experts.down_proj'), with PEFT's wrapper prefix and `base_layer` infixes
    removed; None outside the decoder layers."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if not name.startswith(family.llm_layers_prefix):
        return None
    index, _, rest = name[len(family.llm_layers_prefix):].partition(".")
    return rest if index.isdigit() else None


def is_moe_gate(family: Family, name: str) -> bool:
    """True for a mixture-of-experts gate (the router, the shared expert's gate: MoELayout.gates), the module or
    anything inside it; False on dense families."""
    rest = layer_relative(family, name) if family.moe is not None else None
    return rest is not None and any(rest == g or rest.startswith(g + ".") for g in family.moe.gates)


def is_expert_adapter(family: Family, name: str) -> bool:
    """True for a LoRA tensor on the routed experts' fused parameters (PEFT's ParamWrapper on `mlp.experts`)."""
    if family.moe is None or ".lora_" not in name:
        return False
    rest = layer_relative(family, name.split(".lora_", 1)[0])
    return rest is not None and rest in {e.rpartition(".")[0] for e in family.moe.experts}


def count_layers(model, family: Family) -> dict[str, int]:
    """{'llm': decoder layers, 'vision': vision blocks}."""
    counts = {"llm": 0, "vision": 0}
    for name, _ in model.named_parameters():
        found = family.layer_index(name)
        if found:
            counts[found[0]] = max(counts[found[0]], found[1] + 1)
    return counts


def topk_layers(model, family: Family, *, unfreeze_topk_llm: int = 0, unfreeze_topk_vision: int = 0) -> dict[str, set[int]]:
    """Indices of the last k decoder layers / vision blocks to train fully; errors name the flag."""
    counts = count_layers(model, family)
    out = {}
    for part, k, flag in (("llm", unfreeze_topk_llm, "--unfreeze_topk_llm"),
                          ("vision", unfreeze_topk_vision, "--unfreeze_topk_vision")):
        if k > counts[part]:
            what = "decoder layers" if part == "llm" else "vision blocks"
            raise VlftError(f"{flag} {k}: the model has only {counts[part]} {what}")
        out[part] = set(range(counts[part] - k, counts[part]))
    return out


def apply_freeze(model, family: Family, *, freeze_vision_tower: bool, freeze_merger: bool, freeze_llm: bool,
                 unfreeze_topk_llm: int = 0, unfreeze_topk_vision: int = 0, always_train: set[str] = frozenset(),
                 train_router: bool = False) -> None:
    """Set requires_grad on every non-LoRA parameter from the flags; LoRA tensors always train.

    Run it after LoRA is applied: PEFT freezes the whole base model, and the merger or vision tower may
    still need to train fully next to the adapter. The head and the embeddings belong to the LLM.
    Quantised (integer) weights never train. `always_train` holds names PEFT made trainable (its adapters,
    and biases under --lora_bias). `train_router` trains the MoE gates (router, shared-expert gate) fully in a
    frozen language model (--train_router); otherwise they follow the language model.
    """
    frozen = {"vision": freeze_vision_tower, "merger": freeze_merger, "llm": freeze_llm, "head": freeze_llm,
              "other": freeze_llm}
    topk = topk_layers(model, family, unfreeze_topk_llm=unfreeze_topk_llm, unfreeze_topk_vision=unfreeze_topk_vision)
    for name, param in model.named_parameters():
        if is_lora_param(name) or name in always_train:
            param.requires_grad_(True)
            continue
        train = not frozen[family.part_of(name)]
        found = family.layer_index(name)
        if found and found[1] in topk[found[0]]:
            train = True
        if train_router and is_moe_gate(family, name):
            train = True
        param.requires_grad_(train and param.is_floating_point())


def count_parameters(model, family: Family) -> dict[str, tuple[int, int]]:
    """{part: (trainable, frozen)}; LoRA tensors are counted apart, as 'lora:<part they adapt>', and those on the
    routed experts' fused parameters as 'lora:experts' (one adapter per expert: a large share of an MoE's adapter).
    Quantised weights count their logical size (bitsandbytes packs two 4-bit values per byte)."""
    counts: dict[str, list[int]] = {part: [0, 0] for part in PARTS}
    for name, param in model.named_parameters():
        part = family.part_of(name)
        if is_lora_param(name):
            part = "lora:experts" if is_expert_adapter(family, name) else f"lora:{part}"
        n = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 partitions leave an empty local tensor
        if hasattr(param, "quant_state") or param.__class__.__name__ == "Params4bit":
            n *= 2
        counts.setdefault(part, [0, 0])[0 if param.requires_grad else 1] += n
    return {part: (t, f) for part, (t, f) in counts.items() if t or f}


def parameter_table(model, family: Family) -> str:
    counts = count_parameters(model, family)
    rows = [f"{'part':<12} {'trainable':>14} {'frozen':>14}"]
    for part, (t, f) in counts.items():
        label = "head/embed" if part == "head" else part
        rows.append(f"{label:<12} {t:>14,} {f:>14,}")
    total_t = sum(t for t, _ in counts.values())
    total_f = sum(f for _, f in counts.values())
    rows.append(f"{'total':<12} {total_t:>14,} {total_f:>14,}  ({100 * total_t / max(1, total_t + total_f):.2f}% trainable)")
    return "\n".join(rows)
