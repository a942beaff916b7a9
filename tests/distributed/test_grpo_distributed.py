"""The GRPO stage on 2 CPU processes (gloo) under ZeRO-3, through the launcher the scripts use (scripts/_common.sh,
as in test_distributed.py), with mixed media: at every step one rank's prompt has an image and the other's is
text-only. Each rank generates from its own prompt with the ZeRO-3 weights gathered (no collective inside
`generate`), and the training forward gives the text-only rank a masked dummy image, so both ranks run the vision
tower: the run must finish (a hang fails after launcher.TIMEOUT), with every step's completions of both prompts logged."""
from __future__ import annotations

import json

import pytest
from conftest import REPO
from launcher import launch

pytestmark = pytest.mark.distributed
G = 2


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    """One prompt with an image, one text-only: with one prompt per rank, every step splits them over the ranks."""
    demo = {r["id"]: r for r in json.loads((REPO / "data_examples" / "grpo_demo.json").read_text())}
    records = [demo["count_1"], demo["text_only"]]
    path = tmp_path_factory.mktemp("data") / "prompts.json"
    path.write_text(json.dumps(records))
    return path


def test_zero3_mixed_media_ranks_finish(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "out"
    argv = ["--model_id", str(tiny_model_dir), "--data_path", str(prompts),
            "--image_folder", str(REPO / "data_examples"), "--output_dir", str(out), "--max_steps", "3",
            "--per_device_train_batch_size", str(G), "--num_generations", str(G), "--max_completion_length", "4",
            "--reward_funcs", "count", "format", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0",
            "--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0",
            "--freeze_vision_tower", "true"]
    proc = launch("grpo", argv, zero="zero3")
    assert "Traceback" not in proc.stderr
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    assert all(h["completions/mean_length"] > 0 for h in logs)
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for step in (1, 2, 3):  # both prompts at every step, G completions each: one rank with the image, one without
        step_rows = [r for r in rows if r["step"] == step]
        assert sorted(r["id"] for r in step_rows) == ["count_1"] * G + ["text_only"] * G, step_rows
        assert all(bool(r["images"]) == (r["id"] == "count_1") for r in step_rows)
    assert (out / "adapter_model.safetensors").is_file() and (out / "non_lora_trainables.safetensors").is_file()
