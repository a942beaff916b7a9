"""What the README's "Thinking models" section ships: data_examples/thinking_demo.json trains a tiny Qwen3.5 (its
thinking chat template) through scripts/finetune_lora.sh exactly as the README's command runs it, and
`vlft check-data` reports the example's mix of records with and without reasoning as the README quotes it."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_scripts import DONE, SCRIPTS, script_env

from vlft.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "data_examples/thinking_demo.json"
STEPS = 5
MIX_LINE = "6 of 8 records train on reasoning in their answers, 2 on answers without reasoning"


def has_reasoning(turn: dict) -> bool:
    return "</think>" in turn["value"] or bool(turn.get("reasoning_content") or turn.get("reasoning"))


def expected_mix(records: list[dict]) -> tuple[int, int, int]:
    """(records with trained reasoning, records without, history turns whose reasoning is dropped) under Qwen3.5's
    template, read off the file: it renders the reasoning of the answers after the last human turn only."""
    with_reasoning = dropped = 0
    for record in records:
        turns = record["conversations"]
        last_human = max(i for i, t in enumerate(turns) if t["from"] == "human")
        answers = [(i, t) for i, t in enumerate(turns) if t["from"] == "gpt"]
        with_reasoning += any(has_reasoning(t) for i, t in answers if i > last_human)
        dropped += sum(has_reasoning(t) for i, t in answers if i < last_human)
    return with_reasoning, len(records) - with_reasoning, dropped


def test_the_example_holds_what_the_readme_says():
    """8 records, both layouts of reasoning, at least 2 plain answers, one multi-turn record whose earlier answer
    reasons, and images that exist (paths relative to the data file, so no IMAGE_FOLDER is needed)."""
    records = json.loads((REPO / EXAMPLE).read_text())
    gpt = [t for r in records for t in r["conversations"] if t["from"] == "gpt"]
    assert len(records) == 8
    assert any("<think>" in t["value"] for t in gpt) and any("reasoning_content" in t for t in gpt)
    assert expected_mix(records) == (6, 2, 1)  # 75% reasoning, Unsloth's advice; one history turn's reasoning
    images = [p for r in records for p in ([r["image"]] if isinstance(r.get("image"), str) else r.get("image", []))]
    assert len(images) >= 5 and all((REPO / "data_examples" / p).is_file() for p in images)
    assert MIX_LINE in (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def qwen3_5(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3_5")


def test_check_data_counts_the_reasoning_mix(qwen3_5, capsys):
    records = json.loads((REPO / EXAMPLE).read_text())
    with_reasoning, without, dropped = expected_mix(records)
    capsys.readouterr()
    assert main(["check-data", "--model_id", str(qwen3_5), "--data_path", str(REPO / EXAMPLE)]) == 0
    err = capsys.readouterr().err
    assert "8 of 8 records usable" in err
    counts = re.search(r"(\d+) of (\d+) records train on reasoning in their answers, (\d+) on answers without", err)
    assert counts, err
    assert tuple(map(int, counts.groups())) == (with_reasoning, len(records), without)
    assert MIX_LINE in err  # the line the README quotes
    assert f"reasoning of {dropped} turn(s) in 1 record" in err and "--preserve_thinking true" in err
    assert "warning:" not in err  # 75% reasoning: no warning about a mix that teaches skipping the think block


def test_finetune_lora_script_trains_on_the_thinking_example(qwen3_5, tmp_path):
    """The README's SFT command (its demo-sized settings, fewer steps): the run reports the reasoning mix, finishes,
    the loss it logs is finite and falls, and the run directory holds the adapter, the trained merger, the processor
    and the arguments."""
    out = tmp_path / "out"
    env = script_env(tmp_path, PYTHON=sys.executable, MODEL=str(qwen3_5), DATA=EXAMPLE, GLOBAL_BATCH_SIZE="8",
                     NUM_WORKERS="0", LR="5e-3", OUTPUT_DIR=str(out))
    proc = subprocess.run(["bash", str(SCRIPTS / "finetune_lora.sh"), "--max_steps", str(STEPS), "--disable_tqdm",
                           "true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 of 8 records usable" in proc.stderr and "Traceback" not in proc.stderr
    assert MIX_LINE in proc.stderr  # the start-up says the mix too
    done = DONE.search(proc.stderr)
    assert done, proc.stderr[-3000:]
    assert int(done.group(1)) == STEPS

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    # the first step runs at the warm-up's rate 0; then the rate is 5e-3
    assert losses[-1] < losses[0] - 1.0, losses
    assert float(done.group(2)) == pytest.approx(losses[0], abs=1e-4)

    for name in ["adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors",
                 "vlft_args.json", "vlft_trained.json", "tokenizer.json", "chat_template.jinja"]:
        assert (out / name).is_file(), name
    args = json.loads((out / "vlft_args.json").read_text())
    assert args["data_path"] == [EXAMPLE] and args["model_id"] == str(qwen3_5)
    assert (args["enable_thinking"], args["train_empty_think"]) == (None, False)  # the template's own mode
    assert "reasoning_content" in (out / "chat_template.jinja").read_text()  # the thinking template travels with it
