"""Packing and padding on the hybrid linear-attention families (Qwen3.5, Qwen3.5-MoE): a record in a packed row
or in a padded batch gets what it gets alone, although its Gated DeltaNet layers read no attention mask
(vlft/models/patches/linear_attention.py)."""
from __future__ import annotations

import pytest
import torch
from conftest import demo_subset_file
from test_packing import HYBRID_FAMILIES, VIDEO_DATA, assert_same_step, demo_dataset, packed_and_padded

from vlft.data.collator import SFTCollator
from vlft.models.loading import load_model
from vlft.models.patches import patched_parts, record_spans, separate_packed_records, varlen_linear_attention

MIXED = ("image_only", "video_file", "text_only")  # an image record, a video record, a text-only record


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> str:
    return demo_subset_file(VIDEO_DATA, MIXED, tmp_path_factory.mktemp("mixed") / "mixed.json")


@pytest.fixture(scope="module", params=HYBRID_FAMILIES)
def hybrid(request, tiny_model_factory, mixed_data):
    """(family, model dir, processor, prepared records, dataset) of the three mixed records."""
    model_dir = tiny_model_factory(request.param)
    return (request.param, model_dir, *demo_dataset(model_dir, mixed_data))


def test_one_row_of_image_video_and_text_steps_like_padding(hybrid):
    family, model_dir, processor, _, ds = hybrid
    model, _ = load_model(str(model_dir))
    model.train()
    # the trainer's model_inputs patches the model on its first packed batch
    assert_same_step(family, *packed_and_padded(model, processor, ds, [[0, 1, 2]]))
    assert patched_parts(model)["linear_attention"] == ["model.language_model.layers.0",
                                                        "model.language_model.layers.0.linear_attn"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_gives_each_record_its_own_logits(hybrid, side):
    """The padded path is the oracle of the packed one; GRPO and prediction pad on the left."""
    family, model_dir, processor, checked, ds = hybrid
    model, _ = load_model(str(model_dir))
    model.eval()
    pad = model.get_input_embeddings().weight[processor.tokenizer.pad_token_id]
    with torch.no_grad():  # a trained pad token, as in the released models (<|endoftext|>): padding leaks unless masked
        pad.normal_(generator=torch.Generator().manual_seed(0))
    collator = SFTCollator.for_model(processor, model, padding_side=side)
    with torch.no_grad():
        alone = [model(**collator([ds[i]])) for i in range(len(ds))]
        batch = collator([ds[i] for i in range(len(ds))])
        together = model(**batch)
    width = batch["input_ids"].shape[1]
    assert min(checked.lengths) < width  # every side really pads
    worst = scale = 0.0
    for i, out in enumerate(alone):
        n = checked.lengths[i]
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        worst = max(worst, (out.logits[0] - together.logits[i, cols]).abs().max().item())
        scale = max(scale, out.logits.abs().max().item())
    # the batch's loss is the mean over every label token: the records' losses weighted by their label tokens
    counts = [int((ds[i]["labels"][1:] != -100).sum()) for i in range(len(ds))]
    weighted = sum(out.loss.item() * c for out, c in zip(alone, counts)) / sum(counts)
    print(f"\n{family} {side} padding: max |logit diff| to the record alone {worst:.2e} (logits up to {scale:.2g}); "
          f"loss {together.loss.item():.6f} vs {weighted:.6f}")
    # right: fp32 roundoff, 1e-5 of the logits' size (the MoE's experts see other token groups: ~1.3e-5 of ~7).
    # Left padding puts the records at other offsets of the delta rule's 64-token chunks, after the padding's
    # decay has accumulated in fp32 (the tiny models' decay rates reach 15 per token): ~1.6e-4 on logits of ~7,
    # ~7e-6 with decay rates of 0.1. A leak from the padding into a record would be of order 1.
    tolerance = 1e-5 if side == "right" else 1e-3
    assert worst < tolerance * max(1.0, scale)
    assert abs(together.loss.item() - weighted) < tolerance


def test_record_spans_follow_the_restarts_of_the_positions():
    rows = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3],   # three records
                         [0, 1, 2, 3, 4, 5, 6, 0, 1]])  # a record and the row's padding (positions restart too)
    assert record_spans(rows) == [[(0, 3), (3, 5), (5, 9)], [(0, 7), (7, 9)]]
    assert record_spans(torch.arange(9).expand(2, 9)) is None  # one sequence per row: nothing to separate


def test_patch_leaves_unpacked_batches_to_the_library(hybrid):
    family, model_dir, processor, _, ds = hybrid
    model, _ = load_model(str(model_dir))
    model.eval()
    batch = SFTCollator.for_model(processor, model)([ds[i] for i in range(len(ds))])
    single = SFTCollator.for_model(processor, model)([ds[2]])
    with torch.no_grad():
        before = [model(**batch).logits, model(**single).logits]
        assert separate_packed_records(model) == 1  # the tiny model: one linear-attention layer, one full
        assert separate_packed_records(model) == 0  # applied once
        after = [model(**batch).logits, model(**single).logits]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def _reference_varlen_kernels(seen: list):
    """fla's two varlen kernels, written with transformers' own torch kernels run once per record; `seen` collects
    the cu_seqlens each receives."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as qwen

    def records(cu_seqlens):
        seen.append(cu_seqlens)
        bounds = cu_seqlens.tolist()
        return list(zip(bounds[:-1], bounds[1:]))

    def conv(x, weight, bias, activation, cu_seqlens):
        # fla takes [1, T, D] and returns it; transformers' fallback takes [B, D, T]
        parts = [qwen.causal_conv1d_fn(x[:, s:e].transpose(1, 2), weight, bias, activation=activation).transpose(1, 2)
                 for s, e in records(cu_seqlens)]
        return torch.cat(parts, dim=1), None

    def delta_rule(q, k, v, *, g, beta, cu_seqlens, **kwargs):
        parts = [qwen.torch_chunk_gated_delta_rule(q[:, s:e], k[:, s:e], v[:, s:e], g=g[:, s:e], beta=beta[:, s:e],
                                                   **kwargs)[0] for s, e in records(cu_seqlens)]
        return torch.cat(parts, dim=1), None

    return conv, delta_rule


def test_fla_path_plumbing_with_reference_kernels(tiny_model_factory):
    """The CUDA path (fla's varlen kernels) cannot run here: its own code runs with reference kernels in fla's
    signatures, and must give the library's layer run on each record alone, from the right cu_seqlens."""
    model, _ = load_model(str(tiny_model_factory("qwen3_5")))
    layer = model.model.language_model.layers[0].linear_attn
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, model.config.text_config.hidden_size)
    spans = [[(0, 5), (5, 12), (12, 16)], [(0, 16)]]
    seen = []
    conv, delta_rule = _reference_varlen_kernels(seen)
    with torch.no_grad():
        got = varlen_linear_attention(layer, hidden, spans, conv=conv, delta_rule=delta_rule)
        want = torch.stack([torch.cat([layer(hidden[b:b + 1, s:e])[0] for s, e in row]) for b, row in enumerate(spans)])
    expected_cu = torch.tensor([0, 5, 12, 16, 32])  # rows laid end to end, 16 tokens each
    assert len(seen) == 2 and all(torch.equal(cu, expected_cu) for cu in seen)
    assert got.shape == hidden.shape
    assert (got - want).abs().max() < 1e-5
