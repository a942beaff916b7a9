"""Runs that survive (issue 14): a process killed with SIGKILL at a random step, or in the middle of writing a
checkpoint, resumes with `--resume_from_checkpoint latest` onto exactly the loss curve and the final weights of an
uninterrupted run; SIGTERM saves a checkpoint and exits 0; a non-finite loss stops the run naming the step and its
records with finite checkpoints left; a save that cannot be written leaves the previous checkpoint intact.

The interrupted runs are real `vlft sft` processes with the fault injected from outside vlft (tests/faults): SIGKILL
cannot be caught, so nothing in the run gets a chance to tidy up."""
from __future__ import annotations

import errno
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, REPO, assert_same_run, logged_losses
from safetensors.torch import load_file

from vlft.errors import VlftError
from vlft.train.core.checkpoints import STAGING_DIR, complete_checkpoints
from vlft.train.sft.run import run

STEPS, SAVE_EVERY = 6, 2

SETTINGS = {
    "full": [],
    "lora_merger": ["--lora_enable", "true", "--lora_rank", "4", "--lora_alpha", "8", "--freeze_merger", "false",
                    "--freeze_vision_tower", "true"],
    "packing": ["--packing", "true", "--max_seq_length", "512"],
    "group_by_length": ["--group_by_length", "true"],
    "grad_accum_2": ["--gradient_accumulation_steps", "2"],
}



def common_args(model_dir, data=DEMO_DATA) -> list[str]:
    return ["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(DEMO_IMAGES),
            "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
            "--seed", "0", "--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1",
            "--max_steps", str(STEPS)]


def run_with_fault(tmp_path: Path, fault: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`vlft sft argv` in its own process (and process group) with a fault injected (tests/faults)."""
    env = dict(os.environ, VLFT_TEST_FAULT=fault, VLFT_TEST_SINGLE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "faults"), str(REPO)]))
    return subprocess.run([sys.executable, "-m", "vlft.cli", "sft", *argv], env=env, capture_output=True, text=True,
                          timeout=600, start_new_session=True)


def resume_latest(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "vlft.cli", "sft", *argv, "--resume_from_checkpoint", "latest"],
                          env=env, capture_output=True, text=True, timeout=600)


SLOW = {"packing", "group_by_length", "grad_accum_2"}  # in `make test-distributed`; full and LoRA in `make test`


@pytest.mark.parametrize("setting", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in sorted(SETTINGS)])
def test_kill_at_a_random_step_then_resume_latest_matches_the_straight_run(setting, tiny_model_dir, tmp_path):
    argv = common_args(tiny_model_dir) + SETTINGS[setting]
    straight = tmp_path / "straight"
    run(argv + ["--output_dir", str(straight), "--save_strategy", "no"])

    out = tmp_path / "killed"
    at = random.Random(setting).randint(SAVE_EVERY + 1, STEPS - 1)  # a checkpoint exists before the kill
    killed = run_with_fault(tmp_path, f"kill_step@{at}", argv + ["--output_dir", str(out), "--save_strategy", "steps",
                                                                 "--save_steps", str(SAVE_EVERY)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "trainer_state.json").exists()  # it died before the end
    newest = complete_checkpoints(out)[-1]
    assert newest.name == f"checkpoint-{at // SAVE_EVERY * SAVE_EVERY}"

    resumed = resume_latest(argv + ["--output_dir", str(out), "--save_strategy", "steps", "--save_steps",
                                    str(SAVE_EVERY)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {newest}" in resumed.stderr + resumed.stdout
    assert len(logged_losses(out)) == STEPS
    assert_same_run(straight, out, f"{setting} | killed at step {at + 1}")


def test_kill_inside_a_checkpoint_save_leaves_the_previous_one_to_resume(tiny_model_dir, tmp_path):
    argv = common_args(tiny_model_dir) + SETTINGS["lora_merger"] + ["--save_strategy", "steps", "--save_steps", "2",
                                                                    "--save_total_limit", "1"]
    straight = tmp_path / "straight"
    run(argv + ["--output_dir", str(straight)])
    out = tmp_path / "killed"
    killed = run_with_fault(tmp_path, "kill_save@4", argv + ["--output_dir", str(out)])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / STAGING_DIR / "checkpoint-4").is_dir()  # the half-written one, never renamed into place
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]  # the limit of 1 kept the complete one

    resumed = resume_latest(argv + ["--output_dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / STAGING_DIR).exists()  # the leftover was removed, the final save's staging too
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-6"]
    assert_same_run(straight, out, "LoRA + merger | killed inside the save of checkpoint-4")


@pytest.mark.parametrize("fault, name", [("term_step", "SIGTERM"), ("int_step", "SIGINT")])
def test_a_stop_signal_saves_a_checkpoint_exits_0_and_resumes_onto_the_same_curve(tiny_model_dir, tmp_path, fault,
                                                                                    name):
    """A scheduler's SIGTERM, or Ctrl-C (SIGINT), during step 4: that step finishes, checkpoint-4 is saved, exit 0."""
    argv = common_args(tiny_model_dir) + SETTINGS["lora_merger"] + ["--save_strategy", "no"]
    straight = tmp_path / "straight"
    run(argv + ["--output_dir", str(straight)])
    out = tmp_path / "preempted"
    term = run_with_fault(tmp_path, f"{fault}@3", argv + ["--output_dir", str(out)])
    assert term.returncode == 0, term.stderr[-3000:]
    log = term.stderr + term.stdout
    assert f"{name} received" in log and "--resume_from_checkpoint latest" in log
    assert ("Ctrl-C again" in log) == (name == "SIGINT")
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-4"]  # the step in progress finished
    assert not (out / "adapter_model.safetensors").exists()  # no final save: the run is not finished

    resumed = resume_latest(argv + ["--output_dir", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(straight, out, f"LoRA + merger | {name} during step 4")


def nan_loss_at(monkeypatch, step: int, seen: dict | None = None):
    """Make the loss of training step `step` (1-based, as logged) NaN; record a trainable weight per step."""
    from vlft.train.core.trainer import SFTTrainer

    compute = SFTTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = compute(self, model, inputs, *args, **kwargs)
        if seen is not None:
            param = next(p for p in model.parameters() if p.requires_grad)
            seen[self.state.global_step] = param.detach().clone()
        return loss * float("nan") if self.state.global_step == step - 1 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", compute_loss)


def test_nan_loss_stops_naming_the_step_and_its_records(tiny_model_dir, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, 3)
    out = tmp_path / "run"
    with pytest.raises(VlftError) as err:
        run(common_args(tiny_model_dir) + ["--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2"])
    message = str(err.value)
    assert message.startswith("step 3: the loss is not finite")
    records = json.loads(DEMO_DATA.read_text())
    named = [int(x) for x in __import__("re").findall(r"record (\d+)", message)]
    assert len(named) == 2 and all(0 <= i < len(records) for i in named)  # the two records of the batch
    assert "checkpoint-2" in message and "holds finite weights" in message
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    weights = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "model.safetensors").exists()


def test_skip_nonfinite_steps_leaves_the_weights_of_a_skipped_step_untouched(tiny_model_dir, tmp_path, monkeypatch):
    seen: dict = {}
    nan_loss_at(monkeypatch, 3, seen)
    out = tmp_path / "run"
    summary, trainer = run(common_args(tiny_model_dir) + ["--output_dir", str(out), "--save_strategy", "no",
                                                          "--skip_nonfinite_steps", "1"])
    assert trainer.nonfinite_skipped == 1 and summary["steps"] == STEPS
    assert torch.equal(seen[2], seen[3])  # step 3 was skipped: the weights after it are those before it
    assert not torch.equal(seen[3], seen[4])  # step 4 trained again
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())
    history = trainer.state.log_history
    assert math.isnan(next(h["grad_norm"] for h in history if h.get("step") == 3))


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import Trainer

    save = Trainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "optimizer.pt"))
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_disk)
    out = tmp_path / "run"
    argv = common_args(tiny_model_dir) + ["--save_strategy", "steps", "--save_steps", "2"]
    with pytest.raises(VlftError) as err:
        run(argv + ["--output_dir", str(out)])
    message = str(err.value)
    assert "could not write checkpoint-4: No space left on device" in message
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact" in message
    assert "--resume_from_checkpoint latest" in message
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / STAGING_DIR).exists()  # the partial checkpoint-4 was removed

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)  # space freed: the run goes on
    summary, _ = run(argv + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert summary["steps"] == STEPS


def test_unwritable_output_dir_fails_before_anything_loads(tiny_model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(VlftError, match="--output_dir .* is not writable"):
        run(common_args(tiny_model_dir) + ["--output_dir", str(blocker / "run")])


def test_latest_on_a_new_output_dir_starts_from_step_0(tiny_model_dir, tmp_path):
    summary, _ = run(common_args(tiny_model_dir) + ["--output_dir", str(tmp_path / "new"), "--max_steps", "1",
                                                    "--resume_from_checkpoint", "latest"])
    assert summary["steps"] == 1


def test_a_resume_that_is_not_the_same_run_says_what_differs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = common_args(tiny_model_dir) + SETTINGS["lora_merger"] + ["--save_strategy", "steps", "--save_steps", "2"]
    run(argv + ["--output_dir", str(out), "--max_steps", "2"])
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(json.loads(DEMO_DATA.read_text())[:-1]))
    with pytest.raises(VlftError) as err:
        run(common_args(tiny_model_dir, fewer) + SETTINGS["lora_merger"]
            + ["--output_dir", str(out), "--resume_from_checkpoint", "latest", "--freeze_merger", "true",
               "--learning_rate", "1e-3"])
    message = str(err.value)
    assert "is not the run that wrote it" in message
    assert "data file contents differ" in message and "training items: 10" in message
    assert "the model differs" not in message  # the same model, even under another path
    assert "fully trained weights" in message  # the merger trained then and is frozen now
    # the scheduler and optimizer states would restore the old rate while the start-up table shows the new one
    assert "--learning_rate: 0.005 in the checkpoint, 0.001 now" in message


def test_nan_gradient_with_a_finite_loss_is_caught_before_the_optimizer_step(tiny_model_dir, tmp_path, monkeypatch):
    from vlft.train.core.trainer import SFTTrainer

    step_fn = SFTTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        loss = step_fn(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 1:  # step 2: a finite loss, one poisoned gradient
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(SFTTrainer, "training_step", training_step)
    out = tmp_path / "run"
    with pytest.raises(VlftError, match=r"^step 2: the gradient norm \((inf|nan)\) is not finite") as err:
        run(common_args(tiny_model_dir) + ["--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "1"])
    assert "no checkpoint had been written" not in str(err.value)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-1" / "model.safetensors")).values())


def test_sigusr1_sigterm_and_ctrl_c_request_a_save_and_a_stop_at_the_step_end():
    import signal

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from vlft.train.core.checkpoints import PreemptionCallback

    for name in ("SIGUSR1", "SIGTERM", "SIGINT"):
        callback, control = PreemptionCallback(), TrainerControl()
        callback.install()
        try:
            os.kill(os.getpid(), getattr(signal, name))
        finally:
            callback.uninstall()
        assert signal.getsignal(getattr(signal, name)) is not callback._handle  # the previous handler is back
        state = TrainerState()
        state.global_step = 7
        callback.on_step_end(TrainingArguments(output_dir="unused", use_cpu=True), state, control)
        assert (control.should_save, control.should_training_stop) == (True, True)
        assert (callback.stopped_by, callback.stopped_at) == (name, 7)

    # Ctrl-C twice: the second one stops at once, as Python's own handler would, and the handlers are restored
    callback = PreemptionCallback()
    callback.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert callback.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is not callback._handle
    finally:
        callback.uninstall()



def test_a_final_save_that_cannot_be_written_keeps_the_checkpoints(tiny_model_dir, tmp_path, monkeypatch):
    from vlft.train.core.trainer import SFTTrainer

    save_model = SFTTrainer.save_model

    def no_room_for_the_final_save(self, output_dir=None, _internal_call=False):
        if output_dir and Path(output_dir).name == "final":
            raise OSError(errno.EDQUOT, "Disk quota exceeded", output_dir)
        return save_model(self, output_dir, _internal_call)

    monkeypatch.setattr(SFTTrainer, "save_model", no_room_for_the_final_save)
    out = tmp_path / "run"
    with pytest.raises(VlftError, match="could not write the final model: Disk quota exceeded"):
        run(common_args(tiny_model_dir) + ["--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps",
                                           "--save_steps", "2"])
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / STAGING_DIR).exists() and not (out / "model.safetensors").exists()


def test_the_same_model_under_another_path_resumes_and_another_model_does_not(tiny_model_dir, tiny_model_factory,
                                                                                 tmp_path):
    import shutil

    out = tmp_path / "run"
    argv = ["--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out)]
    run(common_args(tiny_model_dir) + argv + ["--max_steps", "1"])
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved-model")
    summary, _ = run(common_args(moved) + argv + ["--max_steps", "2", "--resume_from_checkpoint", "latest"])
    assert summary["steps"] == 2
    with pytest.raises(VlftError, match="the model differs"):
        run(common_args(tiny_model_factory("qwen3_vl")) + argv + ["--max_steps", "3", "--resume_from_checkpoint",
                                                                  "latest"])


def test_latest_restarts_a_run_killed_before_its_first_checkpoint_and_refuses_foreign_files(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    (out / "ref_log_probs").mkdir(parents=True)  # what a DPO run writes before its first checkpoint
    (out / "completions.jsonl").write_text("{}\n")  # and a GRPO run
    summary, _ = run(common_args(tiny_model_dir) + ["--output_dir", str(out), "--max_steps", "1",
                                                    "--resume_from_checkpoint", "latest"])
    assert summary["steps"] == 1
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("the user's")
    with pytest.raises(VlftError, match=r"holds no complete checkpoint-N folder \(it holds todo.txt\)"):
        run(common_args(tiny_model_dir) + ["--output_dir", str(mine), "--resume_from_checkpoint", "latest"])
    assert (mine / "todo.txt").read_text() == "the user's"


@pytest.mark.parametrize("fp16, loss, norm, stops", [
    (True, 1.0, float("inf"), False),  # an fp16 overflow: the loss scaler skips the step and lowers its scale
    (False, 1.0, float("inf"), True),  # fp32 / bf16: a non-finite gradient norm stops the run
    (True, float("nan"), 1.0, True),  # a non-finite loss stops it under any precision
    (False, 1.0, 2.5, False),
])
def test_which_nonfinite_steps_stop_the_run(fp16, loss, norm, stops):
    """The rule of VlftTrainerMixin._get_grad_norm on its own (fp16 needs a GPU, so no run here exercises it)."""
    from types import SimpleNamespace

    from vlft.train.core.trainer import NonFiniteError, VlftTrainerMixin

    class Base:
        def _get_grad_norm(self, model, grad_norm=None):
            return grad_norm

    class Probe(VlftTrainerMixin, Base):
        pass

    trainer = object.__new__(Probe)
    trainer.args = SimpleNamespace(fp16=fp16, device="cpu", skip_nonfinite_steps=0, output_dir="/nonexistent")
    trainer.callback_handler = SimpleNamespace(callbacks=[])
    trainer.state = SimpleNamespace(global_step=6)
    trainer.train_dataset, trainer.nonfinite_skipped, trainer.is_deepspeed_enabled = [], 0, False
    trainer._step_finite, trainer._step_records = torch.isfinite(torch.tensor(loss)), []
    if stops:
        with pytest.raises(NonFiniteError, match="step 7: the (loss|gradient norm)"):
            trainer._get_grad_norm(None, torch.tensor(norm))
    else:
        assert trainer._get_grad_norm(None, torch.tensor(norm)).item() == norm
