"""Issue 24, item 8: a global batch that takes the whole data (the scripts' GLOBAL_BATCH_SIZE=64 on a 10-record pilot)
makes one optimizer step per epoch; that is said at start-up, with the numbers, for SFT, DPO and GRPO."""
from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer, TrainingArguments

from vlft.cli import main
from vlft.train.core.launch import batch_warning
from vlft.train.grpo.trainer import prompts_per_step


def training_args(tmp_path, batch: int, accumulation: int, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, report_to=[], use_cpu=True, **kw)


def test_ten_records_and_a_global_batch_of_64(tmp_path, capsys):
    line = batch_warning(10, training_args(tmp_path, 4, 16, num_train_epochs=3))
    assert line == ("warning: 10 records and a global batch of 64 records (--per_device_train_batch_size 4 x "
                    "--gradient_accumulation_steps 16 x 1 process(es)): one optimizer step per epoch, on 10 records "
                    "instead of 64, 3 optimizer step(s) in all (--num_train_epochs 3) -> for more steps, make the global "
                    "batch smaller than the data: lower --gradient_accumulation_steps or --per_device_train_batch_size "
                    "(the scripts: GLOBAL_BATCH_SIZE), or give more data")
    assert capsys.readouterr().err == f"[vlft] {line}\n"
    line = batch_warning(10, training_args(tmp_path, 4, 16, max_steps=5))
    assert "5 optimizer step(s) in all (--max_steps 5)" in line


def test_no_warning_when_the_batch_fits(tmp_path, capsys):
    assert batch_warning(10, training_args(tmp_path, 2, 2)) is None  # 3 steps an epoch (4, 4, 2)
    assert batch_warning(1, training_args(tmp_path, 1, 1)) is None  # one record in a batch of one: a smoke test
    assert capsys.readouterr().err == ""


def test_one_item_under_a_big_batch_is_said_too(tmp_path):
    """One record, or ten packed into one row: no smaller batch helps, but the single step is said."""
    line = batch_warning(1, training_args(tmp_path, 4, 16), what="packed rows")
    assert line.startswith("warning: 1 packed row and a global batch of 64 packed rows")
    assert "on 1 packed row instead of 64" in line and line.endswith("-> for more steps, give more data")


def hf_steps(tmp_path, items: int, batch: int, accumulation: int, drop_last: bool) -> tuple[int, int]:
    """HF's Trainer's own (optimizer steps per epoch, steps in all) for `items` items, from its dataloader."""
    args = training_args(tmp_path, batch, 1, dataloader_drop_last=drop_last, num_train_epochs=2)
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=[{"x": [0.0]}] * items)
    loader = trainer.get_train_dataloader()
    args = copy.copy(args)
    args.gradient_accumulation_steps = accumulation
    _, per_epoch, *_, max_steps = trainer.set_initial_training_values(args, loader)
    return per_epoch, max_steps


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_the_steps_are_hf_trainers_own(tmp_path, batch, drop_last):
    """The oracle: HF's Trainer on a plain dataset. The warning appears exactly when it makes one step per epoch
    (unless that is one item in a batch of one), and states its step count."""
    for items in range(batch if drop_last else 1, 14):
        for accumulation in (1, 2, 3, 16):
            per_epoch, total = hf_steps(tmp_path, items, batch, accumulation, drop_last)
            args = training_args(tmp_path, batch, accumulation, dataloader_drop_last=drop_last, num_train_epochs=2)
            line = batch_warning(items, args)
            case = (items, batch, accumulation, drop_last, per_epoch)
            assert (line is not None) == (per_epoch == 1 and batch * accumulation > 1), case
            if line is not None:
                assert f", {total} optimizer step(s) in all" in line, case


def grpo_args(**kw):
    return SimpleNamespace(**{"per_device_train_batch_size": 8, "num_generations": 4, "gradient_accumulation_steps": 1,
                              "world_size": 1, "num_iterations": 1, "max_steps": -1, "num_train_epochs": 3,
                              "dataloader_drop_last": False, **kw})


def test_grpo_counts_prompts_per_step(capsys):
    args = grpo_args()
    assert prompts_per_step(args) == 2
    line = batch_warning(3, args, what="prompts", prompts_per_step=2)
    assert line.startswith("warning: 3 prompts and a global batch of 2 prompts (--per_device_train_batch_size 8 / "
                           "--num_generations 4 x --gradient_accumulation_steps 1 x 1 process(es)): one optimizer step "
                           "per epoch, 3 optimizer step(s) in all (--num_train_epochs 3)")
    assert "instead of" not in line  # a GRPO step never takes fewer prompts than configured (TRL drops the rest)
    line = batch_warning(3, grpo_args(num_iterations=2), what="prompts", prompts_per_step=2)
    assert "one batch of prompts per epoch, trained on in 2 steps (--num_iterations), 6 optimizer step(s)" in line
    assert batch_warning(4, args, what="prompts", prompts_per_step=2) is None  # two steps an epoch
    assert "warning" in capsys.readouterr().err


RECORD = {  # one record of each stage's format, text only
    "sft": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    "dpo": {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
    "grpo": {"prompt": "Hi", "solution": "Hello."},
}
# the scripts' GLOBAL_BATCH_SIZE=64 with 4 a device; GRPO: 64 completions of 4 per prompt = 16 prompts a step
BIG = {"sft": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "16"],
       "dpo": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "16"],
       "grpo": ["--per_device_train_batch_size", "8", "--num_generations", "4", "--gradient_accumulation_steps", "8"]}
FITS = {"sft": ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"],
        "dpo": ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"],
        "grpo": ["--per_device_train_batch_size", "8", "--num_generations", "4", "--gradient_accumulation_steps", "2"]}
EXPECTED = {
    "sft": "warning: 10 records and a global batch of 64 records (--per_device_train_batch_size 4 x "
           "--gradient_accumulation_steps 16 x 1 process(es)): one optimizer step per epoch, on 10 records instead of 64",
    "dpo": "warning: 10 pairs and a global batch of 64 pairs (--per_device_train_batch_size 4 x "
           "--gradient_accumulation_steps 16 x 1 process(es)): one optimizer step per epoch, on 10 pairs instead of 64",
    "grpo": "warning: 20 prompts and a global batch of 16 prompts (--per_device_train_batch_size 8 / --num_generations 4 "
            "x --gradient_accumulation_steps 8 x 1 process(es)): one optimizer step per epoch",
}


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_each_stage_warns_at_start_up(stage, tmp_path, tiny_model_dir, capsys, stop_after_data):
    """A 10-record pilot (GRPO: 20 prompts, as one step needs 16) with the scripts' global batch: the warning is in
    the start-up log, before the model loads; with a batch that fits, it is not."""
    path = tmp_path / "train.json"
    n = 20 if stage == "grpo" else 10
    path.write_text(json.dumps([{"id": str(i), **RECORD[stage]} for i in range(n)]))
    argv = [stage, "--model_id", str(tiny_model_dir), "--data_path", str(path), "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", "--num_train_epochs", "3"]
    capsys.readouterr()
    assert main([*argv, *BIG[stage]]) == 2
    err = capsys.readouterr().err
    assert "stopped by the test after the data check" in err
    (line,) = [x for x in err.splitlines() if "warning:" in x]
    assert line.startswith(f"[vlft] {EXPECTED[stage]}"), line
    assert re.search(r", 3 optimizer step\(s\) in all \(--num_train_epochs 3\)", line)

    assert main([*argv, *FITS[stage]]) == 2
    err = capsys.readouterr().err
    assert "stopped by the test after the data check" in err and "warning:" not in err
