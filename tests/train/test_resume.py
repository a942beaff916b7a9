"""Resuming a LoRA run continues it exactly: the adapter, the weights trained fully next to it (the merger) and the
optimizer come back, so steps after the resume give the losses of the uninterrupted run."""
from __future__ import annotations

import json

from conftest import DEMO_IMAGES

from vlft.train.sft import run


def losses(out) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_lora_with_trained_merger_resumes_exactly(tiny_model_dir, image_only_data, tmp_path):
    common = ["--model_id", str(tiny_model_dir), "--data_path", str(image_only_data), "--image_folder",
              str(DEMO_IMAGES), "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
              "--lr_scheduler_type", "constant", "--lora_enable", "true", "--lora_rank", "4", "--lora_alpha", "8",
              "--freeze_merger", "false", "--freeze_vision_tower", "true", "--seed", "0", "--disable_tqdm", "true",
              "--report_to", "none", "--logging_steps", "1"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(common + ["--output_dir", str(whole), "--max_steps", "4", "--save_strategy", "no"])
    run(common + ["--output_dir", str(parts), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"])
    _, trainer = run(common + ["--output_dir", str(parts), "--max_steps", "4", "--save_strategy", "no",
                               "--resume_from_checkpoint", str(parts / "checkpoint-2")])
    want, got = losses(whole), [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(want) == 4 and len(got) == 4
    assert abs(want[3] - want[1]) > 1e-3  # the run moves: equal losses below mean something
    for step in (2, 3):  # steps 3 and 4 run after the resume
        assert abs(got[step] - want[step]) < 1e-5, (step, got, want)


def test_full_finetuning_resumes_exactly(tiny_model_dir, image_only_data, tmp_path):
    """transformers 5 saves Qwen-VL checkpoints in the hub layout and its own resume matched none of the language
    model's keys (the run silently went on from the base weights): the resumed steps must equal the straight run's."""
    common = ["--model_id", str(tiny_model_dir), "--data_path", str(image_only_data), "--image_folder",
              str(DEMO_IMAGES), "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
              "--lr_scheduler_type", "constant", "--seed", "0", "--disable_tqdm", "true", "--report_to", "none",
              "--logging_steps", "1"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(common + ["--output_dir", str(whole), "--max_steps", "4", "--save_strategy", "no"])
    run(common + ["--output_dir", str(parts), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"])
    _, trainer = run(common + ["--output_dir", str(parts), "--max_steps", "4", "--save_strategy", "no",
                               "--resume_from_checkpoint", str(parts / "checkpoint-2")])
    want, got = losses(whole), [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert abs(want[3] - want[1]) > 1e-3
    for step in (2, 3):
        assert abs(got[step] - want[step]) < 1e-6, (step, got, want)
