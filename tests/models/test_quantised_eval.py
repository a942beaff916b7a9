"""QLoRA (--bits 4) on Qwen3.5: the Gated DeltaNet gate projections stay in full precision, so a no-grad eval
forward (--eval_data_path, generation) runs on CPU. bitsandbytes' CPU inference path repacks 4-bit weights in
blocks of 32 outputs and raised "N must be divisible by block_n" on their one-per-value-head outputs (4 in the tiny
model, 48 in Qwen3.5-27B); on CPUs without AVX512-BF16 that path is not taken and this test checks the rest."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlft.models.loading import NOT_QUANTISED, load_model

pytest.importorskip("bitsandbytes")


def test_qwen3_5_4bit_eval_forward(tiny_model_factory):
    model, _ = load_model(str(tiny_model_factory("qwen3_5")), bits=4)
    prefix = "model.language_model.layers."
    kinds = {name[len(prefix):].split(".", 1)[1]: type(module).__name__ for name, module in model.named_modules()
             if name.startswith(prefix) and name.count(".") > 3}  # within a decoder layer, by its relative name
    assert kinds["linear_attn.in_proj_qkv"] == "Linear4bit"  # the decoder is quantised ...
    assert {kinds[n] for n in NOT_QUANTISED if n in kinds} == {nn.Linear.__name__}  # ... but not these
    model.eval()
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
