"""`vlft plan`: will a training run fit? Estimated peak memory per GPU, part by part, before renting GPUs.

    vlft plan --family qwen2_5_vl --size 7B --zero zero2 --num_gpus 8 --gpu_memory_gb 80 \
        --per_device_train_batch_size 4 --max_seq_length 4096 --image_tokens 1024 --bf16 --gradient_checkpointing

The model is read from a local checkpoint directory or a config.json (`--model_id`), or from the table of the
released sizes below (`--family` + `--size`; a hub id such as Qwen/Qwen2-VL-7B-Instruct finds its row too). It is
built on PyTorch's meta device (no memory, no download), so every parameter count is exact for that config.

What trains is printed as the table `vlft sft` prints at start-up, from the same flags and the same functions (LoRA,
then the freeze flags, on the meta device); flags the estimate does not model are named. Vision tokens per sample:
--image_tokens; else measured from --data_path as `vlft sft`'s start-up check measures it (every record; the
largest record's images and videos, or under --packing the row richest in vision); else DEFAULT_IMAGE_TOKENS, said
in the output. `--script finetune_lora` plans what a finetune script launches with this environment's settings
(its FREEZE_VISION_TOWER=true included); any other `vlft sft` flag is accepted, and those that change no memory are
listed as ignored.

What the estimate adds up (bytes per GPU; Psi = parameters, T = trainable ones, N = --num_gpus, w = 2 bytes per
value under --bf16, else 4):

- weights: w * Psi (ZeRO-3: / N, plus the gathered working set of 2 x the largest module: one in use, one being
  prefetched; zero3_offload: the working set only). --bits 4: the language model's linear weights take 0.5
  byte/param plus bitsandbytes' quantisation constants (one fp32 absmax per block of 64, or with double
  quantisation one 8-bit absmax per 64 plus one fp32 per 256 blocks); --bits 8: 1 byte/param plus one fp32
  scale per output row. LoRA adapters: fp32 without DeepSpeed (PEFT upcasts adapters of bf16 models).
- gradients: w * T (one per trainable parameter, in its dtype); ZeRO-2/3: / N. DDP (several GPUs, no ZeRO) adds
  its gradient buckets, another w * T (PyTorch DDP without gradient_as_bucket_view).
- optimizer states: AdamW. Without DeepSpeed vlft keeps the weights in their dtype and torch's AdamW keeps m and v
  in it: 2 * w * T. Under DeepSpeed (any stage) the ZeRO paper's mixed-precision Adam: fp32 master weights, m
  and v, K = 12 bytes/param (Rajbhandari et al., arXiv 1910.02054, section 3.1: 2 + 2 + 12 bytes/param), / N
  from ZeRO-1 on; optimizer offload keeps them on the CPU (0 on the GPU).
- activations of the language model, per token and decoder layer, counted as Korthikanti et al. (arXiv
  2205.05198, section 4.1) count a transformer layer's (every tensor the backward pass keeps) but for Qwen's
  layers, by layer kind (`Family.text_shape`): two RMSNorms (input and output kept, 2h per norm; Liger keeps
  the inputs only, 2h for both) plus
  * full attention run by SDPA / flash attention (q after RoPE, k, v, the attention output and its re-laid-out
    copy: 3 q_dim + 2 kv_dim; no s x s scores), and for Qwen3.5's output gate (q_proj twice as wide) its
    sigmoid and the gated output, 2 q_dim more;
  * a Gated DeltaNet layer (Qwen3.5; transformers' Qwen3_5GatedDeltaNet run by flash-linear-attention's chunked
    delta rule and causal-conv1d, K_w = key heads x d_k, V_w = value heads H x d_v, chunks of C = 64): the
    convolution's input (in_proj_qkv's output, 2 K_w + V_w), z (V_w), a, beta and g (3 H), the convolved v (V_w),
    the L2-normed q and k and their inverse norms (2 K_w + 2 key heads), the inverted C x C chunk matrix A (C H),
    the rule's output (V_w) and the gated RMSNorm's normed input, silu(z) and output (3 V_w):
    4 K_w + 7 V_w + (C + 3) H + 2 key heads. transformers' PyTorch fallback (without fla) keeps more: not modelled;
  * a SwiGLU MLP (gate, up, silu(gate), their product: 4 I; Liger 2 I), or a mixture of experts: the router's
    probabilities (E), for each of the k experts a token is routed to its gathered input, gate_up (2 I_e),
    silu, product (I_e each), output and routing weight: 2h + 4 I_e + 1 (frozen experts keep neither matmul
    input: h + 3 I_e + 1), and a shared expert's SwiGLU, output and gate (4 I_s + h + 1).
  LoRA adds, per layer and token, the rank-r projections of each adapted nn.Linear (r each) and with dropout
  its dropout output and mask (as wide as the linear's input, in values and in bytes); the adapted modules are
  those of `vlft.models.lora.lora_targets` on the meta model. LoRA on the routed experts (PEFT
  target_parameters, no dropout) adds r x (in + out) parameters per expert and keeps, per MoE layer whatever the
  tokens, one merged copy of the layer's expert weights (PEFT adds the adapters to the fused weights each
  forward). --gradient_checkpointing keeps only each layer's input (h) plus the largest layer's full set while
  it recomputes. Plus the embeddings and the final norm (4h). Weights, gradients and optimizer states count
  every expert.
- logits: without Liger, B L V values in w (the head's output), their fp32 copy (transformers' loss upcasts;
  none when w is already 4), the fp32 log-softmax and its fp32 gradient: B L V (w + 4 + 4 [+ 4]). With Liger's
  fused linear cross-entropy only one fp32 chunk of logits and its gradient: 2 * 4 * C * V with
  C = next power of 2 of ceil(B L / ceil(V / h)) (liger_kernel's chunking), plus the input gradient B L h w.
- vision tower activations, per patch (B x --image_tokens x merge**2 patches), when gradients flow through the
  tower (it trains, fully or with --vision_lora): per block 9 w_v (norms 4, q k v 3, attention output and copy
  2) plus the MLP's (SwiGLU: 4 I_v; Qwen2-VL's quick GELU: 3 I_v; GELU: 2 I_v); under checkpointing the
  block inputs only plus one block. The merger(s) (when they train or the tower does): 4 w_v per patch each.
  A frozen tower runs without a graph in vlft: nothing kept.
- overhead: a fixed --overhead_gb (default 2.0 GB on a GPU: CUDA context ~0.5 GB, cuBLAS workspaces, NCCL
  buffers, allocator fragmentation), plus ZeRO's communication buckets from the DeepSpeed config (reduce bucket,
  and ZeRO-3's prefetch bucket; "auto" is h*h and 0.9*h*h values, as transformers fills them) in w bytes.

The sum is a worst case: every sample is --max_seq_length long, and gradients are counted alongside the full
activations (true under gradient accumulation, where the gradients live through the next forward; in a single
step's backward the gradients grow while activations are freed, so the real peak is lower by up to
min(gradients, activations)). Not modelled: attention score matrices of eager attention, DeepSpeed's allgather
bucket and pinned CPU buffers, fragmentation beyond the fixed overhead, the reference model of DPO/GRPO.

Checked against measurement on the CPU only (fp32, one process, `bench/plan_check.py`; tests/test_plan.py asserts
the error bound); the GPU check (bench/plan_check.py, on a CUDA device) is pending.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from vlft.errors import VlftError
from vlft.models.families.base import FULL_ATTENTION, LINEAR_ATTENTION, TextShape
from vlft.utils import FlagParser

GB = 1e9
DEFAULT_OVERHEAD_GB = 2.0  # CUDA context, cuBLAS workspaces, NCCL buffers, fragmentation (see module docstring)

# --- the released sizes ---------------------------------------------------------------------------------------
# Each family's descriptor holds the released sizes (`Family.presets`, vlft/models/families/): numbers of the
# published config.json files, written down from memory of those files (they could not be downloaded here) and
# cross-checked by the parameter counts they give on the meta device. A local config.json (--model_id) always
# wins over that table.


def _presets() -> dict:
    from vlft.models.registry import FAMILIES

    return {name: fam.presets for name, fam in FAMILIES.items() if fam.presets}


def _pretty(family: str) -> str:
    from vlft.models.registry import get_family

    return get_family(family).display_name


def preset_config(family: str, size: str):
    """The transformers config of a released size (Family.presets); errors name --family / --size."""
    import transformers

    from vlft.models.registry import get_family

    presets = _presets()
    if family not in presets:
        raise VlftError(f"--family {family!r} has no size table; choose one of {', '.join(presets)}")
    sizes = presets[family]
    key = size.upper()
    if key not in sizes:
        raise VlftError(f"--size {size!r} is not a released {_pretty(family)} size; choose one of {', '.join(sizes)}")
    text, vision, tie = sizes[key]
    Model = getattr(transformers, get_family(family).model_class)
    text = dict(text)
    text.setdefault("rope_parameters", _mrope(text))
    return Model.config_class(text_config=text, vision_config=dict(vision), tie_word_embeddings=tie)


def _mrope(text: dict) -> dict:
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    third = head_dim // 6
    return {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [head_dim // 2 - 2 * third, third, third]}


def preset_from_model_id(model_id: str) -> tuple[str, str] | None:
    """(family, size) when a hub id such as Qwen/Qwen2.5-VL-7B-Instruct names a released size of a family. Qwen
    names its mixture-of-experts releases without the "-MoE" of the family's display name (Qwen/Qwen3.5-35B-A3B,
    Qwen/Qwen3-VL-30B-A3B-Instruct): the size's A<n>B says it, so that name matches too. The longest match wins."""
    name = model_id.rsplit("/", 1)[-1].lower()
    found, length = None, 0
    for family, sizes in _presets().items():
        pretty = _pretty(family).lower()
        for base in {pretty, pretty.removesuffix("-moe")}:
            for size in sizes:
                prefix = f"{base}-{size.lower()}"
                rest = name[len(prefix):]
                if name.startswith(prefix) and not rest[:1].isalnum() and len(prefix) > length:
                    found, length = (family, size), len(prefix)
    return found


# --- model shape ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as the activation estimate sees it (`model_shape` counts it on the meta device)."""

    kind: str  # FULL_ATTENTION or LINEAR_ATTENTION (TextShape.layer_kinds)
    moe: bool  # its MLP is a mixture of experts
    params: int  # all of its parameters (ZeRO-3 gathers a layer at once)
    lora_modules: int  # nn.Linear modules vlft's --lora_enable adapts in it (models/lora.py: lora_targets)
    lora_inputs: int  # their in_features, summed (what LoRA's dropout copies per token)
    lora_dims: int  # their in + out features, summed (a rank-r LoRA adds r x this)
    expert_params: int = 0  # routed experts' fused weights, all experts
    expert_lora_dims: int = 0  # sum over those [E, a, b] weights of E x (a + b): one rank-r adapter per expert


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, counted on the meta device (`model_shape`)."""

    family: str
    params: dict[str, int]  # 'vision' (blocks, patch and position embeddings), 'merger', 'llm' (decoder layers,
    # final norm), 'embed' (token embeddings), 'head' (lm_head; 0 when tied to the embeddings)
    llm_linear_params: int  # weights of the decoder layers' nn.Linear (what --bits quantises)
    llm_linear_rows: int  # their output rows, summed (8-bit keeps one scale per row)
    llm_lora_dims: int  # sum of in + out features over the LLM linears LoRA adapts (a rank-r LoRA adds r x this)
    vision_lora_dims: int  # the same over the vision blocks' linears (--vision_lora)
    largest_module: int  # parameters of the largest module ZeRO-3 gathers at once (a layer, the embeddings, the head)
    hidden: int
    layers: int
    q_dim: int  # attention heads x head_dim
    kv_dim: int  # key-value heads x head_dim
    intermediate: int  # dense MLP width (0 when every layer is MoE)
    vocab: int
    vision_depth: int
    vision_width: int
    vision_intermediate: int
    vision_mlp_values: int  # values an MLP keeps per patch per intermediate unit: SwiGLU 4, quick GELU 3, GELU 2
    merge_size: int
    mergers: int  # 1 + deepstack mergers (Qwen3-VL)
    text: TextShape  # layer kinds, experts, linear-attention widths
    layer_shapes: tuple[LayerShape, ...]  # per decoder layer
    q_gate: int  # full attention's output gate width (Qwen3.5's q_proj is 2 x q_dim wide), else 0

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def expert_lora_dims(self) -> int:
        return sum(layer.expert_lora_dims for layer in self.layer_shapes)


def load_config(model_id: str):
    """A transformers config from a model directory or a config.json path; errors name --model_id."""
    from transformers import AutoConfig

    path = Path(model_id).expanduser()
    if path.is_file():
        if path.name != "config.json":
            raise VlftError(f"--model_id {model_id}: give a model directory or its config.json")
        path = path.parent
    if not path.is_dir():
        raise VlftError(f"--model_id {model_id!r} is not a local directory or config.json, and the hub cannot be "
                        f"reached from here; give a local checkpoint, or --family and --size for a released size")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise VlftError(f"--model_id {model_id}: cannot read its config.json ({err})") from None


def model_shape(config) -> ModelShape:
    """Count `config`'s parameters per part and per decoder layer, building the model on the meta device (no memory
    is allocated); the LoRA targets are those of `vlft.models.lora.lora_targets` on that model (every nn.Linear of
    the decoder layers but the MoE gates, and the routed experts' fused weights)."""
    import torch
    import transformers
    from torch import nn

    from vlft.models.lora import lora_targets
    from vlft.models.registry import get_family
    from vlft.train.core.throughput import is_routed_expert

    family = get_family(config.model_type)
    Model = getattr(transformers, family.model_class)
    with torch.device("meta"):
        model = Model(config)
    text = family.text_shape(config.text_config)
    params = dict.fromkeys(("vision", "merger", "llm", "embed", "head"), 0)
    per_layer = [0] * text.layers
    experts = [0] * text.layers
    for name, p in model.named_parameters():  # tied weights are listed once
        part = family.part_of(name)
        if name.startswith(family.embed_prefix):
            part = "embed"
        params[part if part in params else "llm"] += p.numel()
        found = family.layer_index(name)
        if found and found[0] == "llm":
            per_layer[found[1]] += p.numel()
            experts[found[1]] += p.numel() if is_routed_expert(family, name) else 0
    linear_params = linear_rows = vision_dims = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        part = family.part_of(name)
        if part == "llm":
            linear_params += module.weight.numel()
            linear_rows += module.out_features
        elif part == "vision" and not name.startswith(family.patch_embed_prefix):
            vision_dims += module.in_features + module.out_features
    modules, weights = dict(model.named_modules()), dict(model.named_parameters())
    lora = [dict.fromkeys(("lora_modules", "lora_inputs", "lora_dims", "expert_lora_dims"), 0) for _ in per_layer]
    for target in lora_targets(model, family, llm=True, vision=False):
        found = family.layer_index(target)
        if found is None:
            continue
        counts = lora[found[1]]
        if target in weights:  # a routed expert's fused weight [E, a, b]: one adapter of r x (a + b) per expert
            count, a, b = weights[target].shape
            counts["expert_lora_dims"] += count * (a + b)
        else:
            linear = modules[target]
            counts["lora_modules"] += 1
            counts["lora_inputs"] += linear.in_features
            counts["lora_dims"] += linear.in_features + linear.out_features
    layer_shapes = tuple(LayerShape(kind, i in text.moe_layers, per_layer[i], expert_params=experts[i], **lora[i])
                         for i, kind in enumerate(text.layer_kinds))
    q_dim = text.heads * text.head_dim
    q_gate = 0
    for i, kind in enumerate(text.layer_kinds):
        if kind == FULL_ATTENTION:  # q_proj wider than the heads: an output gate (Qwen3.5's gated attention)
            q_proj = model.get_submodule(f"{family.llm_layers_prefix}{i}.self_attn.q_proj")
            q_gate = q_proj.out_features - q_dim
            break
    vc = config.vision_config
    shape = family.vision_shape(vc)
    v_inter = getattr(vc, "intermediate_size", None) or int(shape.width * getattr(vc, "mlp_ratio", 4))
    act = getattr(vc, "hidden_act", "gelu")
    mlp_values = family.vision_mlp_values or (3 if act == "quick_gelu" else 2)
    return ModelShape(
        family=family.model_type, params=params, llm_linear_params=linear_params, llm_linear_rows=linear_rows,
        llm_lora_dims=sum(layer.lora_dims for layer in layer_shapes), vision_lora_dims=vision_dims,
        largest_module=max(max(per_layer, default=0), params["embed"], params["head"]), hidden=text.hidden,
        layers=text.layers, q_dim=q_dim, kv_dim=text.kv_heads * text.head_dim, intermediate=text.intermediate,
        vocab=text.vocab, vision_depth=shape.depth, vision_width=shape.width, vision_intermediate=v_inter,
        vision_mlp_values=mlp_values, merge_size=shape.merge_size,
        mergers=1 + len(getattr(vc, "deepstack_visual_indexes", None) or []),
        text=text, layer_shapes=layer_shapes, q_gate=q_gate,
    )


# --- ZeRO settings --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Zero:
    """The parts of a DeepSpeed config the estimate reads. stage 0: no DeepSpeed (plain DDP / one process)."""

    name: str
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket: float | None = None  # values; None: "auto" (h*h)
    prefetch_bucket: float | None = None  # ZeRO-3 prefetch values; None: "auto" (0.9 h*h)

    @classmethod
    def from_deepspeed(cls, name: str, config: dict) -> Zero:
        z = config.get("zero_optimization", {}) or {}

        def number(key):
            value = z.get(key, "auto")
            return None if value == "auto" else float(value)

        def offloads(key):
            return (z.get(key) or {}).get("device", "none") in ("cpu", "nvme")

        return cls(name, int(z.get("stage", 0)), offloads("offload_optimizer"), offloads("offload_param"),
                   number("reduce_bucket_size"), number("stage3_prefetch_bucket_size"))


BUILTIN_ZERO = {
    "none": Zero("none"),
    "zero1": Zero("zero1", 1),
    "zero2": Zero("zero2", 2),
    "zero3": Zero("zero3", 3),
    "zero3_offload": Zero("zero3_offload", 3, offload_optimizer=True, offload_param=True),
}


def shipped_zero_configs() -> dict[str, Path]:
    """name -> path of the DeepSpeed configs shipped in the checkout's zero_configs/ (empty when installed without it)."""
    folder = Path(__file__).resolve().parents[1] / "zero_configs"
    return {p.stem: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def resolve_zero(value: str) -> Zero:
    """--zero: none, a shipped config's name (zero_configs/<name>.json, or the built-in stage when not shipped),
    or a path to a DeepSpeed config."""
    shipped = shipped_zero_configs()
    if value == "none":
        return BUILTIN_ZERO["none"]
    if value in shipped:
        return Zero.from_deepspeed(value, json.loads(shipped[value].read_text()))
    if value in BUILTIN_ZERO:
        return BUILTIN_ZERO[value]
    path = Path(value).expanduser()
    if not path.is_file():
        names = sorted(set(BUILTIN_ZERO) | set(shipped))
        raise VlftError(f"--zero {value!r} is neither one of {', '.join(names)} nor a DeepSpeed config file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VlftError(f"--zero {value}: not valid JSON ({err})") from None
    return Zero.from_deepspeed(path.stem, config)


# --- the estimate ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """A run's choices, with the flag names and defaults of `vlft sft` (freeze flags left None follow LoRA)."""

    zero: Zero = BUILTIN_ZERO["none"]
    num_gpus: int = 1
    per_device_train_batch_size: int = 1
    max_seq_length: int = 8192  # vlft sft's default (DataArguments), so a plan without the flag plans what sft runs
    image_tokens: int = 0
    lora_enable: bool = False
    vision_lora: bool = False
    lora_rank: int = 64
    lora_dropout: float = 0.05
    freeze_vision_tower: bool | None = None
    freeze_merger: bool = False
    freeze_llm: bool | None = None
    lora_target_experts: bool = True  # MoE: --lora_enable adapts the routed experts too (as vlft sft's flag)
    bits: int = 16
    double_quant: bool = True
    gradient_checkpointing: bool = False
    bf16: bool = False
    use_liger: bool = False
    overhead_gb: float = DEFAULT_OVERHEAD_GB

    def problems(self) -> list[str]:
        errors = []
        if self.num_gpus < 1:
            errors.append("--num_gpus must be >= 1")
        if self.per_device_train_batch_size < 1:
            errors.append("--per_device_train_batch_size must be >= 1")
        if self.max_seq_length < 1:
            errors.append("--max_seq_length must be >= 1")
        if not 0 <= self.image_tokens <= self.max_seq_length:
            errors.append(f"--image_tokens {self.image_tokens} must be between 0 and --max_seq_length "
                          f"{self.max_seq_length} (vision tokens count towards the sequence)")
        if self.bits not in (4, 8, 16):
            errors.append(f"--bits {self.bits}: choose 4, 8 or 16")
        elif self.bits != 16 and not (self.lora_enable or self.vision_lora):
            errors.append(f"--bits {self.bits} quantises frozen weights for QLoRA; add --lora_enable")
        elif self.bits != 16 and self.freeze_llm is False:
            errors.append(f"--bits {self.bits} with --freeze_llm false: quantised weights cannot train")
        if (self.lora_enable or self.vision_lora) and self.lora_rank < 1:
            errors.append("--lora_rank must be >= 1")
        return errors


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak memory of one GPU, in bytes, part by part (see the module docstring for each formula)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float  # language model
    logits: float  # full logits and their fp32 copies, or Liger's chunk
    vision: float  # vision tower and merger activations
    overhead: float  # fixed overhead and ZeRO buckets
    trainable_params: int
    total_params: int
    cpu_offloaded: float = 0.0  # bytes held in CPU memory by ZeRO offload (per process), not in the total
    notes: tuple[str, ...] = field(default_factory=tuple)

    PARTS = ("weights", "gradients", "optimizer", "activations", "logits", "vision", "overhead")

    @property
    def total(self) -> float:
        return sum(getattr(self, part) for part in self.PARTS)

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total <= gpu_memory_gb * GB


def trainable_params(shape: ModelShape, s: Settings) -> dict[str, int]:
    """What trains, as counts of parameters: {'full': base parameters that train, 'lora': adapter parameters,
    'quantised': parameters stored in --bits}, plus two 0/1 flags, not counts: 'vision_grads' (gradients flow
    through the vision tower: it trains fully or has LoRA) and 'merger_grads' (the merger trains)."""
    any_lora = s.lora_enable or s.vision_lora
    llm_frozen = s.freeze_llm if s.freeze_llm is not None else any_lora
    vision_frozen = s.freeze_vision_tower if s.freeze_vision_tower is not None else s.vision_lora
    p = shape.params
    full = (0 if llm_frozen else p["llm"] + p["embed"] + p["head"]) + (0 if vision_frozen else p["vision"])
    full += 0 if s.freeze_merger else p["merger"]
    llm_dims = shape.llm_lora_dims + (shape.expert_lora_dims if s.lora_target_experts else 0)
    lora = s.lora_rank * ((llm_dims if s.lora_enable else 0) + (shape.vision_lora_dims if s.vision_lora else 0))
    return {"full": full, "lora": lora, "quantised": shape.llm_linear_params if s.bits != 16 else 0,
            "vision_grads": int(not vision_frozen or s.vision_lora), "merger_grads": int(not s.freeze_merger)}


def quantised_bytes(params: int, rows: int, bits: int, double_quant: bool = True) -> float:
    """Bytes of `params` linear weights (with `rows` output rows in all) stored by bitsandbytes in `bits`.
    4-bit: 0.5 byte/param + absmax constants per block of 64 (fp32; double quantisation: 8-bit, plus one fp32 per
    256 blocks; Dettmers et al., QLoRA, arXiv 2305.14314, section 3); 8-bit: 1 byte/param + one fp32 scale per row."""
    if bits == 4:
        constants = (1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64
        return params * (0.5 + constants)
    if bits == 8:
        return params + 4 * rows
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def mixer_values(shape: ModelShape, layer: LayerShape) -> float:
    """Values a decoder layer's token mixer (attention or Gated DeltaNet) keeps per token (module docstring)."""
    from vlft.train.core.throughput import DELTA_RULE_CHUNK

    if layer.kind == LINEAR_ATTENTION:
        t = shape.text
        k, v = t.linear_key_width, t.linear_value_width
        return 4 * k + 7 * v + (DELTA_RULE_CHUNK + 3) * t.linear_value_heads + 2 * t.linear_key_heads
    return 3 * shape.q_dim + 2 * shape.kv_dim + 2 * shape.q_gate


def experts_train(s: Settings) -> bool:
    """Whether the routed experts' weights get gradients: the language model trains, or LoRA reaches the experts."""
    llm_frozen = s.freeze_llm if s.freeze_llm is not None else (s.lora_enable or s.vision_lora)
    return not llm_frozen or (s.lora_enable and s.lora_target_experts)


def mlp_values(shape: ModelShape, layer: LayerShape, s: Settings) -> float:
    """Values a decoder layer's MLP keeps per token: a SwiGLU's 4 I (Liger: 2 I), or a mixture of experts' router
    probabilities, experts_per_token routed copies and the shared expert (module docstring)."""
    t = shape.text
    if not layer.moe:
        return (2 if s.use_liger else 4) * shape.intermediate
    h, inner = shape.hidden, t.expert_intermediate
    # per routed copy: gathered input h, gate_up 2 I, silu I, product I, expert output h, routing weight 1; frozen
    # experts (LoRA off them) keep neither matmul input: h + 3 I + 1 (transformers' grouped_mm experts, probed)
    copy = 2 * h + 4 * inner + 1 if experts_train(s) else h + 3 * inner + 1
    values = t.experts + t.experts_per_token * copy
    if t.shared_expert_intermediate:
        values += 4 * t.shared_expert_intermediate + h + 1
    return values


def llm_layer_values(shape: ModelShape, s: Settings, layer: LayerShape) -> float:
    """Activation values one decoder layer keeps per token (module docstring), LoRA's extra values included."""
    values = (2 if s.use_liger else 4) * shape.hidden + mixer_values(shape, layer) + mlp_values(shape, layer, s)
    if s.lora_enable:
        values += layer.lora_modules * s.lora_rank
        if s.lora_dropout > 0:
            values += layer.lora_inputs  # each adapted linear's dropout output, as wide as its input
    return values


def lora_mask_bytes(shape: ModelShape, s: Settings, layer: LayerShape) -> float:
    """Bytes of LoRA's dropout masks (bool) per token in `layer`."""
    if not s.lora_enable or s.lora_dropout <= 0:
        return 0
    return layer.lora_inputs


def expert_lora_values(layer: LayerShape, s: Settings) -> float:
    """Values a MoE layer keeps whatever the tokens when its routed experts carry LoRA: PEFT's ParamWrapper adds
    the adapters to the fused expert weights on every forward (`W + scale * B A` for all experts at once) and the
    experts' matmuls keep that merged copy for backward: one copy of the layer's expert weights."""
    adapted = s.lora_enable and s.lora_target_experts and layer.expert_lora_dims
    return layer.expert_params if adapted else 0


def liger_chunk(tokens: int, vocab: int, hidden: int) -> int:
    """Rows of logits Liger's fused linear cross-entropy materialises at once (liger_kernel's chunk size)."""
    chunks = max(1, math.ceil(vocab / hidden))
    return 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / chunks)))))


def estimate(shape: ModelShape, s: Settings) -> MemoryPlan:
    """Peak memory per GPU of training `shape` with settings `s` (formulas and sources: module docstring)."""
    problems = s.problems()
    if problems:
        raise VlftError("; ".join(problems))
    z, n = s.zero, s.num_gpus
    w = 2 if s.bf16 else 4
    a = w  # activations are stored in the weights' dtype
    counts = trainable_params(shape, s)
    full, lora, quantised = counts["full"], counts["lora"], counts["quantised"]
    total = shape.total_params
    trainable = full + lora
    notes = []

    # weights
    lora_weight_bytes = 4 if z.stage == 0 else w  # PEFT upcasts adapters to fp32; DeepSpeed casts the module to w
    dense = (total - quantised) * w
    if quantised:
        dense += quantised_bytes(quantised, shape.llm_linear_rows, s.bits, s.double_quant)
    weights = dense + lora * lora_weight_bytes
    working_set = 2 * shape.largest_module * w
    if z.stage == 3:
        weights = working_set if z.offload_param else weights / n + working_set
        if z.offload_param:
            notes.append("weights offloaded to the CPU: the GPU holds the gathered working set only")

    # gradients and optimizer states
    grad_bytes = full * w + lora * lora_weight_bytes
    cpu = 0.0
    if z.stage == 0:
        gradients = grad_bytes * (2 if n > 1 else 1)  # DDP's buckets copy the gradients
        optimizer = 2 * (full * w + lora * 4)  # AdamW's m and v in each parameter's dtype
    else:
        gradients = grad_bytes / n if z.stage >= 2 else grad_bytes
        optimizer = 12 * trainable / n
        if z.offload_optimizer:
            cpu = optimizer + 4 * trainable / n  # fp32 master, m, v and fp32 gradients on the CPU
            optimizer = 0.0

    # language-model activations
    b, seq = s.per_device_train_batch_size, s.max_seq_length
    tokens = b * seq
    layers = [tokens * (llm_layer_values(shape, s, layer) * a + lora_mask_bytes(shape, s, layer))
              + expert_lora_values(layer, s) * w for layer in shape.layer_shapes]
    if s.gradient_checkpointing:
        activations = tokens * shape.layers * shape.hidden * a + max(layers, default=0)
    else:
        activations = sum(layers)
    if any(expert_lora_values(layer, s) for layer in shape.layer_shapes):
        notes.append("LoRA on the routed experts: each MoE layer keeps a merged copy of its expert weights for "
                     "backward (PEFT adds the adapters to the fused weights); --lora_target_experts false avoids it")
    if shape.text.is_hybrid:
        notes.append("linear-attention layers counted as flash-linear-attention's and causal-conv1d's kernels keep "
                     "them; without those packages transformers' PyTorch fallback also keeps its fp32 chunk matrices")
    activations += tokens * 4 * shape.hidden * a  # embeddings (and their vision-merged copy), final norm

    # logits
    if s.use_liger:
        chunk = liger_chunk(tokens, shape.vocab, shape.hidden)
        logits = 2 * 4 * chunk * shape.vocab + tokens * shape.hidden * a
    else:
        logits = tokens * shape.vocab * (a + (4 if a < 4 else 0) + 4 + 4)

    # vision tower
    patches = b * s.image_tokens * shape.merge_size**2
    vw = shape.vision_width
    vision = 0.0
    if patches and counts["vision_grads"]:
        block = 9 * vw + shape.vision_mlp_values * shape.vision_intermediate
        if s.gradient_checkpointing:
            vision = patches * (shape.vision_depth * vw + block) * a
        else:
            vision = patches * shape.vision_depth * block * a
    if patches and (counts["vision_grads"] or counts["merger_grads"]):
        vision += patches * shape.mergers * 4 * vw * a

    # overhead
    overhead = s.overhead_gb * GB
    if z.stage:
        hh = shape.hidden**2
        overhead += w * (z.reduce_bucket if z.reduce_bucket is not None else hh)
        if z.stage == 3:
            overhead += w * (z.prefetch_bucket if z.prefetch_bucket is not None else 0.9 * hh)
    return MemoryPlan(weights=weights, gradients=gradients, optimizer=optimizer, activations=activations,
                      logits=logits, vision=vision, overhead=overhead, trainable_params=trainable, total_params=total,
                      cpu_offloaded=cpu, notes=tuple(notes))


# --- printing ---------------------------------------------------------------------------------------------------
def _gb(value: float) -> str:
    return f"{value / GB:,.2f}"


def breakdown_table(plan: MemoryPlan, gpu_memory_gb: float, s: Settings) -> str:
    labels = {
        "weights": "weights", "gradients": "gradients", "optimizer": "optimizer states (AdamW)",
        "activations": "activations, language model", "vision": "activations, vision tower + merger",
        "logits": "logits (Liger chunk)" if s.use_liger else "logits (+ fp32 copies)",
        "overhead": f"overhead (fixed {s.overhead_gb:g} GB" + (" + ZeRO buckets)" if s.zero.stage else ")"),
    }
    rows = [f"{'part':<38} {'GB':>10}"]
    rows += [f"{labels[part]:<38} {_gb(getattr(plan, part)):>10}" for part in MemoryPlan.PARTS]
    rows.append(f"{'total (peak per GPU)':<38} {_gb(plan.total):>10}")
    verdict = "fits" if plan.fits(gpu_memory_gb) else "does NOT fit"
    rows.append(f"-> {verdict} in {gpu_memory_gb:g} GB ({plan.total / (gpu_memory_gb * GB):.0%} of it)")
    if plan.cpu_offloaded:
        rows.append(f"   plus {_gb(plan.cpu_offloaded)} GB of CPU memory per process for the offloaded optimizer")
    rows += [f"   note: {note}" for note in plan.notes]
    return "\n".join(rows)


def zero_table(shape: ModelShape, s: Settings, gpu_memory_gb: float) -> str:
    """The same estimate under no ZeRO, every shipped config (and the built-in stages not shipped)."""
    from dataclasses import replace

    names = ["none"] + sorted((set(shipped_zero_configs()) | set(BUILTIN_ZERO)) - {"none"})
    head = f"{'zero':<16} {'weights':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'logits':>9} {'vision':>9} {'total GB':>9}  fits"
    rows = [head]
    for name in names:
        plan = estimate(shape, replace(s, zero=resolve_zero(name)))
        cells = " ".join(f"{_gb(getattr(plan, p)):>9}" for p in MemoryPlan.PARTS if p != "overhead")
        rows.append(f"{name:<16} {cells} {_gb(plan.total):>9}  {'yes' if plan.fits(gpu_memory_gb) else 'no'}")
    return "\n".join(rows)


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# --- vision tokens per sample ---------------------------------------------------------------------------------
# Without --data_path and --image_tokens: one image of this many vision tokens per sample (a 896 x 896 picture on
# Qwen2/2.5-VL's 28-pixel tokens, 1024 x 1024 on Qwen3-VL's 32), capped at half of --max_seq_length. Stated in the
# output; --image_tokens 0 plans text only.
DEFAULT_IMAGE_TOKENS = 1024


@dataclass(frozen=True)
class DataTokens:
    """Vision tokens per record of a data file, measured by `measure_data` (LLM tokens, after merging)."""

    file: str
    records: int  # records in the file
    image_tokens: tuple[int, ...]  # per usable record: its images' tokens, summed
    video_tokens: tuple[int, ...]  # per usable record: its videos' tokens, summed
    longest: int  # the longest record's tokens (vision tokens included)
    unusable: int  # records prepare_data left out (invalid, or over --max_seq_length)
    lengths: tuple[int, ...] = ()  # per usable record: its tokens, vision tokens included

    def per_sample(self, packing: bool, max_seq_length: int) -> int:
        """Vision tokens of the worst sample: the largest record's, or under --packing a row of max_seq_length
        tokens filled with the records richest in vision (the largest share of vision tokens, times the row)."""
        if not packing:
            return max(self.per_record)
        share = max(v / n for v, n in zip(self.per_record, self.lengths))
        return min(max_seq_length, math.floor(share * max_seq_length))

    @property
    def per_record(self) -> list[int]:
        return [i + v for i, v in zip(self.image_tokens, self.video_tokens)]

    def describe(self, packing: bool = False, max_seq_length: int = 0) -> str:
        def spread(values) -> str:
            s = sorted(values)
            return f"max {s[-1]:,} / median {s[len(s) // 2]:,}"

        text = (f"vision tokens from --data_path {self.file}: {len(self.per_record)} of {self.records} records measured "
                f"(every record, by vlft sft's start-up check); per record images {spread(self.image_tokens)}, "
                f"videos {spread(self.video_tokens)}; planning with "
                + (f"{self.per_sample(True, max_seq_length):,} per packed row (the largest vision share of a "
                   f"record, {max_seq_length:,} tokens long); " if packing else
                   f"the largest, {max(self.per_record):,} per sample; ")
                + f"longest record {self.longest:,} tokens")
        if self.unusable:
            text += (f"; {self.unusable} record(s) left out (--skip_bad_samples, or over --max_seq_length), as vlft "
                     "sft leaves them out")
        return text


def vision_tokens(spec, merge_size: int) -> int:
    """LLM tokens of one probed image or video (`VisionSpec`): its grid's patches t x h x w over merge_size**2, the
    count ChatEncoder.expansion gives the model (Qwen3-VL's timestamps between temporal patches are text tokens)."""
    t, h, w = spec.grid
    return t * h * w // merge_size**2


def measure_data(model_id: str, data_args) -> DataTokens:
    """Image and video tokens of every usable record of `data_args.data_path`, measured as `vlft sft` measures them
    at start-up (data/prepare.py prepare_data: each image and video decoded once and its grid probed with the model's
    processor and the run's pixel budgets), with its policy for bad records (--skip_bad_samples) and records over
    --max_seq_length (dropped and counted, or refused under --reject_overlong). Cost: that start-up check's, which
    decodes every picture once (threads).

    Raises VlftError when `model_id` is no local directory with a processor (the measurement needs the model's
    processor); DataError (the one vlft sft gives) for bad records unless --skip_bad_samples, as in vlft sft."""
    from vlft.data.encoding import ChatEncoder
    from vlft.data.mixture import data_files, parse_data_paths, prepare_mixture
    from vlft.data.prepare import CONVERSATION, length_flag_of
    from vlft.data.processor_media import apply_media_settings
    from vlft.data.reasoning import Thinking
    from vlft.models.loading import load_family, load_processor

    files = " ".join(data_files(data_args.data_path))
    if not model_id or not Path(model_id).expanduser().is_dir():
        raise VlftError(f"--data_path {files}: measuring the data needs the model's processor; give "
                        "--model_id as a local checkpoint directory (not --family/--size or a hub id), or give "
                        "--image_tokens instead of --data_path")
    parse_data_paths(data_args.data_path)  # every file there, every #N / #p readable
    processor = load_processor(model_id)
    media = data_args.media_settings(load_family(model_id))
    apply_media_settings(processor, media)
    thinking = Thinking.from_args(data_args)
    # the mix vlft sft trains on (each file checked on its own, then its #N / #p; --seed's default draws)
    prepared = prepare_mixture(data_args.data_path, CONVERSATION, seed=42, processor=processor,
                               image_folder=data_args.image_folder, media=media, max_seq_length=data_args.max_seq_length,
                               reject_overlong=data_args.reject_overlong, skip_bad_samples=data_args.skip_bad_samples,
                               **data_args.preparation(), length_flag=length_flag_of(data_args),
                               thinking=thinking)
    merge = ChatEncoder(processor, thinking).merge_size
    unusable = prepared.n_records - getattr(prepared, "usable", len(prepared.samples))  # MixedData: before selection
    return DataTokens(
        file=files, records=len(prepared.samples) + unusable,  # a mix's repeats counted as records
        image_tokens=tuple(sum(vision_tokens(s, merge) for s in specs) for specs in prepared.image_specs),
        video_tokens=tuple(sum(vision_tokens(s, merge) for s in specs) for specs in prepared.video_specs),
        longest=max(prepared.lengths), unusable=unusable,
        lengths=tuple(prepared.lengths))


# --- what trains: the table vlft sft prints --------------------------------------------------------------------
# Flags of vlft sft's TuneArguments that change what trains but that the memory estimate does not model; the table
# counts them, the estimate does not, and the output says so.
NOT_ESTIMATED = ("use_dora", "unfreeze_topk_llm", "unfreeze_topk_vision", "train_router", "num_lora_modules",
                 "lora_namespan_exclude", "lora_bias", "peft_type")


def trainable_table(config, tune) -> tuple[str, int]:
    """(vlft sft's per-part table, trainable parameters) for `config` with `tune` (TuneArguments), built the way
    train/core/setup.py prepare_model builds the model (LoRA with the same targets, then the freeze flags), on PyTorch's
    meta device: no memory, no weights, no download. Liger and quantisation change no count (count_parameters
    counts quantised weights at their logical size)."""
    import torch
    import transformers

    from vlft.models.freezing import apply_freeze, count_parameters, parameter_table, topk_layers
    from vlft.models.registry import get_family
    from vlft.train.core.setup import attach_adapters

    family = get_family(config.model_type)
    t = tune
    with torch.device("meta"):  # PEFT's adapters too: created on the meta device, not initialised on the CPU
        model = getattr(transformers, family.model_class)(config)
        topk = topk_layers(model, family, unfreeze_topk_llm=t.unfreeze_topk_llm,
                           unfreeze_topk_vision=t.unfreeze_topk_vision)
        model, peft_trainable = attach_adapters(model, family, t, topk)
    apply_freeze(model, family, freeze_vision_tower=t.vision_frozen, freeze_merger=t.merger_frozen,
                 freeze_llm=t.llm_frozen, unfreeze_topk_llm=t.unfreeze_topk_llm,
                 unfreeze_topk_vision=t.unfreeze_topk_vision, always_train=peft_trainable, train_router=t.train_router)
    trainable = sum(t for t, _ in count_parameters(model, family).values())
    return parameter_table(model, family), trainable


# --- the scripts' settings ------------------------------------------------------------------------------------
# What `--script` assumes of the GPU machine the script will run on, for settings the environment leaves unset
# (the scripts read them from the machine they run on: nvidia-smi, liger-kernel; the planning machine may have none).
SCRIPT_GPU_DEFAULTS = {"BF16": "true", "GRADIENT_CHECKPOINTING": "true", "USE_LIGER": "false"}
STAGES = ("sft", "dpo", "grpo")


def script_argv(script: str, num_gpus: int) -> list[str]:
    """The `vlft <stage>` flags that `script` (a path, or a name in the checkout's scripts/: finetune_lora) passes
    with this environment's settings (MODEL, DATA, BATCH_SIZE, FREEZE_VISION_TOWER, ...), read by running it with a
    stand-in Python that records the launch and starts nothing. NUM_GPUS is set to `num_gpus` (one node), and the
    SCRIPT_GPU_DEFAULTS fill what the environment leaves unset. Raises VlftError naming --script when the script
    stops before its launch (its own message is included)."""
    import os
    import shlex
    import subprocess
    import sys
    import tempfile

    path = Path(script).expanduser()
    if not path.is_file():
        name = script if script.endswith(".sh") else f"{script}.sh"
        path = Path(__file__).resolve().parents[1] / "scripts" / name
    if not path.is_file():
        raise VlftError(f"--script {script}: no such file, nor scripts/{Path(script).name} in the vlft checkout")
    with tempfile.TemporaryDirectory() as tmp:
        record, stub = Path(tmp) / "argv", Path(tmp) / "python"
        # the launch is the call that names vlft's module and a stage; every other call (the tiny model, the
        # `import liger_kernel` probes) goes to this Python
        stub.write_text("#!/usr/bin/env bash\nprev=\nfor a in \"$@\"; do\n"
                        f"  if [ \"$prev\" = vlft ] && case \"$a\" in {'|'.join(STAGES)}) true;; *) false;; esac; then\n"
                        f"    printf '%s\\0' \"$@\" > {shlex.quote(str(record))}; exit 0\n  fi\n  prev=\"$a\"\ndone\n"
                        f"exec {shlex.quote(sys.executable)} \"$@\"\n")
        stub.chmod(0o755)
        env = {**SCRIPT_GPU_DEFAULTS, **os.environ, "PYTHON": str(stub), "NUM_GPUS": str(num_gpus), "NNODES": "1"}
        done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=600)
        if not record.exists():
            said = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise VlftError(f"--script {path}: the script stopped before launching vlft (exit {done.returncode})"
                            + (": " + " / ".join(said) if said else ""))
        argv = record.read_text().split("\0")[:-1]
    for i, arg in enumerate(argv):
        if arg in STAGES and i and argv[i - 1] == "vlft":
            return argv[i + 1:]
    raise VlftError(f"--script {path}: could not find the vlft stage in its launch: {' '.join(argv)}")


def split_flags(argv: list[str]) -> list[tuple[str, list[str]]]:
    """Flag groups of an argument list (a flag and the values after it), as (flag name, the tokens of the group)."""
    groups: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            groups.append((token[2:].split("=", 1)[0], [token]))
        elif groups:
            groups[-1][1].append(token)
        else:
            raise VlftError(f"unexpected argument {token!r}; flags start with --")
    return groups


# --- the command ----------------------------------------------------------------------------------------------
def build_parser() -> FlagParser:
    parser = FlagParser(
        prog="vlft plan", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other vlft sft flag is accepted too: what trains (--unfreeze_topk_llm, --use_dora, ...) and the "
               "media settings (--image_max_pixels, --fps, ...) go into the trainable table and the data "
               "measurement; flags with no effect on memory (--learning_rate, ...) are listed as ignored.")
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--model_id", help="a local model directory or config.json (or a hub id naming a released size)")
    model.add_argument("--family", choices=sorted(_presets()), help="with --size: a released model from the built-in table")
    model.add_argument("--size", help="e.g. 2B, 7B, 72B (see the table in vlft/plan.py)")
    model.add_argument("--script", help="plan what a finetune script launches with this environment's settings, e.g. "
                       "--script finetune_lora (scripts/finetune_lora.sh; MODEL, DATA, ... as for the script); flags "
                       "given here win")
    run = parser.add_argument_group("run")
    run.add_argument("--zero", default="none",
                     help="none, zero1, zero2, zero2_offload, zero3, zero3_offload (zero_configs/<name>.json), or a DeepSpeed "
                          "config path (--deepspeed, vlft sft's flag, is read the same)")
    run.add_argument("--num_gpus", type=int, default=1, help="GPUs in the job (ZeRO partitions across all of them)")
    run.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    run.add_argument("--per_device_train_batch_size", type=int, default=1)
    run.add_argument("--max_seq_length", type=int, default=8192,
                     help="tokens per sample, vision tokens included (vlft sft's default)")
    run.add_argument("--image_tokens", type=int, default=None,
                     help="vision tokens per sample (LLM tokens, after merging); default: measured from --data_path, "
                          f"else {DEFAULT_IMAGE_TOKENS} (capped at half of --max_seq_length); 0 plans text only")
    run.add_argument("--data_path", nargs="+", help="measure the vision tokens per record from these data files "
                     "(with #N / #p as in vlft sft), as vlft sft does (needs --model_id as a local directory)")
    run.add_argument("--image_folder", help="where the data's relative media paths start (as in vlft sft)")
    run.add_argument("--overhead_gb", type=float, default=DEFAULT_OVERHEAD_GB,
                     help="fixed per-GPU overhead: CUDA context, workspaces, NCCL, fragmentation")
    tune = parser.add_argument_group("what trains (flags as in vlft sft)")
    for flag in ("lora_enable", "vision_lora", "freeze_merger", "gradient_checkpointing", "bf16", "use_liger",
                 "double_quant"):
        default = flag == "double_quant"
        tune.add_argument(f"--{flag}", type=_bool, nargs="?", const=True, default=default)
    for flag in ("freeze_vision_tower", "freeze_llm"):
        tune.add_argument(f"--{flag}", type=_bool, nargs="?", const=True, default=None,
                          help="default: follows LoRA, as in vlft sft (finetune_lora.sh passes --freeze_vision_tower true)")
    tune.add_argument("--lora_target_experts", type=_bool, nargs="?", const=True, default=True,
                      help="MoE models: --lora_enable adapts the routed experts too (default true)")
    tune.add_argument("--lora_rank", type=int, default=64)
    tune.add_argument("--lora_dropout", type=float, default=0.05)
    tune.add_argument("--bits", type=int, default=16, choices=[4, 8, 16])
    return parser


def config_from_args(args) -> tuple[object, str]:
    """(transformers config, description) from --model_id or --family/--size."""
    if args.model_id and (args.family or args.size):
        raise VlftError("give either --model_id or --family with --size, not both")
    if args.model_id:
        path = Path(args.model_id).expanduser()
        preset = None if path.exists() else preset_from_model_id(args.model_id)
        if preset:
            family, size = preset
            return preset_config(family, size), f"{_pretty(family)}-{size} (built-in table)"
        return load_config(args.model_id), args.model_id
    if args.family and args.size:
        return preset_config(args.family, args.size), f"{_pretty(args.family)}-{args.size} (built-in table)"
    raise VlftError("name the model: --model_id DIR (or its config.json), or --family F --size S "
                    f"(sizes: {'; '.join(f'{f}: ' + ', '.join(sizes) for f, sizes in _presets().items())})")


def shape_from_args(args) -> tuple[ModelShape, str]:
    """(shape, description) from --model_id or --family/--size."""
    config, described = config_from_args(args)
    return model_shape(config), described


def settings_from_args(args) -> Settings:
    names = {f.name for f in fields(Settings)} - {"zero"}
    values = {k: getattr(args, k) for k in names}
    values["image_tokens"] = values["image_tokens"] or 0
    return Settings(zero=resolve_zero(args.zero), **values)


def other_flags(extra: list[str]) -> tuple[list[str], list[str], list[str], str | None]:
    """vlft sft's flags that plan has no option of its own for, sorted: (TuneArguments tokens, DataArguments tokens,
    ignored flag names, --deepspeed's value). Raises VlftError for a flag vlft sft does not know, with the closest."""
    from vlft.config import DataArguments, TuneArguments
    from vlft.train.sft.config import GROUPS as SFT_GROUPS

    def names(cls):
        return {f.name for f in fields(cls)}

    sft = set().union(*(names(group) for group in SFT_GROUPS))
    tune, data, ignored, deepspeed = [], [], [], None
    for name, tokens in split_flags(extra):
        if name == "deepspeed":
            deepspeed = tokens[1] if len(tokens) > 1 else None
        elif name in names(TuneArguments):
            tune += tokens
        elif name in names(DataArguments):
            data += tokens
        elif name in sft:
            ignored.append(f"--{name}")
        else:
            from vlft.cli import unknown_flag_error

            raise VlftError(unknown_flag_error([f"--{name}"], sft | build_parser().known_flags()))
    return tune, data, ignored, deepspeed


def main(argv: list[str] | None = None) -> int:
    import sys
    from dataclasses import replace

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from vlft.config import DataArguments, TuneArguments, parse_command  # after --help: it imports transformers

    assumed = []
    if args.script:
        launched = script_argv(args.script, args.num_gpus)
        args, extra = parser.parse_known_args(launched + argv)  # the flags given here come last and win
        assumed.append(f"--script {args.script}: planned the flags it launches with this environment's settings, "
                       "as on a GPU machine where unset (" + ", ".join(f"{k}={v}" for k, v in SCRIPT_GPU_DEFAULTS.items())
                       + f"), NUM_GPUS={args.num_gpus} on one node")
    if args.gpu_memory_gb <= 0:
        raise VlftError("--gpu_memory_gb must be > 0")
    tune_tokens, data_tokens, ignored, deepspeed = other_flags(extra)
    if deepspeed and "--zero" not in argv:
        args.zero = deepspeed
    config, described = config_from_args(args)
    shape = model_shape(config)
    tune = parse_command((TuneArguments,), tune_tokens, prog="vlft plan")[0][0]
    tune = replace(tune, **{f.name: getattr(args, f.name) for f in fields(Settings) if f.name in
                            {g.name for g in fields(TuneArguments)}})

    if args.data_path and args.image_tokens is None:
        data_args = parse_command((DataArguments,), data_tokens + [
            "--data_path", *args.data_path, "--max_seq_length", str(args.max_seq_length)]
            + (["--image_folder", args.image_folder] if args.image_folder else []), prog="vlft plan")[0][0]
        measured = measure_data(args.model_id, data_args)
        args.image_tokens = measured.per_sample(data_args.packing, args.max_seq_length)
        vision_line = measured.describe(data_args.packing, args.max_seq_length)
    elif args.image_tokens is None:
        args.image_tokens = min(DEFAULT_IMAGE_TOKENS, args.max_seq_length // 2)
        vision_line = (f"vision tokens: {args.image_tokens} per sample, the default (one image of "
                       f"{DEFAULT_IMAGE_TOKENS} tokens, at most half of --max_seq_length); give --data_path to measure "
                       "your data, or --image_tokens (0: text only)")
    else:
        vision_line = f"vision tokens: {args.image_tokens} per sample (--image_tokens)"
        if args.data_path:
            vision_line += f"; --data_path {' '.join(args.data_path)} not measured, --image_tokens wins"

    s = settings_from_args(args)
    plan = estimate(shape, s)
    table, table_trainable = trainable_table(config, tune)
    if args.lora_enable and args.freeze_vision_tower is None:
        assumed.append("--lora_enable without --freeze_vision_tower: the vision tower trains fully (vlft sft's "
                       "default); scripts/finetune_lora.sh freezes it (FREEZE_VISION_TOWER=true): add "
                       "--freeze_vision_tower true, or --script finetune_lora, to plan that")
    defaults = TuneArguments()
    unmodelled = [f"--{name}" for name in NOT_ESTIMATED if getattr(tune, name) != getattr(defaults, name)]
    if unmodelled:
        assumed.append(f"{', '.join(unmodelled)}: counted in the table, not in the memory estimate")
    if table_trainable != plan.trainable_params:
        assumed.append(f"the memory estimate counts {plan.trainable_params:,} trainable parameters, the table "
                       f"{table_trainable:,}")
    if ignored:
        assumed.append(f"ignored (no effect on the memory plan): {' '.join(ignored)}")

    lora = trainable_params(shape, s)["lora"]
    trains = (f"{plan.trainable_params - lora:,} of {plan.total_params:,} parameters train"
              + (f", plus {lora:,} LoRA parameters" if lora else ""))
    print(f"model: {described} ({shape.family}), {trains}")
    print(f"run: {s.num_gpus} GPU(s), zero {s.zero.name}, batch {s.per_device_train_batch_size} x {s.max_seq_length} "
          f"tokens ({s.image_tokens} vision tokens per sample), {'bf16' if s.bf16 else 'fp32'}"
          + (", gradient checkpointing" if s.gradient_checkpointing else "") + (", Liger" if s.use_liger else ""))
    print(vision_line)
    print("\nwhat trains (the table vlft sft prints at start-up, for these flags):")
    print(table)
    for line in assumed:
        print(f"assumed: {line}")
    print()
    print(breakdown_table(plan, args.gpu_memory_gb, s))
    print()
    print(f"the same run under each ZeRO config (GB per GPU, {s.num_gpus} GPU(s)):")
    print(zero_table(shape, s, args.gpu_memory_gb))
    print("\nEstimates (vlft/plan.py docstring for the formulas); checked on the CPU, GPU validation pending.")
    return 0
