"""The KTO stage on 2 CPU processes (gloo) through the scripts' launcher, under ZeRO-3: the same global batch gives
the single-process loss, KL estimate and rewards at every step (TRL's rule: each process's KL estimate is gathered
and averaged, so 2 x 2 records give the 4-record mean), with a rank whose micro-batch holds no image at every step;
LoRA with a trained merger needs --precompute_ref_log_probs there, and with it gives the single-process cache.

As tests/distributed/test_dpo_distributed.py: plain SGD, 4 records = one global batch, so every step sees every
record whatever the order."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from launcher import launch

from vlft.train.kto.run import run

pytestmark = pytest.mark.distributed
TOL = 1e-5


def history(out) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """An image record first (rank 0's share of the reference pass: records 0 and 2), then 3 text-only ones; two
    desirable and two undesirable answers."""
    pairs = {r["id"]: r for r in json.loads((REPO / "data_examples" / "dpo_demo.json").read_text())}
    image = pairs["multi_image"]
    rows = [
        {k: v for k, v in image.items() if k not in ("chosen", "rejected")} | {"completion": image["chosen"],
                                                                                "label": True},
        {"id": "text_good", "prompt": "What is two plus two?", "completion": "Four.", "label": True},
        {"id": "text_bad", "prompt": "Name a primary colour.", "completion": "Purple.", "label": False},
        {"id": "text_bad_2", "prompt": "What is the capital of Italy?", "completion": "Paris.", "label": 0},
    ]
    path = tmp_path_factory.mktemp("data") / "kto.json"
    path.write_text(json.dumps(rows))
    return path


def common(model_dir, data, out, per_device: int) -> list[str]:
    return ["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(REPO / "data_examples"),
            "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", str(per_device),
            "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--logging_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0", "--weight_decay", "0.0",
            "--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0",
            "--freeze_vision_tower", "true", "--beta", "0.1"]


ADAPTERS_ONLY = ["--freeze_merger", "true"]
WITH_MERGER = ["--freeze_merger", "false", "--precompute_ref_log_probs", "true"]


@pytest.mark.parametrize("flags", [ADAPTERS_ONLY, WITH_MERGER], ids=["adapters_off", "precomputed_with_merger"])
def test_zero3_gives_the_single_process_losses(flags, tiny_model_dir, records, tmp_path):
    single = tmp_path / "single"
    run(common(tiny_model_dir, records, single, 4) + flags)
    out = tmp_path / "zero3"
    proc = launch("kto", common(tiny_model_dir, records, out, 2) + flags, zero="zero3")
    ref, got = history(single), history(out)
    assert len(ref) == len(got) == 3
    print(f"\n1 process {[h['loss'] for h in ref]}\n2 processes {[h['loss'] for h in got]}")
    assert ref[0]["loss"] == pytest.approx(0.5, abs=1e-5) and ref[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.01  # the curve moves, so equal curves mean something
    for a, b in zip(ref, got):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert abs(a[key] - b[key]) < TOL * max(1.0, abs(a[key])), (key, a, b)
    if "--precompute_ref_log_probs" in flags:
        assert "reference log-probs: computed for 4" in proc.stderr
        (ref_file,) = (single / "ref_log_probs").glob("*.pt")
        a, b = (torch.load(p, weights_only=True)["values"] for p in (ref_file, out / "ref_log_probs" / ref_file.name))
        assert a.shape == b.shape == (4, 2) and torch.allclose(a, b, atol=TOL, rtol=1e-6)


def test_zero3_refuses_lora_with_trained_merger_without_precompute(tiny_model_dir, records, tmp_path):
    out = tmp_path / "out"
    proc = launch("kto", common(tiny_model_dir, records, out, 2) + ["--freeze_merger", "false"], zero="zero3",
                  expect_success=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "vlft kto: error: under ZeRO-3, LoRA with fully trained parameters" in proc.stderr, proc.stderr[-3000:]
