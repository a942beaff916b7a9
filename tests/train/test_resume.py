"""Resuming continues a run exactly: the adapter, the weights trained fully next to it (the merger), full
fine-tuning weights and the optimizer come back, so steps after the resume give the losses of the uninterrupted
run. (Killed runs, `latest`, preemption: tests/train/test_survival.py.)"""
from __future__ import annotations

import pytest
from conftest import DEMO_IMAGES, logged_losses

from vlft.train.sft.run import run

SETTINGS = {
    # the first finding: non_lora_trainables.safetensors was in the checkpoint but nothing loaded it
    "lora_with_trained_merger": ["--lora_enable", "true", "--lora_rank", "4", "--lora_alpha", "8", "--freeze_merger",
                                 "false", "--freeze_vision_tower", "true"],
    # transformers 5 saves Qwen-VL checkpoints in the hub layout and its own resume matched none of the language
    # model's keys: the run silently went on from the base weights
    "full_finetuning": [],
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_resumed_steps_equal_the_straight_run(setting, tiny_model_dir, image_only_data, tmp_path):
    common = ["--model_id", str(tiny_model_dir), "--data_path", str(image_only_data), "--image_folder",
              str(DEMO_IMAGES), "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
              "--lr_scheduler_type", "constant", "--seed", "0", "--disable_tqdm", "true", "--report_to", "none",
              "--logging_steps", "1"] + SETTINGS[setting]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(common + ["--output_dir", str(whole), "--max_steps", "4", "--save_strategy", "no"])
    run(common + ["--output_dir", str(parts), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"])
    _, trainer = run(common + ["--output_dir", str(parts), "--max_steps", "4", "--save_strategy", "no",
                               "--resume_from_checkpoint", str(parts / "checkpoint-2")])
    want, got = logged_losses(whole), [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(want) == 4 and len(got) == 4
    assert abs(want[3] - want[1]) > 1e-3  # the run moves: equal losses below mean something
    for step in (2, 3):  # steps 3 and 4 run after the resume
        assert abs(got[step] - want[step]) <= 1e-6, (step, got, want)
