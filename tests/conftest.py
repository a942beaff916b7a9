"""Shared fixtures: the tiny offline models (built once per session) and their processors."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLFT_PLOT", "0")  # runs skip training_curves.png (~1 s each); tests of the plot use plotting()

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data_examples" / "llava_demo.json"
DEMO_IMAGES = REPO / "data_examples" / "images"
# Every family of the descriptor table (vlft/models/families/): the matrices parametrised by family run each of them,
# so a family added there joins them by itself. The multi-process tests take the three older families and one MoE.
FAMILIES = tuple(__import__("vlft.models.tiny", fromlist=["FAMILIES"]).FAMILIES)


def _demo_media():
    from vlft.data.prepare import MediaSettings

    # image budgets of the scripts; per-frame video budgets sized for the tiny model's 16-pixel factor
    return MediaSettings(image_min_pixels=3136, image_max_pixels=12845056, video_min_pixels=1024,
                         video_max_pixels=4096, video_max_total_pixels=65536)


DEMO_MEDIA = _demo_media()


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """One prepared-data cache per test session (data/index.py), also for the commands tests start: a warm cache
    left by an earlier session never stands in for a preparation a test means to run."""
    folder = tmp_path_factory.mktemp("data_cache")
    os.environ["VLFT_DATA_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_models_root):
    """family -> path of a saved tiny model of that family (built on first use)."""
    from vlft.models.tiny import save_tiny_model

    def get(family: str = "qwen2_vl") -> Path:
        return save_tiny_model(tiny_models_root / f"tiny-{family}", family, exist_ok=True)

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen2_vl")


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from vlft.models.loading import load_processor

    return load_processor(str(tiny_model_dir))


@pytest.fixture(scope="session")
def image_only_data(tmp_path_factory) -> Path:
    """The demo records that have images, so that every batch exercises the vision tower."""
    records = [r for r in json.loads(DEMO_DATA.read_text()) if "image" in r]
    path = tmp_path_factory.mktemp("data") / "images_only.json"
    path.write_text(json.dumps(records))
    return path


def loss_and_grads(model, batch):
    """One forward + backward from zeroed gradients: the loss and a copy of every gradient, by parameter name."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rounding_sensitivity(model, batch) -> float:
    """How far `model`'s logits on `batch` move when every decoder weight matrix is perturbed by fp32 rounding
    (relative 1e-7, random): the floor under any exact rewrite of the weights (a merge, PiSSA's split). The dense tiny
    models move by ~1e-5; the hybrid Qwen3.5 ones by ~2e-4, their Gated DeltaNet recurrence (fp32 chunked delta rule,
    the tiny models' fast decays) amplifying it."""
    import copy

    import torch

    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=generator))
        return (noisy(**batch).logits - model(**batch).logits).abs().max().item()


def logged_losses(out: Path) -> list[float]:
    """The losses a finished run logged (its trainer_state.json)."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def final_weights(out: Path) -> dict:
    """Every weight a run saved (full model, adapter, non-LoRA trainables), keyed "file:name"."""
    from safetensors.torch import load_file

    weights = {}
    for name in ("model.safetensors", "adapter_model.safetensors", "non_lora_trainables.safetensors"):
        if (out / name).is_file():
            weights.update({f"{name}:{k}": v for k, v in load_file(str(out / name)).items()})
    assert weights, f"no weights in {out}"
    return weights


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def assert_same_run(straight: Path, resumed: Path, label: str) -> None:
    """A resumed run logged the straight run's losses and saved its weights (fp32: within 1e-6); prints the
    figures as one row of the resume-equality table."""
    want, got = logged_losses(straight), logged_losses(resumed)
    assert len(want) == len(got) and abs(want[-1] - want[0]) > 1e-3  # the run moves: equality means something
    loss_diff = max(abs(a - b) for a, b in zip(want, got))
    weight_diff = max_weight_difference(final_weights(straight), final_weights(resumed))
    print(f"\nresume equality | {label} | max loss diff {loss_diff:.3g} | max weight diff {weight_diff:.3g}")
    assert loss_diff <= 1e-6, (want, got)
    assert weight_diff <= 1e-6


def demo_subset_file(demo: Path, ids, path: Path) -> str:
    """The records of the demo file `demo` with these ids, in this order, their media paths (image, video,
    rejected_image, rejected_video) made absolute, written to `path`; returns it as a string."""
    import json

    by_id = {r["id"]: r for r in json.loads(demo.read_text())}
    records = []
    for record_id in ids:
        record = dict(by_id[record_id])
        for key in ("image", "video", "rejected_image", "rejected_video"):
            if key in record:
                value = record[key]
                record[key] = [str(demo.parent / v) for v in value] if isinstance(value, list) else str(demo.parent / value)
        records.append(record)
    path.write_text(json.dumps(records))
    return str(path)


@contextlib.contextmanager
def plotting():
    """Runs inside draw training_curves.png (the suite turns drawing off: VLFT_PLOT=0 above)."""
    before = os.environ.get("VLFT_PLOT")
    os.environ["VLFT_PLOT"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["VLFT_PLOT"]
        else:
            os.environ["VLFT_PLOT"] = before


@pytest.fixture
def stop_after_data(monkeypatch):
    """The stages stop right after their start-up checks, before the model (or GRPO's reward functions) load."""
    from vlft.errors import VlftError

    def stop(*args, **kwargs):
        raise VlftError("stopped by the test after the data check")

    monkeypatch.setattr("vlft.train.core.setup.prepare_model", stop)
    monkeypatch.setattr("vlft.train.grpo.rewards.load_reward_funcs", stop)
