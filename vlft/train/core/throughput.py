"""Throughput on every log line: tokens/s, samples/s, peak memory and, on a known GPU, model FLOPs utilisation.

    callback = ThroughputCallback(model, family, real_tokens=lambda: int(trainer.real_tokens.item()))
    trainer.add_callback(callback)

The counts come from callables the caller hands in (the trainer counts non-pad tokens in `compute_loss`); the
callback never reaches into the trainer. Rates on a log line cover the interval since the previous log line;
`on_train_end` logs one summary over the whole run (warm-up included).

Model FLOPs (an estimate; the convention of PaLM, Chowdhery et al. 2022, appendix B: the FLOPs the model needs,
not what the hardware runs, so activation recomputation and padding never count, and attention counts the full
(not causal-halved) score matrix). For T real tokens in R records with P vision patches:

    FLOPs = 6 * (N_llm + k / E * N_exp) * T               decoder layers + output projection (lm_head)
          + 12 * L_full * d_attn * T * (T / R)             LLM full attention at the mean record length T / R
          + L_lin * F_gdn * T                              LLM linear attention (Gated DeltaNet), linear in T
          + f_v * N_vision * P                             vision blocks and patch embedding, per patch
          + f_m * N_merger * P / m**2                      merger(s), per merged token (m = spatial merge size)
          + 2 * f_v * d_v * ((L_v - n_w) * Q + n_w * W * P)   vision attention, when `vision_pairs` is given

- N_* count parameters (ZeRO-3: `ds_numel`), split by `family.part_of`; lookup tables (token and position
  embeddings) are free, the output projection counts once even when tied to the token embedding, LoRA adapters
  count where they sit. L_full, d_attn: decoder layers with softmax attention (all but the `linear_attention`
  ones of `TextShape.layer_kinds`) and heads x head_dim.
- Mixture of experts: N_exp are the routed experts' parameters (`Family.moe.experts`, LoRA adapters on them
  included), of which each token runs k = experts_per_token of E = experts; N_llm holds every other parameter,
  the router (E x hidden, so its 2 E h forward FLOPs per token are in the 6 N term) and a shared expert included.
- Linear attention: F_gdn = 3 * H * (6 C d_k + 4 C d_v + 6 d_k d_v + C**2 / 3) training FLOPs per token and
  layer (backward twice the forward, the convention) for the chunked gated delta rule with H value heads of
  d_v, keys and queries of d_k (transformers repeats them to the H value heads) and chunks of C = 64 tokens
  (transformers' and flash-linear-attention's chunk size). Per chunk and head the forward runs beta K K^T
  (2 C^2 d_k), inverts that unit lower-triangular C x C system (C^3 / 3), W = A (beta K decayed) and U = A (beta V)
  (2 C^2 (d_k + d_v)), the state pass V' = U - W S and S <- decay S + K^T V' (4 C d_k d_v) and the output
  Q S (2 C d_k d_v) plus the masked in-chunk attention (Q K^T) V' (2 C^2 (d_k + d_v)) (Yang et al., Gated Delta
  Networks, arXiv 2412.06464, its chunkwise WY form; fla's chunk_gated_delta_rule_fwd: chunk_scaled_dot_kkt,
  solve_tril, recompute_w_u, chunk_gated_delta_rule_fwd_h, chunk_fwd_o). The short causal convolution (kernel K
  over the 2 d_k H_k + d_v H channels of q, k, v, depthwise) uses each weight once per token, like a linear layer,
  so 6 N counts it already (2 K FLOPs per channel and token forward), as it counts the projections; the gates,
  the L2 and gated RMS norms are elementwise and left out like every norm.
- f = 6 (forward 2N + backward 4N) for parts gradients flow through: the LLM always (under LoRA too, and it is
  the convention), the tower when any of its parameters trains (LoRA included), the merger when it or the tower
  trains; f = 2 (forward only) otherwise, e.g. a frozen tower under LoRA, which runs without a graph.
- Vision attention: Q = sum over images and video frames (temporal patches) of (patches in it)**2, the query-key
  pairs of full attention, which the tower runs per image / frame; L_v, d_v: vision blocks and width; Qwen2.5-VL
  runs n_w of its blocks (all but `fullatt_block_indexes`) in windows of W patches, else n_w = 0. Without
  `vision_pairs` the vision attention is left out (an underestimate: MFU reads low for large images).

MFU = FLOPs per second of this process / the GPU's dense bf16 peak (`PEAK_BF16_FLOPS`); CUDA only; on a GPU
missing from the table it is left out, with one log line saying so.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from vlft.utils import log

# Dense bf16 peak FLOP/s by device-name substring (lower case), first match wins: specific names before general.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989e12),
    ("a100", 312e12),  # SXM and PCIe
    ("l40s", 362e12),
    ("a10g", 125e12),
    ("rtx 4090", 165e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its `torch.cuda.get_device_name()`, or None when unknown."""
    name = device_name.lower()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps the real size aside, numel() is 0


DELTA_RULE_CHUNK = 64  # tokens per chunk of the chunked gated delta rule (transformers' and fla's default)


def gated_deltanet_flops(heads: int, key_dim: int, value_dim: int, chunk: int = DELTA_RULE_CHUNK) -> float:
    """Training FLOPs per token of one Gated DeltaNet layer's chunked delta rule, its projections and convolution
    left out (they are in 6 N): 3 * heads * (6 C d_k + 4 C d_v + 6 d_k d_v + C**2 / 3), C = `chunk`; `heads` value
    heads of `value_dim` features, queries and keys of `key_dim` per value head. Derivation and sources: module
    docstring."""
    c = chunk
    forward = heads * (6 * c * key_dim + 4 * c * value_dim + 6 * key_dim * value_dim + c * c / 3)
    return 3 * forward


@dataclass(frozen=True)
class FlopsModel:
    """Parameter counts and shapes for the FLOPs estimate of the module docstring."""

    llm_params: int  # decoder layers, final norm, output projection (and anything no part claims), routed experts aside
    vision_params: int  # vision blocks and patch embedding
    merger_params: int
    vision_factor: int  # 6 when gradients flow through the tower, else 2
    merger_factor: int
    full_attention_layers: int  # decoder layers with softmax attention (the quadratic term)
    attn_width: int  # heads x head_dim
    merge_size: int = 1
    vision_layers: int = 0
    vision_width: int = 0
    vision_window_layers: int = 0
    window_patches: int = 0
    expert_params: int = 0  # routed experts of every MoE layer, all of them (LoRA adapters on them included)
    expert_share: float = 0.0  # experts_per_token / experts: the share of expert_params one token runs through
    linear_attention_layers: int = 0
    linear_attention_flops: float = 0.0  # training FLOPs per token of one linear-attention layer (gated_deltanet_flops)

    @property
    def active_llm_params(self) -> float:
        """Language-model parameters one token runs through: N_llm + k / E * N_exp."""
        return self.llm_params + self.expert_share * self.expert_params

    def flops(self, tokens: float, records: float, patches: float = 0, pairs: float | None = None) -> float:
        """Training FLOPs of `tokens` real tokens in `records` records with `patches` vision patches and `pairs`
        query-key pairs of the tower's full attention (None: vision attention left out)."""
        if tokens <= 0:
            return 0.0
        mean_len = tokens / max(records, 1)
        total = 6 * self.active_llm_params * tokens
        total += 12 * self.full_attention_layers * self.attn_width * tokens * mean_len
        total += self.linear_attention_layers * self.linear_attention_flops * tokens
        total += self.vision_factor * self.vision_params * patches
        total += self.merger_factor * self.merger_params * patches / self.merge_size**2
        if pairs is not None:
            full_layers = self.vision_layers - self.vision_window_layers
            total += 2 * self.vision_factor * self.vision_width * (
                full_layers * pairs + self.vision_window_layers * self.window_patches * patches)
        return total


def is_routed_expert(family, name: str) -> bool:
    """True for a parameter (or module) name inside the routed experts of a decoder layer: the modules holding
    `family.moe.experts` (their fused 3-D weights, and PEFT's wrappers and adapters on them); PEFT's
    `base_model.model.` prefix is tolerated. Always False for a family without MoE (or None)."""
    if family is None or family.moe is None:
        return False
    found = family.layer_index(name)
    if found is None or found[0] != "llm":
        return False
    inner = name.removeprefix("base_model.model.")[len(family.llm_layers_prefix):].split(".", 1)[-1] + "."
    return any(inner.startswith(path.rsplit(".", 1)[0] + ".") for path in family.moe.experts)


def estimate_flops(model, family=None) -> FlopsModel:
    """Count `model`'s parameters into the estimate's parts (`family.part_of`; without a family, read from the
    config, or all of it as LLM for a model vlft does not know), the routed experts apart (`is_routed_expert`), and
    read the language model's layer kinds and experts through `family.text_shape` and the tower's shape through
    `family.vision_shape` (an unknown model gets no vision terms and is read as a dense decoder)."""
    from vlft.models.families.base import read_text_shape
    from vlft.models.registry import FAMILIES

    config = model.config
    family = family or FAMILIES.get(getattr(config, "model_type", None))
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    head_weight = getattr(head, "weight", None)
    counts = {"llm": 0, "vision": 0, "merger": 0, "experts": 0}
    trains = {"llm": True, "vision": False, "merger": False}
    for name, p in model.named_parameters():
        part = family.part_of(name) if family is not None else "llm"
        part = part if part in ("vision", "merger") else "llm"  # the embeddings, the head, anything unclaimed
        trains[part] |= p.requires_grad
        if id(p) not in lookups and p is not head_weight:  # the head is counted once below, even when tied
            counts["experts" if is_routed_expert(family, name) else part] += _numel(p)
    if head_weight is not None:
        counts["llm"] += _numel(head_weight)
        bias = getattr(head, "bias", None)
        counts["llm"] += _numel(bias) if bias is not None else 0

    text_config = getattr(config, "text_config", config)
    text = family.text_shape(text_config) if family is not None else read_text_shape(text_config)
    vision = getattr(config, "vision_config", None)
    shape = {}
    if vision is not None and family is not None:  # the family knows which vision_config fields to read
        v = family.vision_shape(vision)
        shape = dict(merge_size=v.merge_size, vision_layers=v.depth, vision_width=v.width,
                     vision_window_layers=v.window_blocks, window_patches=v.window_patches)
    if text.is_hybrid:
        shape.update(linear_attention_layers=text.linear_attention_layers, linear_attention_flops=gated_deltanet_flops(
            text.linear_value_heads, text.linear_key_head_dim, text.linear_value_head_dim))
    vision_factor = 6 if trains["vision"] else 2
    return FlopsModel(
        llm_params=counts["llm"], vision_params=counts["vision"], merger_params=counts["merger"],
        vision_factor=vision_factor, merger_factor=6 if trains["vision"] or trains["merger"] else 2,
        full_attention_layers=text.layers - text.linear_attention_layers, attn_width=text.heads * text.head_dim,
        expert_params=counts["experts"], expert_share=text.experts_per_token / text.experts if text.is_moe else 0.0,
        **shape,
    )


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GB (1e9 bytes): allocated by torch on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second`, `samples_per_second`, `peak_memory_gb` and (on a known CUDA GPU) `mfu` to every
    log line that follows new tokens, and logs a summary at the end of training. See the module docstring.

    real_tokens: cumulative non-pad tokens this process trained on (image and video pad tokens included).
    real_samples: cumulative records this process trained on (packed rows count their records). Without it,
        records are counted as steps x per-device batch x accumulation, which under packing counts rows (then
        samples/s is rows/s and the attention term uses the row length).
    vision_tokens: cumulative vision patches (rows of `pixel_values` and `pixel_values_videos`); without it the
        tower's FLOPs are left out.
    vision_pairs: cumulative query-key pairs of the tower's full attention, sum of t * (h * w)**2 over the
        `*_grid_thw` rows; without it the vision attention is left out.
    clock: seconds, monotonic (tests pass a fake one).

    Token and sample rates are for the whole job: this process's counts times the world size (counting on every
    rank would need a collective in a logging hook). MFU is per GPU, from this process's counts. Each counter is
    read before the clock, so reading a device tensor (`.item()`) has waited for the queued GPU work."""

    def __init__(self, model, family=None, *, real_tokens: Callable[[], int], real_samples: Callable[[], int] | None = None,
                 vision_tokens: Callable[[], int] | None = None, vision_pairs: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.flops_model = estimate_flops(model, family)
        self.real_tokens = real_tokens
        self.real_samples = real_samples
        self.vision_tokens = vision_tokens
        self.vision_pairs = vision_pairs
        self.clock = clock
        self.device = torch.device("cpu")
        self.peak_flops: float | None = None
        self.summary: dict | None = None
        self._start: dict | None = None
        self._last: dict | None = None

    def _read(self, args, state) -> dict:
        def count(fn):
            return float(fn()) if fn is not None else None

        if self.real_samples is not None:
            samples = count(self.real_samples)
        else:
            samples = float(state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps)
        reading = {"tokens": count(self.real_tokens), "samples": samples, "patches": count(self.vision_tokens),
                   "pairs": count(self.vision_pairs)}
        reading["time"] = self.clock()  # after the counters: see the class docstring
        return reading

    def _rates(self, args, begin: dict, end: dict) -> dict | None:
        seconds = end["time"] - begin["time"]
        tokens = end["tokens"] - begin["tokens"]
        if seconds <= 0 or tokens <= 0:
            return None
        samples = end["samples"] - begin["samples"]
        world = max(getattr(args, "world_size", 1), 1)
        rates = {"tokens_per_second": tokens * world / seconds, "samples_per_second": samples * world / seconds,
                 "peak_memory_gb": peak_memory_gb(self.device)}
        patches = end["patches"] - begin["patches"] if end["patches"] is not None else 0
        pairs = end["pairs"] - begin["pairs"] if end["pairs"] is not None else None
        flops = self.flops_model.flops(tokens, samples, patches, pairs)
        if self.peak_flops:
            rates["mfu"] = flops / seconds / self.peak_flops
        rates["flops"] = flops  # this process's model FLOPs over the interval (kept out of the log lines)
        return rates

    def on_train_begin(self, args, state, control, **kwargs):
        self.device = torch.device(args.device)
        self.peak_flops = None
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            self.peak_flops = peak_bf16_flops(name)
            if self.peak_flops is None:
                known = ", ".join(key for key, _ in PEAK_BF16_FLOPS)
                log(f"MFU not reported: no dense bf16 peak known for {name!r} (known: {known})")
        self._start = self._last = self._read(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._last is None or logs is None:
            return
        now = self._read(args, state)
        rates = self._rates(args, self._last, now)
        if rates is None:  # nothing trained since the last line (e.g. the Trainer's end-of-training metrics)
            return
        self._last = now
        added = {key: round(value, 6 if key == "mfu" else 3) for key, value in rates.items() if key != "flops"}
        # The Trainer appended a copy of `logs` to the history just before this hook: update it too, so that
        # trainer_state.json carries the figures (callbacks after this one, the printer among them, see `logs`).
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and all(last.get(key) is value for key, value in logs.items()):
            last.update(added)
        logs.update(added)

    def on_train_end(self, args, state, control, **kwargs):
        if self._start is None:
            return
        rates = self._rates(args, self._start, self._read(args, state))
        if rates is None:
            return
        self.summary = rates
        memory = "GPU, allocated" if self.device.type == "cuda" else "process RSS"
        line = (f"throughput: {rates['tokens_per_second']:,.0f} tokens/s, {rates['samples_per_second']:.2f} samples/s, "
                f"peak memory {rates['peak_memory_gb']:.2f} GB ({memory})")
        if "mfu" in rates and math.isfinite(rates["mfu"]):
            line += f", MFU {rates['mfu']:.1%} of {self.peak_flops / 1e12:.0f} TFLOP/s bf16"
        line += f", {rates['flops']:.3e} model FLOPs on this process"
        log(line + " (mean over the run, warm-up included)")


class TokensProgressCallback(ProgressCallback):
    """HF's progress bar (steps done / total, elapsed < time left, steps/s; each log line printed above it) with
    the latest figures in its postfix: `tokens/s` (this module's `tokens_per_second`, whole job), `loss` and,
    once evaluated, `eval_loss`:

        37%|####      | 37/100 [01:02<01:46,  1.69s/it, tokens/s=4,210, loss=1.234]

    A figure stays until a newer log line replaces it (an evaluation line does not erase tokens/s). Installed by
    `use_tokens_progress_bar` in place of the Trainer's ProgressCallback; it must come after ThroughputCallback,
    which adds `tokens_per_second` to the log line."""

    POSTFIX = (("tokens_per_second", "tokens/s", "{:,.0f}"), ("loss", "loss", "{:.4g}"), ("eval_loss", "eval_loss", "{:.4g}"))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.postfix: dict[str, str] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        for key, label, fmt in self.POSTFIX:
            value = logs.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.postfix[label] = fmt.format(value)
        if self.postfix:
            self.training_bar.set_postfix(self.postfix)


def use_tokens_progress_bar(trainer) -> None:
    """Replace `trainer`'s ProgressCallback (present unless --disable_tqdm) by TokensProgressCallback, last in
    the callback list, so that it sees the figures the other callbacks add to a log line."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(TokensProgressCallback())
