"""Trainer callbacks, and what a run prints and logs (`use_log_lines`)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from vlft.errors import VlftError
from vlft.models.patches import uncheckpoint_frozen_blocks
from vlft.run_dir import LOG_FILE
from vlft.train.core.throughput import TokensProgressCallback


class FrozenVisionCallback(TrainerCallback):
    """The Trainer enables activation checkpointing on the whole model at the start of `train()`, after the
    model was prepared; switch it off again in the frozen vision blocks (see models/patches/frozen_vision.py)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            uncheckpoint_frozen_blocks(model)


class ReleaseSharedMemoryCallback(TrainerCallback):
    """A single-process DeepSpeed run (the CPU rehearsal with one process) starts its process group only when the
    Trainer wraps the model, after `init_distributed_early` had nothing to do: unlink its CPU all-reduce segment's
    name once training begins (train/core/launch.py: release_cpu_allreduce_names says why; a no-op elsewhere)."""

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        from vlft.train.core.launch import release_cpu_allreduce_names

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            release_cpu_allreduce_names()


# --- what a run prints and what it logs to a file -------------------------------------------------------------------


class _NoDictLine(ProgressCallback):
    """HF's ProgressCallback writes `str(logs)` above the bar at every log, floats as quoted strings ("{'loss':
    '7.616', ...}"); this link of the class chain drops that line (LogLineCallback prints a readable one)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


class ProgressBarCallback(TokensProgressCallback, _NoDictLine):
    """TokensProgressCallback's bar and postfix (steps, time left, tokens/s, loss), without the dict HF prints
    above it: TokensProgressCallback's call to its parent's `on_log` lands on `_NoDictLine`, which is next in the
    method order."""


class LogLineCallback(TrainerCallback):
    """One readable line on stderr every `every` optimizer steps, at the first logged step and at the last:

        [vlft] step 40/1000 | epoch 0.40 | loss 1.234 | grad_norm 0.87 | lr 2.00e-05 | tokens/s 4,210 | 12.3 s/step

    then `| eta 3h16m` while steps remain. Figures are the means over the log entries since the previous line
    (learning rate and epoch: the latest), in the order of FIGURES, those present: DPO's and KTO's reward margin and
    accuracy, the reward model's (TRL's reward-trainer names, `margin` and `accuracy`),
    GRPO's mean reward and, with several reward functions, each one's mean, its KL and mean completion length.
    s/step and eta are wall-clock, from the steps since the previous line. An evaluation prints its own line at once
    (`eval at step 40/1000 | eval_loss 1.2`); the Trainer's end-of-training summary is left to vlft's closing
    lines. Rank 0 only, written through tqdm so that the progress bar stays whole. `every` 0: no lines."""

    # (logged key, label, format), in the order shown
    FIGURES = (("epoch", "epoch", "{:.2f}"), ("loss", "loss", "{:.4g}"), ("aux_loss", "aux_loss", "{:.4g}"),
               ("rewards/margins", "margin", "{:.3g}"), ("rewards/accuracies", "accuracy", "{:.2f}"),
               ("margin", "margin", "{:.3g}"), ("accuracy", "accuracy", "{:.2f}"), ("reward", "reward", "{:.3g}"),
               ("kl", "kl", "{:.3g}"), ("completions/mean_length", "length", "{:.0f}"),
               ("grad_norm", "grad_norm", "{:.3g}"), ("learning_rate", "lr", "{:.2e}"),
               ("tokens_per_second", "tokens/s", "{:,.0f}"), ("mfu", "mfu", "{:.1%}"))
    LATEST = {"learning_rate", "epoch"}  # a state, not a per-step figure: the latest value, not a mean

    def __init__(self, every: int, clock=time.monotonic):
        if every < 0:
            raise VlftError(f"--log_line_steps must be >= 0 (0: no log lines), got {every}")
        self.every = every
        self.clock = clock
        self._window: dict[str, list[float]] = {}
        self._last_step: int | None = None  # the step of the previous line (None: no line yet in this run)
        self._start_step = 0
        self._last_time = clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self._window, self._last_step = {}, None
        self._start_step, self._last_time = state.global_step, self.clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.every or not logs or not state.is_world_process_zero:
            return
        step = state.global_step
        if "loss" not in logs:  # not a training entry: an evaluation gets its own line, the final summary none
            figures = [f"{key} {value:.4g}" for key, value in logs.items() if key.startswith("eval_")
                       and key.endswith("loss") and _is_number(value)]
            if figures:
                write_line(f"eval at step {step}/{state.max_steps} | " + " | ".join(figures))
            return
        for key, value in logs.items():
            if _is_number(value):
                self._window.setdefault(key, []).append(float(value))
        last = self._start_step if self._last_step is None else self._last_step
        if self._last_step is None or step // self.every > last // self.every or step >= state.max_steps:
            self._emit(step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        # a run that stopped early (a stop signal, early stopping): the steps since the last line
        if self.every and self._window and state.is_world_process_zero:
            self._emit(state.global_step, state.max_steps)

    def _emit(self, step: int, max_steps: int) -> None:
        last = self._start_step if self._last_step is None else self._last_step
        if step <= last:
            return
        now = self.clock()
        write_line(self.line(step, max_steps, (now - self._last_time) / (step - last)))
        self._window, self._last_step, self._last_time = {}, step, now

    def line(self, step: int, max_steps: int, seconds_per_step: float) -> str:
        """The line for `step` of `max_steps` from the figures gathered since the previous one."""
        values = {key: vals[-1] if key in self.LATEST else sum(vals) / len(vals) for key, vals in self._window.items()}
        per_function = [key for key in values if key.startswith("rewards/") and key.endswith("/mean")]
        parts = [f"step {step}/{max_steps}"]
        for key, label, fmt in self.FIGURES:
            if key in values:
                parts.append(f"{label} {fmt.format(values[key])}")
            if key == "reward" and len(per_function) > 1:  # with one function its mean is the reward
                names = [key.removeprefix("rewards/").removesuffix("/mean") for key in per_function]
                parts.extend(f"{name} {values[key]:.3g}" for name, key in zip(names, per_function))
        parts.append(f"{seconds_per_step:.3g} s/step")
        if step < max_steps:
            parts.append(f"eta {_duration(seconds_per_step * (max_steps - step))}")
        return " | ".join(parts)


class MetricsFileCallback(TrainerCallback):
    """Every log entry, as it is logged, as one JSON line of `path` (`<output_dir>/log.jsonl`): the entry the
    Trainer also appends to trainer_state.json's `log_history` (the figures as logged, throughput and the stage's
    metrics included, and `step`), plus `time` (Unix seconds). Readable while the run goes on, and whatever
    --logging_steps the reporters get. Rank 0 only; each line is one `write` to a file opened for appending.

    At the start of training the lines of steps after the one the run starts from are dropped (what a killed run
    logged past its last checkpoint: a resume logs those steps again; a run from step 0 starts an empty file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            drop_lines_after_step(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        row = {**logs, "step": state.global_step, "time": round(time.time(), 3)}
        line = json.dumps(row, default=_plain) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)


def drop_lines_after_step(path: str | os.PathLike, step: int) -> None:
    """Keep the lines of the JSONL file `path` whose "step" is at most `step` (a line without one, or not JSON,
    goes too); rewritten through a temporary file and renamed. No file: nothing to do."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _line_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def use_log_lines(trainer) -> None:
    """Set up what `trainer` prints and logs: the progress bar without HF's dict (present unless --disable_tqdm),
    no PrinterCallback (which prints the dict under --disable_tqdm), a LogLineCallback every --log_line_steps
    steps and the MetricsFileCallback in --output_dir. Call it after the callbacks that add figures to a log
    entry (ThroughputCallback): these go last and see them."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBarCallback())
    trainer.pop_callback(PrinterCallback)
    trainer.add_callback(LogLineCallback(getattr(trainer.args, "log_line_steps", 10)))
    trainer.add_callback(MetricsFileCallback(Path(trainer.args.output_dir) / LOG_FILE))


def write_line(line: str) -> None:
    """`line` on stderr as vlft's other lines, through tqdm: an open progress bar is cleared and drawn again below."""
    from tqdm import tqdm

    tqdm.write(f"[vlft] {line}", file=sys.stderr)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _duration(seconds: float) -> str:
    """3h12m, 12m05s, 45s."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _line_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _plain(value):
    """A logged value JSON cannot write as it is (a tensor, a NumPy number): its number, else its text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
