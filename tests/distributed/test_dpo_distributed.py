"""The DPO stage on 2 CPU processes (gloo), through the launcher the scripts use (scripts/_common.sh, as in
test_distributed.py): under ZeRO-3 (and DDP) the same global batch gives the single-process loss at every step,
with a rank whose micro-batch has no image at every step; LoRA with a fully trained merger under ZeRO-3 is refused
without --precompute_ref_log_probs, and with it gives the single-process losses and reference log-probs.

Plain SGD, as in test_distributed.py: a weight then differs from the single-process one by lr x its gradient's
rounding difference, so 1e-5 on losses and weights means something."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from launcher import launch
from safetensors.torch import load_file

from vlft.train.dpo.run import run

pytestmark = pytest.mark.distributed
TOL = 1e-5


def history(out) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """4 pairs: one with two images (and a system turn) first, then 3 text-only ones.

    Why 3 of 4 text-only: each step's global batch is 4 = the whole set (1 process x 4, or 2 x 2), so every step
    sees every pair whatever order the sampler draws, and of the two ranks' 2-pair micro-batches, the one without
    the image pair is text-only at *every* step, whichever way it is split (2 image + 2 text pairs would leave that
    to the shuffle). The image pair at index 0: the reference pass of --precompute_ref_log_probs gives rank r the
    pairs r, r + 2, so rank 1 (pairs 1 and 3) is text-only there too."""
    demo = {r["id"]: r for r in json.loads((REPO / "data_examples" / "dpo_demo.json").read_text())}
    records = [
        demo["multi_image"],
        {"id": "text_flat", "prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five."},
        {"id": "text_llava", "conversations": [{"from": "human", "value": "Name a primary colour."}],
         "chosen": "Red.", "rejected": "Purple, a mix of red and blue."},
        {"id": "text_history", "conversations": [{"from": "system", "value": "Be brief."},
                                                 {"from": "human", "value": "What is the capital of France?"},
                                                 {"from": "gpt", "value": "Paris."},
                                                 {"from": "human", "value": "And of Italy?"}],
         "chosen": {"from": "gpt", "value": "Rome."}, "rejected": {"from": "gpt", "value": "Paris again."}},
    ]
    assert [("image" in r) for r in records] == [True, False, False, False]
    path = tmp_path_factory.mktemp("data") / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def common(model_dir, data, out, per_device: int) -> list[str]:
    return ["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(REPO / "data_examples"),
            "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", str(per_device),
            "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--logging_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0", "--weight_decay", "0.0",
            "--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0",
            "--freeze_vision_tower", "true", "--beta", "0.1"]


# frozen merger: the reference is the policy with its adapters off, computed alongside each step (also under ZeRO-3)
ADAPTERS_ONLY = ["--freeze_merger", "true"]
# trained merger: its starting values must stay the reference; under ZeRO-3 only through the precomputed cache
WITH_MERGER = ["--freeze_merger", "false", "--precompute_ref_log_probs", "true"]


@pytest.fixture(scope="module")
def single(tiny_model_dir, pairs, tmp_path_factory):
    """One process, 4 pairs per step: the reference runs."""
    out = {}
    for name, flags in (("adapters_only", ADAPTERS_ONLY), ("with_merger", WITH_MERGER)):
        path = tmp_path_factory.mktemp(f"single-{name}") / "out"
        run(common(tiny_model_dir, pairs, path, 4) + flags)
        out[name] = path
    return out


def assert_same_run(reference_dir, out, files: list[str]) -> None:
    """The same loss (and policy / reference log-probs) at each of 3 steps, every step over all 4 pairs; the same
    saved weights, key by key."""
    ref, got = history(reference_dir), history(out)
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)]
    print(f"\n1 process {[h['loss'] for h in ref]}\n2 processes {[h['loss'] for h in got]}; max |diff| {max(diffs):.2e}")
    assert len(ref) == len(got) == 3
    assert max(diffs) < TOL, (ref, got)
    for a, b in zip(ref, got):
        for key in ("logps/chosen", "logps/rejected", "rewards/margins"):
            assert abs(a[key] - b[key]) < TOL * max(1.0, abs(a[key])), (key, a, b)
    assert got[-1]["epoch"] == 3.0  # one step = one epoch: each step saw all 4 pairs, so one rank had no image
    assert ref[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # step 1: policy = reference, loss = ln 2
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.01  # the curve moves, so equal curves mean something
    for name in files:
        a, b = load_file(str(reference_dir / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and a, name
        for key in a:
            assert a[key].shape == b[key].shape and a[key].numel() > 0, key
            assert torch.allclose(a[key], b[key], atol=TOL, rtol=1e-4), (name, key, (a[key] - b[key]).abs().max())


@pytest.mark.parametrize("backend", ["zero3", "ddp"])
def test_adapters_off_reference_same_losses_as_one_process(backend, single, tiny_model_dir, pairs, tmp_path):
    """LoRA, merger frozen: each step's reference is a second forward with the adapters off; under ZeRO-3 the
    text-only rank runs the vision tower on a masked dummy image in both forwards (no hang, no change)."""
    out = tmp_path / "out"
    launch("dpo", common(tiny_model_dir, pairs, out, 2) + ADAPTERS_ONLY, zero=None if backend == "ddp" else backend)
    assert_same_run(single["adapters_only"], out, ["adapter_model.safetensors"])


def test_zero3_refuses_lora_with_trained_merger_without_precompute(tiny_model_dir, pairs, tmp_path):
    """Refused at start-up, naming the way out, and the launch ends (no rank left waiting for the other)."""
    out = tmp_path / "out"
    proc = launch("dpo", common(tiny_model_dir, pairs, out, 2) + ["--freeze_merger", "false"], zero="zero3",
                  expect_success=False)
    assert proc.returncode != 0
    assert "vlft dpo: error: under ZeRO-3, LoRA with fully trained parameters" in proc.stderr, proc.stderr[-4000:]
    assert "needs --precompute_ref_log_probs true" in proc.stderr and "merger" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()


def test_zero3_precomputed_reference_same_losses_as_one_process(single, tiny_model_dir, pairs, tmp_path):
    """LoRA with a trained merger under ZeRO-3 with --precompute_ref_log_probs: the reference pass (each rank a
    share, rank 1's share text-only, gathered) gives the single-process cache, and training the same losses."""
    out = tmp_path / "out"
    proc = launch("dpo", common(tiny_model_dir, pairs, out, 2) + WITH_MERGER, zero="zero3")
    assert "reference log-probs: computed for 4 pairs" in proc.stderr
    assert_same_run(single["with_merger"], out, ["adapter_model.safetensors", "non_lora_trainables.safetensors"])
    (ref_file,) = (single["with_merger"] / "ref_log_probs").glob("*.pt")
    got_file = out / "ref_log_probs" / ref_file.name  # the same key: same data, model and settings
    ref, got = (torch.load(p, weights_only=True)["values"] for p in (ref_file, got_file))
    assert ref.shape == got.shape == (4, 2) and torch.isfinite(got).all()
    assert torch.allclose(ref, got, atol=TOL, rtol=1e-6), (ref, got)
