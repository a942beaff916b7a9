"""Steps every training entry point shares (sft today; dpo and grpo next): one definition each."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlft.utils import log


def init_distributed_early(argv: list[str]) -> None:
    """Start DeepSpeed's process group before TrainingArguments exist, when launched on several processes
    with --deepspeed (also inside --config).

    Why: TrainingArguments fill the DeepSpeed config's "auto" batch sizes from the world size when they are
    built, and ZeRO-3's zero.Init (inside from_pretrained) checks train_batch_size = micro x accumulation x
    world size. If the group is not up yet, the world size reads 1 and the check fails (seen on the CPU
    rehearsal: "4 != 2 * 1 * 1")."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    wants = "--deepspeed" in argv
    if not wants and "--config" in argv:
        import yaml

        i = argv.index("--config")
        try:
            wants = bool((yaml.safe_load(open(argv[i + 1])) or {}).get("deepspeed"))
        except (OSError, IndexError, AttributeError, yaml.YAMLError):
            return  # parse_args reports the bad --config
    if wants:
        import deepspeed
        import torch

        if not torch.distributed.is_initialized():
            deepspeed.init_distributed()
            release_cpu_allreduce_names()


def release_cpu_allreduce_names() -> bool:
    """Unlink the shared-memory names of DeepSpeed's CPU all-reduce once every rank has mapped them.

    Why: on CPU (the rehearsal), DeepSpeed's shm all-reduce (csrc/cpu/comm/shm.cpp, read against 0.19.8) creates
    one ~69 MB POSIX shared-memory segment per rank, `/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_
    {MASTER_PORT}_{rank}`, and never unlinks it. /dev/shm is RAM: every rehearsal leaks 69 MB per process
    until reboot (a day of test runs here left 22 GB and the next runs hung), and a later run on the same port
    can map a peer's stale segment before that peer recreates it. `initialize` returns on each rank only after
    it has mapped every peer's segment, so after a barrier the names serve nothing: each rank unlinks its own,
    its mappings stay valid, and the kernel frees the memory when the processes exit, however they exit."""
    import os

    import torch
    from deepspeed.comm import comm as ds_comm

    if getattr(getattr(ds_comm, "cdb", None), "shm_comm_op", None) is None:
        return False
    torch.distributed.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        return False
    return True


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
