"""Model set-up every training stage shares: load, Liger, LoRA, freeze, in that order (one definition)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlft.utils import log


def weights_dtype(train_args) -> str:
    # bf16 runs keep bf16 weights (as 2U1 and most VLM recipes do); fp16 needs fp32 master weights for
    # the grad scaler, so it stays fp32 and autocasts.
    return "bf16" if train_args.bf16 else "fp32"


@dataclass
class PreparedModel:
    model: object  # what trains (PeftModel under LoRA)
    base_model: object  # the bare Qwen*VLForConditionalGeneration inside it
    family: object
    callbacks: list = field(default_factory=list)


def prepare_model(model_args, tune_args, train_args) -> PreparedModel:
    """Load, patch, LoRA, freeze, in that order: Liger patches the bare model's modules (LoRA then wraps its
    linears, whose calls the patched forwards keep); PEFT freezes the whole base model, so the freeze flags
    come after it; the frozen-tower patch needs the final requires_grad flags."""
    from transformers import set_seed

    from vlft.models.freezing import apply_freeze, parameter_table, topk_layers
    from vlft.models.loading import load_model
    from vlft.models.lora import apply_lora, lora_targets
    from vlft.models.patches import skip_frozen_vision_graph, vision_input_require_grads
    from vlft.train.callbacks import FrozenVisionCallback

    set_seed(train_args.seed)  # LoRA initialisation is random too
    t = tune_args
    model, family = load_model(
        model_args.model_id, dtype=weights_dtype(train_args), attn_implementation=model_args.attn_implementation,
        bits=t.bits, quant_type=t.quant_type, double_quant=t.double_quant,
    )
    base_model = model
    if t.use_liger:
        from vlft.models.patches import apply_liger

        apply_liger(model)
    topk = topk_layers(model, family, unfreeze_topk_llm=t.unfreeze_topk_llm, unfreeze_topk_vision=t.unfreeze_topk_vision)
    peft_trainable: set[str] = set()
    if t.any_lora:
        targets = lora_targets(model, family, llm=t.lora_enable, vision=t.vision_lora, exclude=t.lora_namespan_exclude,
                               num_llm_modules=t.num_lora_modules, skip_layers=topk)
        model = apply_lora(model, targets=targets, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout,
                           bias=t.lora_bias, use_dora=t.use_dora)
        # what PEFT chose to train (adapters, and biases under --lora_bias) stays trainable
        peft_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    apply_freeze(model, family, freeze_vision_tower=t.vision_frozen, freeze_merger=t.freeze_merger,
                 freeze_llm=t.llm_frozen, unfreeze_topk_llm=t.unfreeze_topk_llm,
                 unfreeze_topk_vision=t.unfreeze_topk_vision, always_train=peft_trainable)
    callbacks = []
    vision_input_require_grads(model, family)
    if skip_frozen_vision_graph(model, family):
        callbacks.append(FrozenVisionCallback())
    log(f"model: {family.model_type} from {model_args.model_id}\n{parameter_table(model, family)}")
    return PreparedModel(model, base_model, family, callbacks)


def zero_stage(train_args) -> int:
    """The DeepSpeed ZeRO stage of this run (0 without DeepSpeed)."""
    if not train_args.deepspeed:
        return 0
    return int(train_args.hf_deepspeed_config.config.get("zero_optimization", {}).get("stage", 0))


def disable_dropout(model) -> None:
    """Dropout off everywhere (LoRA's included), so that a policy and its reference agree (DPO, GRPO)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_model_copy(model_args, tune_args, train_args):
    """A second copy of the starting model, loaded like the policy (dtype, attention, Liger kernels): the frozen
    reference of full fine-tuning (train/reference.py). Under ZeRO-3 it is sharded like the policy."""
    from vlft.models.loading import load_model

    copy, _ = load_model(model_args.model_id, dtype=weights_dtype(train_args),
                         attn_implementation=model_args.attn_implementation)
    if tune_args.use_liger:
        from vlft.models.patches import apply_liger

        apply_liger(copy)
    return copy
