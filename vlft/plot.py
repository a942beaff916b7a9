"""Training curves of a run, drawn from its trainer_state.json into one PNG:

    vlft plot output/run1                      # -> output/run1/training_curves.png
    vlft plot output/run1/checkpoint-500 --output curves.png   # a run still in progress: its newest checkpoint

Every stage draws `training_curves.png` into its run directory when it finishes (train/core/launch.py:
`train_and_save` calls `plot_finished_run`); `vlft plot` draws it again, e.g. from a checkpoint of a run still
training, or after a run whose plot failed.

One panel per metric the log history holds, in this order, panels without data left out:

    loss                  `loss` per logged step, `eval_loss` (--eval_data_path) on the same axes
    learning rate         `learning_rate`
    gradient norm         `grad_norm`
    tokens/s              `tokens_per_second` (train/core/throughput.py: non-pad tokens, whole job)
    reward                GRPO: `reward` (weighted sum of the reward functions, mean over completions)
    reward per function   GRPO: `rewards/<function>/mean`, one line each
    reward margin         DPO: `rewards/margins` (chosen minus rejected implicit reward)
    preference accuracy   DPO: `rewards/accuracies` (pairs whose chosen answer has the higher reward)

The x axis is the optimizer step. The loss and gradient-norm panels have a logarithmic y axis (`LOG_PANELS`): a
run's loss falls by orders of magnitude (the demo's from 7.6 to 0.04) and on a linear axis everything after the
first steps is a flat line at zero. A panel with a value <= 0 (GRPO's loss can be zero or negative; a GRPO
gradient norm of 0) stays linear, since a log axis would drop those points without a word.

What was drawn is written into the PNG too (text chunks `vlft series <i>`, one per series: JSON `{"metric",
"steps", "values"}`, non-finite values as null), so a test or a script reads the numbers back with `read_series`
instead of trusting pixels.

Drawn with matplotlib's Agg canvas directly (no pyplot): no display is needed and the backend of a notebook that
imports vlft is left alone.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from pathlib import Path

from vlft.errors import VlftError
from vlft.run_dir import PLOT_FILE, STATE_FILE
from vlft.utils import FlagParser, log

SERIES_KEY = "vlft series"  # PNG text keyword prefix: "vlft series 0", "vlft series 1", ...

# (panel title, metric names or fnmatch patterns drawn on it, y label)
PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("loss", ("loss", "eval_loss"), "loss"),
    ("learning rate", ("learning_rate",), "learning rate"),
    ("gradient norm", ("grad_norm",), "norm (before clipping)"),
    ("tokens/s", ("tokens_per_second",), "non-pad tokens/s, all processes"),
    ("reward", ("reward",), "mean reward"),
    ("reward per function", ("rewards/*/mean",), "mean reward"),
    ("reward margin", ("rewards/margins",), "chosen - rejected"),
    ("preference accuracy", ("rewards/accuracies",), "fraction of pairs"),
)

# panels drawn on a log y axis when every value on them is positive (`panel_scale`)
LOG_PANELS = frozenset({"loss", "gradient norm"})


def collect_series(log_history: list[dict]) -> dict[str, tuple[list[int], list[float | None]]]:
    """metric -> (steps, values) for every metric a panel draws, in log order. A log entry without a `step`
    (should not happen) is skipped; non-number values are skipped; non-finite ones become None (a gap)."""
    series: dict[str, tuple[list[int], list[float | None]]] = {}
    patterns = [p for _, names, _ in PANELS for p in names]
    for entry in log_history:
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not any(fnmatch.fnmatchcase(key, p) for p in patterns):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value) if math.isfinite(value) else None)
    return series


def panels_for(series: dict) -> list[tuple[str, list[str], str]]:
    """The panels that have data: (title, metrics drawn on it in order, y label)."""
    out = []
    for title, patterns, ylabel in PANELS:
        metrics = [m for p in patterns for m in sorted(series) if fnmatch.fnmatchcase(m, p)]
        metrics = list(dict.fromkeys(metrics))
        if metrics:
            out.append((title, metrics, ylabel))
    return out


def panel_scale(panel: str, series: dict, metrics: list[str]) -> str:
    """"log" for a panel of `LOG_PANELS` whose drawn values are all positive, else "linear"."""
    values = [v for m in metrics for v in series[m][1] if v is not None]
    return "log" if panel in LOG_PANELS and values and all(v > 0 for v in values) else "linear"


def draw_curves(log_history: list[dict], *, title: str = ""):
    """(matplotlib Figure, series drawn) for `log_history`: one axes per panel with data, titled as in
    `PANELS`, y scale from `panel_scale`. Raises VlftError when the history holds none of the metrics of
    `PANELS`; ImportError when matplotlib is not installed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = collect_series(log_history)
    panels = panels_for(series)
    if not panels:
        raise VlftError("the log history holds no metric to plot (no loss, learning_rate, grad_norm, ...); "
                        "was anything logged? (--logging_steps)")
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (panel, metrics, ylabel) in zip(axes, panels):
        for metric in metrics:
            steps, values = series[metric]
            y = [math.nan if v is None else v for v in values]
            eval_line = metric.startswith("eval_")
            ax.plot(steps, y, label=metric, marker="o" if eval_line or len(steps) <= 30 else None,
                    markersize=3, linestyle="--" if eval_line else "-")
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        scale = panel_scale(panel, series, metrics)
        ax.set_yscale(scale)
        ax.set_ylabel(f"{ylabel}, log scale" if scale == "log" else ylabel)
        ax.grid(True, alpha=0.3)
        if len(metrics) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig, {m: series[m] for _, metrics, _ in panels for m in metrics}


def plot_history(log_history: list[dict], output: str | Path, *, title: str = "") -> dict:
    """Draw the curves of `log_history` (a Trainer's `state.log_history`) into the PNG `output` (`draw_curves`);
    returns the series drawn ({metric: (steps, values)}, as `read_series` reads them back). Raises VlftError when
    the history holds none of the metrics of `PANELS`; ImportError when matplotlib is not installed."""
    fig, drawn = draw_curves(log_history, title=title)
    metadata = {"Software": "vlft"}
    for i, (metric, (steps, values)) in enumerate(drawn.items()):
        metadata[f"{SERIES_KEY} {i}"] = json.dumps({"metric": metric, "steps": steps, "values": values},
                                                    separators=(",", ":"))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")  # a reader never sees half a PNG
    fig.savefig(tmp, format="png", dpi=100, metadata=metadata)
    tmp.replace(output)
    return drawn


def read_series(png: str | Path) -> dict[str, tuple[list[int], list[float | None]]]:
    """The series `plot_history` wrote into a PNG: {metric: (steps, values)}. Pillow refuses text chunks over
    1 MB by default (a very long run's series); the limit is lifted while this file is read."""
    from PIL import Image, PngImagePlugin

    limit = PngImagePlugin.MAX_TEXT_CHUNK
    PngImagePlugin.MAX_TEXT_CHUNK = max(limit, 1 << 30)
    try:
        with Image.open(png) as image:
            image.load()
            text = dict(getattr(image, "text", {}))
    finally:
        PngImagePlugin.MAX_TEXT_CHUNK = limit
    out = {}
    for key in sorted((k for k in text if k.startswith(SERIES_KEY + " ")), key=lambda k: int(k.rsplit(" ", 1)[1])):
        item = json.loads(text[key])
        out[item["metric"]] = (item["steps"], item["values"])
    return out


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw <run_dir>/trainer_state.json's curves into `output` (default <run_dir>/training_curves.png);
    returns the PNG's path. VlftError when the run directory has no readable trainer_state.json."""
    run_dir = Path(run_dir)
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        where = "no such directory" if not run_dir.is_dir() else f"no {STATE_FILE} in it"
        raise VlftError(f"{run_dir}: {where}; give a finished run's --output_dir, or one of its checkpoint-N folders "
                        "for a run still training")
    try:
        history = json.loads(state_file.read_text())["log_history"]
    except (ValueError, KeyError, TypeError) as err:
        raise VlftError(f"{state_file}: not a Trainer state file with a log_history ({err})") from None
    output = Path(output) if output is not None else run_dir / PLOT_FILE
    plot_history(history, output, title=run_dir.resolve().name)
    return output


def plot_finished_run(trainer) -> Path | None:
    """The end of every run (train/core/launch.py): draw the curves into the run directory on the main process.
    A finished run never fails here: any error is logged as a warning with the command that draws it later."""
    if not trainer.is_world_process_zero() or os.environ.get("VLFT_PLOT", "1") == "0":
        return None  # VLFT_PLOT=0: no drawing (the test suite's runs; about 1 s each)
    out = trainer.args.output_dir
    try:
        return plot_run(out)
    except Exception as err:  # the run is saved: a missing picture is not worth failing it
        log(f"warning: could not draw {PLOT_FILE} ({type(err).__name__}: {err}); the run itself is saved. "
            f"Draw it later with: vlft plot {out}")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="vlft plot", description="Draw a run's training curves (loss, learning "
                        "rate, grad norm, tokens/s, eval loss, DPO/GRPO rewards) from its trainer_state.json.")
    parser.add_argument("run_dir", help="a run's --output_dir, or one of its checkpoint-N folders")
    parser.add_argument("--output", default=None, help=f"PNG to write (default: RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.output))
    return 0
