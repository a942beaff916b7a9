"""`vlft grpo --num_iterations N` (TRL's mu) on the tiny model (CPU, fp32): each step's rollouts are trained on N
optimizer steps in a row. Generation happens on the first step of every cycle only (counted calls to `generate`),
the replayed steps train on the very same completion tokens, the first pass has ratio 1 exactly and the later
passes take it against the first pass's log-probs (which moved: the ratio leaves 1), the reward metrics and
completions.jsonl come once per rollout, an epoch uses every prompt N times; with gradient accumulation a cycle is
N x GA micro-batches; a run stopped inside a cycle resumes onto the straight run's losses and weights (the kept
rollouts travel in the checkpoint), and a resume without them, or with another --num_iterations, is refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_same_run, logged_losses

from vlft.errors import VlftError
from vlft.train.grpo import trainer as grpo_trainer
from vlft.train.grpo.run import run

QUESTIONS = ["What is two plus two?", "Name a primary colour.", "What is the capital of France?", "Tell me a fact.",
             "Which one is larger?", "Which way does it point?"]
G = 2
# rewards 0, 1 in every group of two: every advantage is +-1, so every step moves the policy
ALTERNATE = "def alternate(completions, **kwargs):\n    return [float(k % 2) for k in range(len(completions))]\n"
COMMON = ["--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0",
          "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--num_generations", str(G),
          "--max_completion_length", "6", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
          "--seed", "0"]


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    """(argv without --output_dir, ...) for 6 text prompts and the alternating reward."""
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps([{"id": f"t{i}", "prompt": q, "solution": "4"} for i, q in enumerate(QUESTIONS)]))
    (tmp_path / "alternate.py").write_text(ALTERNATE)
    return ["--model_id", str(tiny_model_dir), "--data_path", str(data), "--reward_funcs",
            f"{tmp_path / 'alternate.py'}:alternate", *COMMON]


@pytest.fixture
def spy(monkeypatch):
    """Records every `generate` call (the step it serves), every loss (step, micro-batch token ids, the
    old_per_token_logps passed to the loss (None: ratio 1) and the policy's per-token log-probs) and the keyword
    arguments the model's forward got."""
    from transformers import Qwen2VLForConditionalGeneration

    calls = {"generate": [], "loss": [], "forward_keys": set()}
    trainer_cls = grpo_trainer.GRPOTrainer
    forward = Qwen2VLForConditionalGeneration.forward

    def spy_forward(self, *args, **kwargs):
        calls["forward_keys"] |= set(kwargs)
        return forward(self, *args, **kwargs)

    generate, compute_loss, loss_fn = trainer_cls.generate, trainer_cls.compute_loss, grpo_trainer.grpo_loss

    def spy_generate(self, items):
        calls["generate"].append((self.state.global_step + 1, [int(it["record"]) for it in items]))
        return generate(self, items)

    def spy_compute_loss(self, model, inputs, *args, **kwargs):
        calls["loss"].append({"step": self.state.global_step + 1, "input_ids": inputs["input_ids"].clone()})
        return compute_loss(self, model, inputs, *args, **kwargs)

    def spy_loss(per_token, old, advantages, mask, **kwargs):
        call = calls["loss"][-1]
        call.update(per_token=per_token.detach().clone(), old=None if old is None else old.clone(), mask=mask.bool())
        return loss_fn(per_token, old, advantages, mask, **kwargs)

    monkeypatch.setattr(trainer_cls, "generate", spy_generate)
    monkeypatch.setattr(trainer_cls, "compute_loss", spy_compute_loss)
    monkeypatch.setattr(grpo_trainer, "grpo_loss", spy_loss)
    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "forward", spy_forward)
    return calls


def assert_replays(first: dict, again: dict) -> None:
    """`again` trained on `first`'s completions against `first`'s log-probs, and the policy had moved."""
    assert torch.equal(again["input_ids"], first["input_ids"])  # the same prompts and completion tokens
    assert first["old"] is None  # first pass: the loss took the current log-probs, detached (ratio 1 exactly)
    assert again["old"] is not None and torch.equal(again["old"], first["per_token"])
    mask = again["mask"]
    ratio = torch.exp(again["per_token"] - again["old"])[mask]
    assert (ratio - 1).abs().max() > 1e-4, ratio  # the optimizer step in between moved the policy


def test_rollouts_are_generated_once_per_cycle_and_replayed(setup, spy, tmp_path):
    out = tmp_path / "out"
    _, trainer = run([*setup, "--output_dir", str(out), "--num_train_epochs", "1", "--num_iterations", "2",
                      "--per_device_train_batch_size", str(2 * G), "--save_strategy", "no"])
    # 6 prompts, 2 a step, each used twice: 6 optimizer steps in one epoch, as in TRL
    assert trainer.state.max_steps == 6 and trainer.state.global_step == 6
    assert [step for step, _ in spy["generate"]] == [1, 3, 5]
    generated = [r for _, records in spy["generate"] for r in records]
    assert sorted(generated) == list(range(6))  # every prompt generated for once, trained on twice
    losses = spy["loss"]
    assert [c["step"] for c in losses] == [1, 2, 3, 4, 5, 6]
    for first, again in zip(losses[0::2], losses[1::2]):
        assert_replays(first, again)
    assert not torch.equal(losses[0]["input_ids"], losses[2]["input_ids"])  # step 3 is a new rollout
    # the kept batch's extra keys stay out of the model's forward (transformers would swallow them silently)
    assert "input_ids" in spy["forward_keys"]
    assert not spy["forward_keys"] & {"old_per_token_logps", "ref_per_token_logps", "advantages"}

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs if "reward" in h] == [1, 3, 5]  # once per rollout, not again on replays
    assert [h["step"] for h in logs if "completions/mean_length" in h] == [1, 3, 5]
    assert all("clip_ratio/region_mean" in h for h in logs)
    assert all(h["clip_ratio/region_mean"] == 0 for h in logs if h["step"] % 2)  # ratio 1 on first passes
    rows = [json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()]
    assert rows == [s for s in (1, 3, 5) for _ in range(2 * G)]


def test_with_accumulation_a_cycle_is_ga_times_n_micro_batches(setup, spy, tmp_path):
    _, trainer = run([*setup, "--output_dir", str(tmp_path / "out"), "--max_steps", "4", "--num_iterations", "2",
                      "--per_device_train_batch_size", str(G), "--gradient_accumulation_steps", "2",
                      "--save_strategy", "no"])
    assert trainer.state.global_step == 4
    # micro-batches 1-8: generation on 1, 2 (step 1) and 5, 6 (step 3) only
    assert [step for step, _ in spy["generate"]] == [1, 1, 3, 3]
    losses = spy["loss"]
    assert [c["step"] for c in losses] == [1, 1, 2, 2, 3, 3, 4, 4]
    for cycle in (0, 4):
        first, again = losses[cycle:cycle + 2], losses[cycle + 2:cycle + 4]
        assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])  # two different micro-batches
        for a, b in zip(first, again):  # replayed in the same order
            assert_replays(a, b)


def test_a_run_stopped_inside_a_cycle_resumes_onto_the_straight_run(setup, tmp_path, monkeypatch):
    flags = [*setup, "--num_iterations", "2", "--per_device_train_batch_size", str(2 * G)]
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    run([*flags, "--output_dir", str(straight), "--max_steps", "6", "--save_strategy", "no"])
    run([*flags, "--output_dir", str(parts), "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1"])
    kept = "vlft_rollouts_rank0.pt"
    # the rollouts are saved only where the next step replays them (steps 1 and 3; step 2 ends a cycle)
    assert [(parts / f"checkpoint-{s}" / kept).is_file() for s in (1, 2, 3)] == [True, False, True]

    # without the kept rollouts, step 4 cannot be the straight run's step 4: refused, naming the file
    bare = tmp_path / "bare"
    shutil.copytree(parts / "checkpoint-3", bare / "checkpoint-3")
    (bare / "checkpoint-3" / kept).unlink()
    with pytest.raises(VlftError, match=f"step 4 should train again on the rollouts of step 3.*holds no {kept}"):
        run([*flags, "--output_dir", str(bare), "--max_steps", "6", "--save_strategy", "no",
             "--resume_from_checkpoint", str(bare / "checkpoint-3")])
    # another --num_iterations is another run
    with pytest.raises(VlftError, match="--num_iterations: 2 in the checkpoint, 1 now"):
        run([*setup, "--num_iterations", "1", "--per_device_train_batch_size", str(2 * G), "--output_dir",
             str(parts), "--max_steps", "6", "--save_strategy", "no", "--resume_from_checkpoint",
             str(parts / "checkpoint-3")])

    # as if the first run had been killed after writing step 5's rows (past its last checkpoint), mid-line
    with (parts / "completions.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 5, "record": 0, "completion": "from the killed run"}) + "\n{\"step\": 5, \"rec")
    from transformers import trainer_utils

    warnings = []  # HF's resume comparison of the flags with the checkpoint's state (warning_once: recorded here)
    monkeypatch.setattr(trainer_utils.logger, "warning_once", warnings.append)
    run([*flags, "--output_dir", str(parts), "--max_steps", "6", "--save_strategy", "no",
         "--resume_from_checkpoint", str(parts / "checkpoint-3")])
    # the same batch size: not reported as changed (the state counts prompts, the flag completions); save_steps,
    # which this resume does change, is (so the comparison did run)
    assert any("save_steps" in w for w in warnings) and not any("per_device_train_batch_size" in w for w in warnings)
    assert len(logged_losses(parts)) == 6
    assert_same_run(straight, parts, "GRPO --num_iterations 2 | stopped after step 3 of 6")
    # completions.jsonl holds each generated step once, as the straight run's does (the killed run's rows dropped)
    rows = {name: [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
            for name, out in (("straight", straight), ("parts", parts))}
    assert [r["step"] for r in rows["straight"]] == [1] * 4 + [3] * 4 + [5] * 4
    assert rows["parts"] == rows["straight"]
