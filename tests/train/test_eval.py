"""Evaluation during SFT: --eval_data_path is checked at start-up like the training data, eval_loss is logged every
--eval_steps, and --load_best_model_at_end restores the best checkpoint's adapter AND its fully trained weights
(non_lora_trainables.safetensors), so the final save is the best step's, not the last one's. The flags that
cannot work are refused before the model loads."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, final_weights, plotting

from vlft.config import parse_args
from vlft.errors import DataError, VlftError
from vlft.plot import PLOT_FILE, read_series
from vlft.train.core.launch import check_training_flags
from vlft.train.sft.config import GROUPS as SFT_GROUPS
from vlft.train.sft.run import run

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """Three demo records (an image, two images, text only) as the held-out file; media under --image_folder."""
    records = json.loads(DEMO_DATA.read_text())
    path = tmp_path_factory.mktemp("data") / "eval.json"
    path.write_text(json.dumps([records[i] for i in (0, 2, 8)]))
    return path


@pytest.fixture(scope="module")
def best_run(tiny_model_dir, eval_file, tmp_path_factory):
    """LoRA next to a fully trained merger, 3 steps, evaluated and saved every step, best checkpoint loaded at the
    end. --greater_is_better true makes the *highest* eval loss the best: training on the records it evaluates
    lowers the eval loss step by step, so the best checkpoint is an early one, never the last, whatever the exact
    curve (the test checks that premise); the loading path under test is the same for either direction."""
    out = tmp_path_factory.mktemp("runs") / "best"
    with plotting():
        _, trainer = run([
            "--model_id", str(tiny_model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
            "--eval_data_path", str(eval_file), "--output_dir", str(out), "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
            "--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--freeze_merger", "false",
            "--freeze_vision_tower", "true", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
            "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss", "--greater_is_better", "true",
            *QUIET])
    return out, trainer


def eval_losses(out) -> list[tuple[int, float]]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]


def test_eval_loss_is_logged_every_step(best_run):
    out, _ = best_run
    evals = eval_losses(out)
    assert [step for step, _ in evals] == [1, 2, 3]
    assert all(math.isfinite(loss) and loss > 0 for _, loss in evals)
    assert len({loss for _, loss in evals}) == 3  # the weights moved between evaluations
    steps, values = read_series(out / PLOT_FILE)["eval_loss"]  # and the curves show it
    assert list(zip(steps, values)) == evals


def test_the_final_weights_are_the_best_checkpoints(best_run):
    out, trainer = best_run
    evals = eval_losses(out)
    best_step = max(evals, key=lambda e: e[1])[0]
    best = out / f"checkpoint-{best_step}"
    assert trainer.state.best_model_checkpoint == str(best)
    # and so says the state file a resume reads, in the best checkpoint itself and in every later one
    for step in range(best_step, 4):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] == str(best), step
    assert best_step != 3, evals  # the premise: the best step is not the last one

    final, at_best, at_last = final_weights(out), final_weights(best), final_weights(out / "checkpoint-3")
    files = {k.split(":")[0] for k in final}
    assert files == {"adapter_model.safetensors", "non_lora_trainables.safetensors"}
    assert final.keys() == at_best.keys() == at_last.keys()
    assert any("merger" in k for k in final if k.startswith("non_lora_trainables"))
    for key, value in final.items():
        assert torch.equal(value, at_best[key]), key
    for name in files:  # both files changed after the best step: the final save is not the last step's
        assert any(not torch.equal(final[k], at_last[k]) for k in final if k.startswith(name)), name


@pytest.mark.parametrize("flags, expected", [
    (["--eval_strategy", "steps", "--eval_steps", "1"], "--eval_strategy steps needs held-out records"),
    (["--eval_strategy", "steps", "--save_strategy", "steps", "--load_best_model_at_end", "true"],
     "--eval_strategy steps, --load_best_model_at_end needs held-out records to evaluate on: add --eval_data_path"),
])
def test_evaluation_without_eval_data_is_refused_before_loading(flags, expected, tiny_model_dir, tmp_path):
    with pytest.raises(VlftError, match=expected.replace(".", r"\.")):
        run(["--model_id", str(tiny_model_dir), "--data_path", str(DEMO_DATA), "--output_dir", str(tmp_path / "o"),
             *flags, *QUIET])
    assert not (tmp_path / "o").exists()


def test_dpo_refuses_eval_data(tiny_model_dir, eval_file, tmp_path):
    from vlft.train.dpo.run import run as dpo

    with pytest.raises(VlftError, match="--eval_data_path: vlft dpo does not evaluate during training yet"):
        dpo(["--model_id", str(tiny_model_dir), "--data_path", str(DEMO_DATA), "--eval_data_path", str(eval_file),
             "--output_dir", str(tmp_path / "o"), *QUIET])


def test_eval_data_is_checked_at_start_up(tiny_model_dir, tmp_path):
    bad = tmp_path / "eval_bad.json"
    bad.write_text(json.dumps([{"id": "gone", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Nothing."}]}]))
    with pytest.raises(DataError) as info:
        run(["--model_id", str(tiny_model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
             "--eval_data_path", str(bad), "--output_dir", str(tmp_path / "o"), *QUIET])
    assert "eval_bad.json" in str(info.value) and "missing.png" in str(info.value)


def test_eval_data_alone_turns_on_step_evaluation(tmp_path):
    _, data_args, _, train_args = parse_args(SFT_GROUPS, ["--output_dir", str(tmp_path), "--data_path", "d.json",
                                                          "--eval_data_path", "e.json", "--logging_steps", "5"])
    check_training_flags(data_args, train_args, stage="sft")
    assert (train_args.eval_strategy.value, train_args.eval_steps, train_args.do_eval) == ("steps", 5, True)
    assert train_args.prediction_loss_only  # no logits kept: vlft computes no metric from them


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_reporter_that_is_not_installed_is_named(tmp_path):
    _, data_args, _, train_args = parse_args(SFT_GROUPS, ["--output_dir", str(tmp_path), "--report_to", "wandb"])
    with pytest.raises(VlftError, match="--report_to wandb needs the wandb package.*pip install wandb"):
        check_training_flags(data_args, train_args, stage="sft")
