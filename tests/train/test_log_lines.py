"""What a run prints and logs: one readable line every --log_line_steps steps (at the first and the last too), whose
figures are the means of the log entries since the previous line, in place of Hugging Face's dict of quoted strings
at every log (with the progress bar and with --disable_tqdm); every log entry in <output_dir>/log.jsonl, equal to
trainer_state.json's history; DPO's lines carry the reward margin and accuracy, GRPO's the mean reward and each
reward function's mean; a resumed run's log file loses the lines past its checkpoint."""
from __future__ import annotations

import contextlib
import io
import json
import re
from types import SimpleNamespace

import pytest
from conftest import DEMO_DATA, DEMO_IMAGES, REPO, demo_subset_file, logged_losses

from vlft.errors import VlftError
from vlft.train.core.callbacks import LOG_FILE, LogLineCallback, MetricsFileCallback, drop_lines_after_step

LINE = re.compile(r"^\[vlft\] step (\d+)/(\d+) \| (.*)$", re.M)
HF_DICT = re.compile(r"\{'(loss|train_runtime|eval_loss)': ")


def parse_lines(text: str) -> list[tuple[int, dict[str, str]]]:
    """(step, {label: value as written}) of every log line in `text`; "12.3 s/step" is {"s/step": "12.3"}
    (tqdm's carriage returns end lines too)."""
    out = []
    for step, _, rest in LINE.findall(text.replace("\r", "\n")):
        fields = {}
        for part in rest.split(" | "):
            value, label = part.split(" ", 1) if part.endswith(" s/step") else part.rsplit(" ", 1)[::-1]
            fields[label] = value
        out.append((int(step), fields))
    return out


def number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


def log_file(out) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def close(shown: str, value: float, digits: int) -> bool:
    """`shown` is `value` written with `digits` significant digits."""
    return shown == f"{value:.{digits}g}"


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ------------------------------------------------------------------ SFT: the lines, the file, no dict
def captured_run(run, argv: list[str]):
    """run(argv) with its stdout and stderr captured (module-scoped fixtures cannot take capfd; the Trainer's
    printers, tqdm and vlft's lines all write to sys.stdout / sys.stderr as they are at the time of writing)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        _, trainer = run(argv)
    return trainer, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", params=[False, True], ids=["progress_bar", "disable_tqdm"])
def sft_run(request, tiny_model_dir, tmp_path_factory):
    from vlft.train.sft.run import run

    out = tmp_path_factory.mktemp("runs") / "sft"
    trainer, stdout, stderr = captured_run(run, [
        "--model_id", str(tiny_model_dir), "--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES),
        "--output_dir", str(out), "--lora_enable", "true", "--max_steps", "7", "--per_device_train_batch_size", "2",
        "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--log_line_steps", "3",
        "--seed", "0", "--disable_tqdm", str(request.param).lower()])
    return out, trainer, stdout, stderr


def test_sft_prints_a_line_every_n_steps_and_no_dict(sft_run):
    out, _, stdout, stderr = sft_run
    assert not HF_DICT.search(stdout) and not HF_DICT.search(stderr), (stdout, stderr)
    lines = parse_lines(stderr)
    # the first step, each multiple of 3, the last
    assert [step for step, _ in lines] == [1, 3, 6, 7], stderr
    assert not LINE.search(stdout)
    entries = [e for e in log_file(out) if "loss" in e]
    by_step = {e["step"]: e for e in entries}
    for (step, fields), previous in zip(lines, [0, 1, 3, 6]):
        window = [by_step[s] for s in range(previous + 1, step + 1)]
        assert list(fields)[:2] == ["epoch", "loss"], fields
        assert close(fields["loss"], mean(e["loss"] for e in window), 4), (fields, window)
        assert close(fields["grad_norm"], mean(e["grad_norm"] for e in window), 3)
        assert fields["lr"] == f"{window[-1]['learning_rate']:.2e}"  # the latest, not a mean
        assert fields["epoch"] == f"{window[-1]['epoch']:.2f}"
        assert number(fields["tokens/s"]) == pytest.approx(mean(e["tokens_per_second"] for e in window), abs=0.5)
        assert float(fields["s/step"]) > 0
        assert ("eta" in fields) == (step < 7)


def test_log_file_holds_every_entry_of_the_history(sft_run):
    out, trainer, _, _ = sft_run
    rows = log_file(out)
    history = trainer.state.log_history
    assert len(rows) == len(history) == 8  # 7 steps and the end-of-training summary
    for row, entry in zip(rows, history):
        assert row.pop("time") > 0
        assert row == entry
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 8))
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_second", "samples_per_second"} <= rows[0].keys()
    assert "train_runtime" in rows[-1]
    assert logged_losses(out) == [r["loss"] for r in rows if "loss" in r]  # trainer_state.json still has them


# ------------------------------------------------------------------ DPO and GRPO: their key figures
def test_dpo_line_shows_reward_margin_and_accuracy(tiny_model_dir, tmp_path):
    from vlft.train.dpo.run import run

    out = tmp_path / "dpo"
    data = demo_subset_file(REPO / "data_examples" / "dpo_demo.json", ("image", "text_only_2u1_flat"),
                            tmp_path / "pairs.json")
    _, _, stderr = captured_run(run, [
        "--model_id", str(tiny_model_dir), "--data_path", data, "--output_dir", str(out), "--lora_enable", "true",
        "--max_steps", "2", "--per_device_train_batch_size", "1", "--learning_rate", "1e-3", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1", "--log_line_steps", "1", "--seed", "0"])
    assert not HF_DICT.search(stderr)
    entries = [e for e in log_file(out) if "loss" in e]
    lines = parse_lines(stderr)
    assert [step for step, _ in lines] == [1, 2] == [e["step"] for e in entries]
    for (_, fields), entry in zip(lines, entries):
        assert list(fields)[1:4] == ["loss", "margin", "accuracy"], fields
        assert close(fields["margin"], entry["rewards/margins"], 3)
        assert fields["accuracy"] == f"{entry['rewards/accuracies']:.2f}"
    assert entries[1]["rewards/margins"] != 0  # step 2 follows an update: the figure is not the step-0 constant


def test_grpo_line_shows_the_mean_reward_and_each_function(tiny_model_dir, tmp_path):
    from vlft.train.grpo.run import run

    out = tmp_path / "grpo"
    data = demo_subset_file(REPO / "data_examples" / "grpo_demo.json", ("count_1", "text_only"),
                            tmp_path / "prompts.json")
    # two rewards with different, non-zero means (the built-ins score the untrained tiny model 0)
    (tmp_path / "rewards.py").write_text(
        "from vlft.train.grpo.rewards import completion_text\n"
        "def chars(completions, **kwargs):\n    return [len(completion_text(c)) / 10 for c in completions]\n"
        "def quarter(completions, **kwargs):\n    return [0.25] * len(completions)\n")
    _, _, stderr = captured_run(run, [
        "--model_id", str(tiny_model_dir), "--data_path", data, "--output_dir", str(out), "--lora_enable", "true",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
        "--max_completion_length", "4", "--reward_funcs", f"{tmp_path / 'rewards.py'}:chars",
        f"{tmp_path / 'rewards.py'}:quarter", "--report_to", "none", "--save_strategy", "no",
        "--logging_steps", "1", "--log_line_steps", "2", "--seed", "0"])
    assert not HF_DICT.search(stderr)
    entries = [e for e in log_file(out) if "loss" in e]
    lines = parse_lines(stderr)
    assert [step for step, _ in lines] == [1, 2]
    for (step, fields), previous in zip(lines, [0, 1]):
        window = [e for e in entries if previous < e["step"] <= step and "reward" in e]
        labels = list(fields)
        assert labels[labels.index("reward"):labels.index("reward") + 3] == ["reward", "chars", "quarter"], fields
        assert close(fields["reward"], mean(e["reward"] for e in window), 3)
        assert fields["quarter"] == "0.25" and float(fields["chars"]) > 0
        assert close(fields["chars"], mean(e["rewards/chars/mean"] for e in window), 3)
        assert fields["length"] == f"{mean(e['completions/mean_length'] for e in window):.0f}"


# ------------------------------------------------------------------ the callbacks alone
def state(step: int, max_steps: int = 100, zero: bool = True):
    return SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=zero)


def test_line_window_means_eta_eval_and_off(capsys):
    clock = iter([0.0, 0.0, 20.0, 40.0, 41.0])
    cb = LogLineCallback(10, clock=lambda: next(clock))
    cb.on_train_begin(None, state(0), None)
    cb.on_log(None, state(1), None, logs={"loss": 4.0, "learning_rate": 1e-3, "epoch": 0.01})
    for step in range(2, 11):
        logs = {"loss": float(step), "learning_rate": 1e-3 / step, "epoch": step / 100}
        cb.on_log(None, state(step), None, logs=logs)
    cb.on_log(None, state(10), None, logs={"eval_loss": 1.5, "eval_runtime": 3.0, "epoch": 0.1})
    cb.on_log(None, state(12, zero=False), None, logs={"loss": 9.0})  # not rank 0: nothing
    cb.on_log(None, state(100), None, logs={"train_runtime": 9.0, "train_loss": 5.0})  # the summary: no line
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "[vlft] step 1/100 | epoch 0.01 | loss 4 | lr 1.00e-03 | 20 s/step | eta 33m00s",
        # steps 2..10: loss mean 6, the latest lr and epoch, (40 - 20) / 9 s a step, 90 steps left
        "[vlft] step 10/100 | epoch 0.10 | loss 6 | lr 1.00e-04 | 2.22 s/step | eta 3m20s",
        "[vlft] eval at step 10/100 | eval_loss 1.5"]
    with pytest.raises(VlftError, match="--log_line_steps must be >= 0"):
        LogLineCallback(-1)
    off = LogLineCallback(0, clock=lambda: 0.0)
    off.on_train_begin(None, state(0), None)
    off.on_log(None, state(1), None, logs={"loss": 1.0})
    assert capsys.readouterr().err == ""


def test_line_of_a_run_that_stops_early_and_of_a_resumed_one(capsys):
    cb = LogLineCallback(10, clock=lambda: 0.0)
    cb.on_train_begin(None, state(30), None)  # resumed at step 30: the first step of this run gets a line
    for step in (31, 32, 33):
        cb.on_log(None, state(step), None, logs={"loss": float(step)})
    cb.on_train_end(None, state(33), None)  # stopped at 33 (a stop signal): its last steps get their line
    assert [line.split(" | ")[:2] for line in capsys.readouterr().err.splitlines()] == [
        ["[vlft] step 31/100", "loss 31"], ["[vlft] step 33/100", "loss 32.5"]]


def test_log_file_appends_and_a_resume_drops_the_lines_past_its_checkpoint(tmp_path):
    path = tmp_path / "run" / LOG_FILE
    cb = MetricsFileCallback(path)
    cb.on_train_begin(None, state(0), None)  # no file yet: nothing to do
    for step in (1, 2, 3, 4):
        cb.on_log(None, state(step), None, logs={"loss": step / 10})
    cb.on_log(None, state(4, zero=False), None, logs={"loss": 9.0})  # rank 0 alone writes
    path.open("a").write("not json\n")
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()[:4]] == [1, 2, 3, 4]
    MetricsFileCallback(path).on_train_begin(None, state(2), None)  # resumed from checkpoint-2
    assert [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())] == [(1, 0.1), (2, 0.2)]
    cb.on_log(None, state(3), None, logs={"loss": 0.35})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    drop_lines_after_step(path, 0)  # a run from step 0 starts an empty file
    assert path.read_text() == ""
