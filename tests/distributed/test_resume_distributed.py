"""Exact resume under ZeRO-2 and ZeRO-3 on 2 CPU processes: the launcher and both ranks are killed with SIGKILL at a
step, and `--resume_from_checkpoint latest` continues onto the loss curve and the final weights of an uninterrupted
run on the same backend (DeepSpeed restores the partitioned weights, optimizer states and each rank's RNG)."""
from __future__ import annotations

import os

import launcher
import pytest
from conftest import DEMO_DATA, DEMO_IMAGES, REPO, assert_same_run, logged_losses

from vlft.train.core.checkpoints import STAGING_DIR, complete_checkpoints

pytestmark = pytest.mark.distributed


def argv_for(model_dir, out) -> list[str]:
    return ["--model_id", str(model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
            "--output_dir", str(out), "--max_steps", "5", "--per_device_train_batch_size", "1",
            "--learning_rate", "5e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--seed", "0",
            "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "true", "--report_to", "none",
            "--lora_enable", "true", "--lora_rank", "4", "--lora_alpha", "8", "--freeze_merger", "false",
            "--freeze_vision_tower", "true"]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_kill_both_ranks_then_resume_latest_matches_the_straight_run(zero, tiny_model_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    launcher.launch("sft", argv_for(tiny_model_dir, straight), zero=zero)

    out = tmp_path / "killed"
    monkeypatch.setenv("VLFT_TEST_FAULT", "kill_step@3")  # both ranks and the launcher die as step 4 begins
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests" / "faults"), str(REPO)]))
    killed = launcher.launch("sft", argv_for(tiny_model_dir, out), zero=zero, expect_success=False)
    assert killed.returncode != 0
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    monkeypatch.delenv("VLFT_TEST_FAULT")

    launcher.launch("sft", argv_for(tiny_model_dir, out) + ["--resume_from_checkpoint", "latest"], zero=zero)
    assert len(logged_losses(out)) == 5
    assert_same_run(straight, out, f"{zero}, 2 processes, LoRA + merger | killed at step 4")
    assert not (out / STAGING_DIR).exists()
