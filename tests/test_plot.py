"""training_curves.png: every run draws it at its end from trainer_state.json (what was drawn is in the PNG's text
chunks, read back with `read_series`), DPO runs get their reward panels, `vlft plot` draws it again, and a plot
that fails leaves the finished run finished."""
from __future__ import annotations

import json
import math

import pytest
from conftest import DEMO_DATA, DEMO_IMAGES, REPO, plotting
from PIL import Image

from vlft import plot
from vlft.cli import main
from vlft.plot import PLOT_FILE, collect_series, panels_for, read_series
from vlft.train.sft.run import run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SFT = ["--data_path", str(DEMO_DATA), "--image_folder", str(DEMO_IMAGES), "--per_device_train_batch_size", "2",
       "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1",
       "--save_strategy", "no", "--seed", "0", "--lora_enable", "true", "--lora_rank", "8", "--learning_rate", "1e-3"]


def history(out) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def logged(out, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the run's trainer_state.json."""
    entries = [h for h in history(out) if key in h]
    return [h["step"] for h in entries], [h[key] for h in entries]


def assert_valid_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 640 and image.size[1] >= 320


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sft"
    with plotting():
        summary, _ = run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "3", *SFT])
    assert summary["steps"] == 3
    return out


def test_a_finished_run_draws_its_curves(sft_run):
    png = sft_run / PLOT_FILE
    assert_valid_png(png)
    drawn = read_series(png)
    # the series drawn are exactly those of trainer_state.json, step by step
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        steps, values = logged(sft_run, key)
        assert steps == [1, 2, 3], key
        assert drawn[key] == (steps, values), key
    assert all(v > 0 for v in drawn["tokens_per_second"][1])
    assert "eval_loss" not in drawn  # no --eval_data_path: no eval panel line
    assert not any(k.startswith("rewards/") or k == "reward" for k in drawn)


def test_vlft_plot_draws_it_again(sft_run, tmp_path, capsys):
    elsewhere = tmp_path / "sub" / "curves.png"
    assert main(["plot", str(sft_run), "--output", str(elsewhere)]) == 0
    assert capsys.readouterr().out.strip() == str(elsewhere)
    assert_valid_png(elsewhere)
    assert read_series(elsewhere) == read_series(sft_run / PLOT_FILE)

    (sft_run / PLOT_FILE).unlink()  # the default output: the run directory's training_curves.png
    assert main(["plot", str(sft_run)]) == 0
    assert read_series(sft_run / PLOT_FILE) == read_series(elsewhere)


def test_vlft_plot_names_what_is_missing(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "vlft plot: error:" in err and "no trainer_state.json" in err and "checkpoint-N" in err


def test_a_plot_failure_leaves_the_run_finished(tiny_model_dir, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plot, "plot_history", broken)
    monkeypatch.setenv("VLFT_PLOT", "1")
    out = tmp_path / "run"
    summary, _ = run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--max_steps", "1", *SFT])
    assert summary["steps"] == 1 and math.isfinite(summary["last_loss"])
    assert (out / "adapter_model.safetensors").is_file() and (out / "trainer_state.json").is_file()
    assert not (out / PLOT_FILE).exists()
    err = capsys.readouterr().err
    assert f"warning: could not draw {PLOT_FILE} (RuntimeError: no fonts today)" in err
    assert f"vlft plot {out}" in err
    assert "done: 1 steps" in err  # the end-of-run summary still comes


def test_dpo_run_plots_margins_and_accuracies(tiny_model_dir, tmp_path, monkeypatch):
    from vlft.train.dpo.run import run as dpo

    monkeypatch.setenv("VLFT_PLOT", "1")

    out = tmp_path / "dpo"
    dpo(["--model_id", str(tiny_model_dir), "--data_path", str(REPO / "data_examples" / "dpo_demo.json"),
         "--output_dir", str(out), "--lora_enable", "true", "--lora_rank", "8", "--freeze_vision_tower", "true",
         "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-3", "--report_to", "none",
         "--disable_tqdm", "true", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0"])
    png = out / PLOT_FILE
    assert_valid_png(png)
    drawn = read_series(png)
    for key in ("rewards/margins", "rewards/accuracies", "loss", "learning_rate"):
        assert drawn[key] == logged(out, key), key
        assert drawn[key][0] == [1, 2], key
    titles = [title for title, _, _ in panels_for(collect_series(history(out)))]
    assert {"reward margin", "preference accuracy"} <= set(titles)


def test_grpo_and_eval_metrics_get_their_panels():
    """The panel rules on a log history as the GRPO trainer and an evaluating SFT run write it (a GRPO run is
    tested end to end in tests/train/test_grpo_e2e.py; here only which panel draws what)."""
    log_history = [
        {"loss": 0.1, "learning_rate": 1e-6, "grad_norm": 0.5, "reward": 0.5, "reward_std": 0.1,
         "rewards/format/mean": 1.0, "rewards/format/std": 0.0, "rewards/count/mean": 0.25, "step": 1},
        {"eval_loss": 2.0, "eval_runtime": 0.3, "step": 1},
        {"loss": float("nan"), "learning_rate": 1e-6, "reward": 0.75, "rewards/format/mean": 1.0,
         "rewards/count/mean": 0.5, "step": 2},
        {"train_runtime": 3.0, "train_loss": 0.1, "step": 2},
    ]
    series = collect_series(log_history)
    assert series["loss"] == ([1, 2], [0.1, None])  # a non-finite value is a gap
    assert series["eval_loss"] == ([1], [2.0])
    panels = {title: metrics for title, metrics, _ in panels_for(series)}
    assert panels == {"loss": ["loss", "eval_loss"], "learning rate": ["learning_rate"], "gradient norm": ["grad_norm"],
                      "reward": ["reward"], "reward per function": ["rewards/count/mean", "rewards/format/mean"]}


def test_plot_history_writes_what_it_drew(tmp_path):
    log_history = [{"loss": 3.0 - 0.001 * i, "learning_rate": 1e-4, "step": i} for i in range(1, 2001)]
    drawn = plot.plot_history(log_history, tmp_path / "c.png")
    assert read_series(tmp_path / "c.png") == drawn
    assert drawn["loss"] == (list(range(1, 2001)), [h["loss"] for h in log_history])
    with pytest.raises(Exception, match="no metric to plot"):
        plot.plot_history([{"train_runtime": 1.0, "step": 0}], tmp_path / "d.png")
    assert not (tmp_path / "d.png").exists()


def axes_by_title(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_loss_and_grad_norm_are_drawn_on_a_log_scale(sft_run):
    fig, _ = plot.draw_curves(history(sft_run))
    axes = axes_by_title(fig)
    assert axes["loss"].get_yscale() == "log" and axes["gradient norm"].get_yscale() == "log"
    assert "log scale" in axes["loss"].get_ylabel()
    assert axes["learning rate"].get_yscale() == "linear" and axes["tokens/s"].get_yscale() == "linear"
    # the demo's shape: the late steps' progress (0.5 -> 0.05) spans as much height as the first steps' (50 -> 5)
    falling = [{"loss": 50.0 * 10 ** (-i / 10), "step": i} for i in range(21)]
    ax = axes_by_title(plot.draw_curves(falling)[0])["loss"]
    y = [ax.transData.transform((0, v))[1] for v in (0.5, 5.0, 50.0)]  # display height of each loss value
    assert y[1] - y[0] == pytest.approx(y[2] - y[1], rel=1e-6)  # linear: a tenth of it


def test_a_panel_with_values_at_or_below_zero_stays_linear():
    """GRPO's loss can be 0 or negative and its gradient norm 0: on a log axis those points would vanish."""
    log_history = [{"loss": 0.0, "grad_norm": 0.0, "reward": 0.0, "step": 1},
                   {"loss": -0.02, "grad_norm": 0.3, "reward": 0.5, "step": 2}]
    axes = axes_by_title(plot.draw_curves(log_history)[0])
    assert axes["loss"].get_yscale() == "linear" and axes["gradient norm"].get_yscale() == "linear"
    # one positive line and one eval line with a gap (None) still log
    mixed = [{"loss": 2.0, "step": 1}, {"eval_loss": 1.5, "step": 1}, {"loss": float("nan"), "step": 2}]
    assert axes_by_title(plot.draw_curves(mixed)[0])["loss"].get_yscale() == "log"
