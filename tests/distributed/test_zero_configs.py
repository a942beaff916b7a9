"""Every zero_configs/*.json is accepted by DeepSpeed's own config class once the HF integration has filled
its "auto" values, and each file has the keys its stage needs."""
from __future__ import annotations

import json

import pytest
from conftest import REPO

CONFIGS = sorted((REPO / "zero_configs").glob("*.json"))


def test_the_five_configs_ship():
    assert [p.name for p in CONFIGS] == ["zero1.json", "zero2.json", "zero2_offload.json", "zero3.json",
                                         "zero3_offload.json"]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_deepspeed_accepts_the_filled_config(path, tmp_path, monkeypatch):
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from vlft.config import parse_args
    from vlft.train.sft.config import GROUPS as SFT_GROUPS

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    *_, args = parse_args(SFT_GROUPS, ["--output_dir", str(tmp_path), "--deepspeed", str(path), "--use_cpu", "true",
                                       "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
                                       "--bf16", "false", "--max_grad_norm", "0.5"])
    filled = HfTrainerDeepSpeedConfig(str(path))
    filled.trainer_config_process(args)
    config = DeepSpeedConfig(filled.config)  # DeepSpeed's own validation
    assert config.train_micro_batch_size_per_gpu == 2 and config.gradient_accumulation_steps == 4
    assert config.gradient_clipping == 0.5

    raw = json.loads(path.read_text())
    zero = raw["zero_optimization"]
    assert zero["stage"] == config.zero_optimization_stage == int(path.stem[len("zero")])  # zero1 -> 1, ...
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"
    assert raw["train_micro_batch_size_per_gpu"] == raw["gradient_accumulation_steps"] == "auto"
    if zero["stage"] < 3:
        assert "offload_param" not in zero  # parameter offload is a stage-3 feature
    else:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # saving gathers the full weights
    offload = "offload" in path.name
    assert ("offload_optimizer" in zero) is offload
    assert ("offload_param" in zero) is (offload and zero["stage"] == 3)
