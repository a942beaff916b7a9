"""GRPO with a reward model (`--reward_funcs rm:<run>`) on 2 CPU processes under ZeRO-3, through the scripts' launcher
(tests/distributed/launcher.py), one rank's prompt with an image and the other's text-only at every step: the reward
model is a plain module on each rank (never partitioned or wrapped by DeepSpeed) that scores only its own rank's
completions, so nothing waits on a collective. The run must finish (a hang fails after launcher.TIMEOUT), and every
completion's logged rm reward is the reward model's own score of it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from launcher import launch  # noqa: E402

from vlft.data.grpo import parse_prompt_record  # noqa: E402
from vlft.data.rm import PromptMedia  # noqa: E402
from vlft.train.grpo.rewards import completion_message  # noqa: E402
from vlft.train.rm.model import load_reward_model  # noqa: E402
from vlft.train.rm.run import run as train_rm  # noqa: E402

pytestmark = pytest.mark.distributed
G = 2
IMAGES = REPO / "data_examples" / "images"


def test_zero3_grpo_with_a_reward_model_finishes_and_logs_its_scores(tiny_model_dir, tmp_path):
    pairs = [{"id": f"p{k}", "image": str(IMAGES / name), "conversations": [{"from": "human", "value": "<image>\nOk?"}],
              "chosen": "Yes.", "rejected": "No."} for k, name in enumerate(["red_square.png", "count_2.png"])]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    rm_dir = tmp_path / "rm"
    train_rm(["--model_id", str(tiny_model_dir), "--data_path", str(tmp_path / "pairs.json"), "--output_dir",
              str(rm_dir), "--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--max_steps", "1",
              "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "true"])
    demo = {r["id"]: r for r in json.loads((REPO / "data_examples" / "grpo_demo.json").read_text())}
    records = [demo["count_1"], demo["text_only"]]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(records))
    out = tmp_path / "out"
    argv = ["--model_id", str(tiny_model_dir), "--data_path", str(prompts),
            "--image_folder", str(REPO / "data_examples"), "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", str(G), "--num_generations", str(G), "--max_completion_length", "4",
            "--reward_funcs", f"rm:{rm_dir}", "format",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
            "--seed", "0", "--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16",
            "--freeze_vision_tower", "true"]
    proc = launch("grpo", argv, zero="zero3")
    assert "Traceback" not in proc.stderr
    assert "reward check on" in proc.stderr and "rm" in proc.stderr
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2] and all("rewards/rm/mean" in h for h in logs)
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for step in (1, 2):  # both prompts at every step: one rank with the image, one without
        assert sorted(r["id"] for r in rows if r["step"] == step) == ["count_1"] * G + ["text_only"] * G

    rm = load_reward_model(rm_dir)
    by_id = {r["id"]: r for r in records}

    def prompt_of(row):
        sample = parse_prompt_record(by_id[row["id"]], 0, str(prompts))[0]
        return PromptMedia(sample.messages, [str(REPO / "data_examples" / p) for p in row["images"]], [])

    scores = rm.score([prompt_of(r) for r in rows], [completion_message(r["completion"]) for r in rows])
    logged = torch.tensor([r["rewards"]["rm"] for r in rows])
    assert (logged - scores).abs().max().item() < 1e-4, (logged, scores)
