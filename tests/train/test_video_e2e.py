"""Video SFT end to end on every tiny family (Qwen3.5, Qwen3.5-MoE and Qwen3-VL-MoE too): batches mixing video,
image and text-only records train, with LoRA on the language model and the vision tower."""
from __future__ import annotations

import math

import pytest
from conftest import FAMILIES, REPO

from vlft.train.sft.run import run

VIDEO_DATA = REPO / "data_examples" / "llava_video_demo.json"


@pytest.mark.parametrize("family", FAMILIES)
def test_video_lora_llm_and_vision(family, tiny_model_factory, tmp_path):
    out = tmp_path / "out"
    summary, trainer = run([
        "--model_id", str(tiny_model_factory(family)), "--data_path", str(VIDEO_DATA),
        "--image_folder", str(REPO / "data_examples"), "--output_dir", str(out),
        "--video_min_pixels", "1024", "--video_max_pixels", "4096", "--video_max_total_pixels", "65536",
        "--fps", "2", "--lora_enable", "true", "--vision_lora", "true", "--lora_rank", "8", "--lora_alpha", "16",
        "--num_train_epochs", "3", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
        "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0",
    ])
    assert summary["steps"] == 6  # 8 records (video, frames, image+video, image, text) in batches of 4, 3 epochs
    assert math.isfinite(summary["first_loss"]) and summary["last_loss"] < summary["first_loss"]
    vision_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n and ".visual.blocks." in n]
    assert vision_b and all(p.abs().sum() > 0 for p in vision_b)  # videos and images reached the tower's LoRA
    assert (out / "adapter_model.safetensors").is_file()
