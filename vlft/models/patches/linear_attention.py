"""Packed rows through Gated DeltaNet (linear-attention) layers (`separate_packed_records`).

Why: with `--packing` a row holds several records back to back (vlft/train/core/model_inputs.py). Full-attention
layers keep them apart because transformers builds a block-diagonal mask from the text position ids, which
restart at 0 for every record (masking_utils.find_packed_sequence_indices). The Gated DeltaNet layers of
Qwen3.5 and Qwen3.5-MoE (`Qwen3_5GatedDeltaNet`, `Qwen3_5MoeGatedDeltaNet`) never see those position ids: the
decoder layer hands them only `hidden_states`, the cache and a padding mask. Their causal convolution (kernel 4)
and their recurrent delta-rule state then run from one record into the next (tiny model: the second record's
logits off by up to 6.6). The library separates sequences only through `cu_seq_lens_q` / `seq_idx` keyword
arguments meant for flash-linear-attention and causal-conv1d, on a batch of one row; its torch fallbacks raise
when given them, and a keyword given to the model's forward would also reach the vision tower's attention.

What the patch does, on one model instance (never a class): each decoder layer that holds a `linear_attn`
reads the record spans from the text position ids it already receives, under transformers' own rule and
conditions (a record starts wherever a position is not its predecessor + 1; only with no padding mask and no
cache, i.e. exactly when the full-attention layers see packed records too), and passes them to its `linear_attn`
as one extra keyword, which the decoder layer forwards there untouched (activation checkpointing replays the
layer with the same keywords). Nothing new travels through the model's own forward. The patched `linear_attn`:
- with flash-linear-attention (`fla`) importable and the tensors on CUDA in bf16 / fp16: runs once over all rows
  laid end to end, with fla's varlen causal convolution and varlen chunked delta rule given the records'
  `cu_seqlens` (`varlen_linear_attention`). No GPU here: its plumbing is tested on the CPU with reference kernels
  in fla's signatures, and bench/gpu_packing_hybrid.py checks it against records alone on a GPU;
- otherwise: runs the library's own forward once per record slice (a Python loop over the records of the batch)
  and concatenates, so that the convolution and the recurrent state start from zero for every record, as for a
  record alone.
Anything else (one sequence per row, a padded batch, generation with a cache) runs the library's forward as is.
Padded batches need nothing: the library zeroes padding before the convolution, and the state stays zero through
left padding (tests/train/test_packing_hybrid.py). The spans are read on the host once per forward (`_SpanCache`).

Versions: transformers 5.24 (read against it: `Qwen3_5*DecoderLayer.forward(hidden_states, position_embeddings,
attention_mask, position_ids, cache, **kwargs)` calls `self.linear_attn(hidden_states=, cache=, attention_mask=,
**kwargs)`; the GatedDeltaNet forward projects with `in_proj_qkv/z/b/a`, convolves with the depthwise `conv1d`,
applies the delta rule with `g = -exp(A_log) * softplus(a + dt_bias)`, `beta = sigmoid(b)`, q and k l2-normalised,
and ends in the gated `norm` and `out_proj`, which `varlen_linear_attention` repeats). flash-linear-attention:
`fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g=, beta=, ..., cu_seqlens=)`, the function transformers
itself calls when fla is installed, and `fla.modules.convolution.causal_conv1d(x=[1, T, D], weight=[D, W], bias=,
activation=, cu_seqlens=)` (fla's own GatedDeltaNet layer uses both so).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlft.models.patches._common import _ORIGINAL_FORWARD, unwrap_model

RECORDS_KWARG = "vlft_record_spans"  # what a patched decoder layer hands its linear_attn: per row, (start, end) spans
_SPANS = "_vlft_span_cache"  # on a patched decoder layer: the model's shared `_SpanCache`
_APPLIED = "_vlft_packed_records"  # on the model: separate_packed_records has run
_SIGNATURE = "_vlft_signature"  # on a patched decoder layer: its original forward's signature


def record_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """The records of each row of a packed batch, from its text position ids [B, L] (or [1, L], shared by every
    row): per row, (start, end) token spans that tile it, a new one starting wherever a position is not its
    predecessor + 1 (transformers' rule: masking_utils.find_packed_sequence_indices, 5.2x). A row's padding,
    whose positions restart too, is a span of its own. None when every row holds one sequence."""
    starts = torch.diff(position_ids, dim=-1) != 1  # [B, L-1]: token i+1 starts a record
    if not bool(starts.any()):
        return None
    length = position_ids.shape[-1]
    by_row: list[list[int]] = [[] for _ in range(position_ids.shape[0])]
    for row, i in starts.nonzero().tolist():
        by_row[row].append(i + 1)
    return [list(zip([0, *cuts], [*cuts, length])) for cuts in by_row]


def _cu_seqlens(spans: list[list[tuple[int, int]]], length: int, device) -> torch.Tensor:
    """int64 [N + 1] offsets of the N records of every row in the rows laid end to end (row b starts at b * length):
    the `cu_seqlens` of fla's varlen kernels (a LongTensor in their documentation), which take a batch of one."""
    offsets = [b * length + start for b, row in enumerate(spans) for start, _ in row] + [len(spans) * length]
    return torch.tensor(offsets, dtype=torch.long, device=device)


def varlen_linear_attention(layer: nn.Module, hidden_states: torch.Tensor, spans: list[list[tuple[int, int]]], *,
                            conv: Callable, delta_rule: Callable) -> torch.Tensor:
    """A Gated DeltaNet layer (transformers 5.24's forward, without cache or padding mask) over packed rows
    [B, L, hidden], each record on its own: the rows are laid end to end into one, and the record offsets
    (`_cu_seqlens`) go to the two kernels that mix tokens, `conv(x=[1, T, D], weight=[D, W], bias=, activation=,
    cu_seqlens=) -> (y, state)` and `delta_rule(q, k, v, g=, beta=, initial_state=, output_final_state=,
    use_qk_l2norm_in_kernel=, cu_seqlens=) -> (o, state)`: fla's, or reference kernels in the tests.
    Returns [B, L, hidden]."""
    batch, length, _ = hidden_states.shape
    cu_seqlens = _cu_seqlens(spans, length, hidden_states.device)
    flat = hidden_states.reshape(1, batch * length, -1)
    tokens = flat.shape[1]
    mixed, _ = conv(x=layer.in_proj_qkv(flat), weight=layer.conv1d.weight.squeeze(1), bias=layer.conv1d.bias,
                    activation=layer.activation, cu_seqlens=cu_seqlens)
    query, key, value = torch.split(mixed, [layer.key_dim, layer.key_dim, layer.value_dim], dim=-1)
    query = query.reshape(1, tokens, -1, layer.head_k_dim)
    key = key.reshape(1, tokens, -1, layer.head_k_dim)
    value = value.reshape(1, tokens, -1, layer.head_v_dim)
    beta = layer.in_proj_b(flat).sigmoid()
    g = -layer.A_log.float().exp() * F.softplus(layer.in_proj_a(flat).float() + layer.dt_bias)
    out, _ = delta_rule(query, key, value, g=g, beta=beta, initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
    gate = layer.in_proj_z(flat).reshape(-1, layer.head_v_dim)
    out = layer.norm(out.reshape(-1, layer.head_v_dim), gate).reshape(1, tokens, -1)
    return layer.out_proj(out).reshape(batch, length, -1)


@functools.cache
def _fla_kernels() -> tuple[Callable, Callable] | None:
    if importlib.util.find_spec("fla") is None:
        return None
    from fla.modules.convolution import causal_conv1d
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return causal_conv1d, chunk_gated_delta_rule


class _SpanCache:
    """The record spans of the last position ids seen: every decoder layer of one forward (and its recomputation
    under activation checkpointing) gets the same tensor, so the device-to-host read happens once per forward."""

    def __init__(self):
        self._ref, self._version, self._spans = None, None, None

    def __call__(self, position_ids: torch.Tensor):
        if self._ref is None or self._ref() is not position_ids or self._version != position_ids._version:
            self._spans = record_spans(position_ids)
            self._ref, self._version = weakref.ref(position_ids), position_ids._version
        return self._spans


def _decoder_layer_forward(self, *args, **kwargs):
    original = self.__dict__[_ORIGINAL_FORWARD]
    named = self.__dict__[_SIGNATURE].bind_partial(*args, **kwargs).arguments
    position_ids, hidden_states = named.get("position_ids"), named.get("hidden_states")
    cache = named.get("cache", kwargs.get("past_key_values"))
    # transformers' conditions for packed records (masking_utils._preprocess_mask_arguments): position ids, no
    # padding mask, no cache; the linear layers' mask is None exactly when the 2-D padding mask is None or all ones
    if position_ids is not None and position_ids.ndim == 2 and named.get("attention_mask") is None and cache is None:
        if hidden_states is not None and position_ids.shape[0] != hidden_states.shape[0]:
            position_ids = position_ids.expand(hidden_states.shape[0], -1)  # [1, L]: transformers expands it so too
        spans = self.__dict__[_SPANS](position_ids)
        if spans is not None:
            kwargs[RECORDS_KWARG] = spans
    return original(*args, **kwargs)


def _linear_attention_forward(self, hidden_states, *args, **kwargs):
    spans = kwargs.pop(RECORDS_KWARG, None)
    original = self.__dict__[_ORIGINAL_FORWARD]
    if spans is None:
        return original(hidden_states, *args, **kwargs)
    # fla's chunked delta rule takes 16-bit inputs (releases of 2025 assert on fp32): fp32 goes the per-record way
    kernels = _fla_kernels() if hidden_states.is_cuda and hidden_states.dtype != torch.float32 else None
    if kernels is not None:
        return varlen_linear_attention(self, hidden_states, spans, conv=kernels[0], delta_rule=kernels[1])
    rows = [torch.cat([original(hidden_states[b:b + 1, start:end], *args, **kwargs) for start, end in row], dim=1)
            for b, row in enumerate(spans)]
    return torch.cat(rows, dim=0)


_decoder_layer_forward._vlft_patch = "linear_attention"
_linear_attention_forward._vlft_patch = "linear_attention"


def separate_packed_records(model) -> int:
    """Make the Gated DeltaNet layers of `model` (a Qwen3.5 / Qwen3.5-MoE model, under PEFT or not) keep the
    records of packed rows apart, as the module docstring explains. Patches the instances of every decoder layer
    that holds a `linear_attn` and of that `linear_attn`. Returns the number of linear-attention layers patched:
    0 for models without them, which are left as they are, and for a model already seen (a mark on the model makes
    a repeated call cost one attribute read, so the trainer can call it for every packed batch)."""
    model = unwrap_model(model)
    if getattr(model, _APPLIED, False):
        return 0
    spans = _SpanCache()
    patched = 0
    for layer in model.modules():
        attention = getattr(layer, "linear_attn", None)
        if not isinstance(attention, nn.Module) or _SPANS in layer.__dict__:
            continue
        layer.__dict__[_SPANS] = spans
        layer.__dict__[_SIGNATURE] = inspect.signature(layer.forward)
        for module, forward in ((layer, _decoder_layer_forward), (attention, _linear_attention_forward)):
            module.__dict__[_ORIGINAL_FORWARD] = module.forward
            module.forward = types.MethodType(forward, module)
        patched += 1
    model.__dict__[_APPLIED] = True
    return patched
