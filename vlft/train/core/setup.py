"""Model set-up every training stage shares: load, Liger, LoRA, freeze, in that order (one definition)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlft.errors import VlftError
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



def attach_adapters(model, family, t, topk: set, init: bool | str = True):
    """The PEFT step of `prepare_model`, also what `vlft plan` builds on the meta device: virtual tokens (P-Tuning /
    prompt / prefix tuning) or LoRA on the targets the tune flags `t` choose (`topk`: the layers the --unfreeze_topk_*
    flags train fully, left to full training rather than adapted). Returns (model, the parameter names PEFT made
    trainable: adapters, and biases under --lora_bias), which the freeze step keeps trainable; (model, empty set)
    when neither is asked."""
    from vlft.models.lora import apply_lora, lora_targets

    if t.virtual_tokens:
        from vlft.models.virtual_tokens import apply_virtual_tokens, virtual_token_config

        model = apply_virtual_tokens(model, virtual_token_config(
            t.peft_type, t.num_virtual_tokens, encoder_hidden_size=t.encoder_hidden_size,
            encoder_reparameterization_type=t.encoder_reparameterization_type))
    elif t.any_lora:
        targets = lora_targets(model, family, llm=t.lora_enable, vision=t.vision_lora, exclude=t.lora_namespan_exclude,
                               num_llm_modules=t.num_lora_modules, skip_layers=topk, experts=t.lora_target_experts)
        model = apply_lora(model, targets=targets, rank=t.lora_rank, alpha=t.lora_alpha, dropout=t.lora_dropout,
                           bias=t.lora_bias, use_dora=t.use_dora, use_rslora=t.use_rslora, init_lora_weights=init)
    else:
        return model, set()
    return model, {n for n, p in model.named_parameters() if p.requires_grad}


def prepare_model(model_args, tune_args, train_args) -> PreparedModel:
    """Load, patch, LoRA, freeze, in that order: Liger patches the bare model's modules (LoRA then wraps its
    linears, whose calls the patched forwards keep); PEFT freezes the whole base model, so the freeze flags
    come after it; the frozen-tower patch needs the final requires_grad flags."""
    from transformers import set_seed

    from vlft.models.freezing import apply_freeze, parameter_table, topk_layers
    from vlft.models.loading import load_model
    from vlft.models.lora import lora_init_value, mutates_base
    from vlft.models.patches import skip_frozen_vision_graph, vision_input_require_grads
    from vlft.train.core.callbacks import FrozenVisionCallback

    set_seed(train_args.seed)  # LoRA initialisation is random too
    t = tune_args
    init = lora_init_value(t.init_lora_weights) if t.any_lora else True
    if mutates_base(init) and zero_stage(train_args) == 3:
        raise VlftError(f"--init_lora_weights {t.init_lora_weights} decomposes every adapted weight when the adapter is "
                        "created, which ZeRO-3's partitioned weights do not allow; use ZeRO-2 or --init_lora_weights true")
    model, family = load_model(
        model_args.model_id, dtype=weights_dtype(train_args), attn_implementation=model_args.attn_implementation,
        bits=t.bits, quant_type=t.quant_type, double_quant=t.double_quant,
    )
    base_model = model
    if t.bits != 16 and family.moe is not None:
        experts = sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in
                      {e.rsplit(".", 1)[-1] for e in family.moe.experts} and ".experts." in n)
        total = sum(p.numel() for p in model.parameters())
        log(f"--bits {t.bits}: bitsandbytes quantises nn.Linear layers only; the routed experts' fused weights "
            f"({experts / max(total, 1):.0%} of the parameters) stay in {weights_dtype(train_args)}, so QLoRA saves "
            "little memory on this MoE model (vlft plan counts them unquantised too)")
    if family.moe is not None or t.router_aux_loss_coef is not None:
        set_router_aux_loss(model, family, t.router_aux_loss_coef)
    if t.use_liger:
        from vlft.models.patches import apply_liger

        apply_liger(model)
    topk = topk_layers(model, family, unfreeze_topk_llm=t.unfreeze_topk_llm, unfreeze_topk_vision=t.unfreeze_topk_vision)
    # Adapters start from the seed, whatever loading drew: under ZeRO-3 transformers initialises the partitioned
    # weights before loading them (zero.Init), which draws from the generator on some families (Qwen3.5's
    # A_log), so without this one process and ZeRO-3 would start from different LoRA weights.
    set_seed(train_args.seed)
    model, peft_trainable = attach_adapters(model, family, t, topk, init)
    if t.any_lora and not t.virtual_tokens:
        if mutates_base(init):
            # PiSSA / OLoRA moved part of each adapted weight into the adapter; merge needs the adapter as it was
            # created to express the training as a plain LoRA update of the original weights (run_dir.py)
            from peft import get_peft_model_state_dict

            model.vlft_initial_adapter = {k: v.detach().to("cpu", copy=True)
                                          for k, v in get_peft_model_state_dict(model).items()}
    apply_freeze(model, family, freeze_vision_tower=t.vision_frozen, freeze_merger=t.merger_frozen,
                 freeze_llm=t.llm_frozen, unfreeze_topk_llm=t.unfreeze_topk_llm,
                 unfreeze_topk_vision=t.unfreeze_topk_vision, always_train=peft_trainable, train_router=t.train_router)
    callbacks = []
    vision_input_require_grads(model, family)
    if skip_frozen_vision_graph(model, family):
        callbacks.append(FrozenVisionCallback())
    log(f"model: {family.model_type} from {model_args.model_id}\n{parameter_table(model, family)}")
    return PreparedModel(model, base_model, family, callbacks)


def set_router_aux_loss(model, family, coef: float | None) -> None:
    """--router_aux_loss_coef: the model's forward adds `coef` x the load-balancing loss (Switch Transformer's, over
    every MoE layer's router logits) to the language-model loss and returns it as `outputs.aux_loss`. transformers'
    Qwen-VL-MoE forwards read exactly these two text_config fields (`output_router_logits`, `router_aux_loss_coef`),
    and so does vlft's Liger forward (models/patches/liger.py). `coef` None turns the term off, whatever the
    checkpoint's config says (a model saved by a run with the flag keeps `output_router_logits` true): the flag
    decides. Raises VlftError for a coefficient on a dense family."""
    if family.moe is None:
        raise VlftError(f"--router_aux_loss_coef: {family.display_name} ({family.model_type}) has no router")
    text = getattr(model.config, "text_config", model.config)
    text.output_router_logits = coef is not None
    if coef is not None:
        text.router_aux_loss_coef = float(coef)


def refuse_base_mutating_init(tune_args, stage: str) -> None:
    """Preference stages take their reference from the model with its adapter switched off: after PiSSA / OLoRA
    that is the residual weights, not the starting model, so those initialisations are refused there."""
    from vlft.models.lora import lora_init_value, mutates_base

    if tune_args.virtual_tokens:
        raise VlftError(f"{stage} with --peft_type {tune_args.peft_type}: virtual tokens are proven for vlft sft only")
    if tune_args.any_lora and mutates_base(lora_init_value(tune_args.init_lora_weights)):
        raise VlftError(f"{stage} with --init_lora_weights {tune_args.init_lora_weights}: the reference model is the "
                        "model with its adapter switched off, which PiSSA / OLoRA leave without the part they moved "
                        "into the adapter; use --init_lora_weights true")


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
    reference of full fine-tuning (train/preference/reference.py), opened by models/loading.py `open_trained` as
    every reader of a model is. The KV cache stays off, as the policy's (a forward with it on ignores packed rows'
    position ids: `load_model`). Under ZeRO-3 it is sharded like the policy."""
    from vlft.models.loading import open_trained

    copy = open_trained(model_args.model_id, dtype=weights_dtype(train_args),
                        attn_implementation=model_args.attn_implementation, use_cache=False).model
    if tune_args.use_liger:
        from vlft.models.patches import apply_liger

        apply_liger(copy)
    return copy
