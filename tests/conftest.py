"""Shared fixtures: the tiny offline models (built once per session) and their processors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data_examples" / "llava_demo.json"
DEMO_IMAGES = REPO / "data_examples" / "images"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from vlft.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2_vl", "qwen2_vl")


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from vlft.models.loading import load_processor

    return load_processor(str(tiny_model_dir))
