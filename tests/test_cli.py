"""`vlft <command>`: the command table, `tiny-model`, flag errors of `sft`, and `--config` files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlft.cli import COMMANDS, main
from vlft.config import parse_args
from vlft.errors import VlftError
from vlft.stages import STAGES
from vlft.train.sft.config import GROUPS as SFT_GROUPS

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data_examples" / "llava_demo.json"


def vlft(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlft", *argv], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    proc = vlft("--help")
    assert proc.returncode == 0
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    stages = [name for name, stage in STAGES.items() if stage.config]  # the training stages first, in table order
    assert stages[:3] == ["sft", "dpo", "grpo"]
    assert listed == [*stages, "merge", "predict", "plot", "check-data", "preview", "convert", "plan", "tiny-model"]


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: vlft <command>" in capsys.readouterr().out


def test_unknown_command():
    proc = vlft("trian")
    assert proc.returncode == 2
    assert "vlft: unknown command 'trian'" in proc.stderr
    assert "check-data" in proc.stderr  # the usage follows
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_points_at_a_main(command):
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    assert callable(module.main)


# --- tiny-model ---


def test_tiny_model_builds_a_loadable_model(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "tiny"
    assert main(["tiny-model", str(out)]) == 0
    assert f"tiny qwen2_vl model in {out}" in capsys.readouterr().err

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.model_type == "qwen2_vl"
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert processor.chat_template and processor.tokenizer.pad_token == "<|endoftext|>"
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert len(processor.tokenizer) <= model.config.text_config.vocab_size

    weights = (out / "model.safetensors").read_bytes()
    assert main(["tiny-model", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"vlft tiny-model: error: {out} already exists" in err
    assert "--exist_ok" in err

    assert main(["tiny-model", str(out), "--exist_ok"]) == 0
    assert (out / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary directory left behind


def test_tiny_model_exist_ok_does_not_accept_a_dir_without_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["tiny-model", str(tmp_path / "empty"), "--exist_ok"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_tiny_model_exist_ok_does_not_reuse_another_family(tmp_path, capsys):
    """--exist_ok reuses a model of the family asked for only: another family's model there is named, not returned."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "qwen3_5"}')
    assert main(["tiny-model", str(tmp_path / "m"), "--family", "qwen3_5_moe", "--exist_ok"]) == 2
    assert "already holds a tiny qwen3_5 model, not qwen3_5_moe" in capsys.readouterr().err


def test_tiny_model_rejects_an_unknown_family(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["tiny-model", str(tmp_path / "m"), "--family", "llava"])
    assert info.value.code == 2
    assert "--family" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# --- sft flags ---


@pytest.mark.parametrize("missing", ["--model_id", "--data_path"])
def test_sft_names_a_missing_required_flag(tmp_path, capsys, missing):
    given = {"--model_id": str(tmp_path), "--data_path": str(DEMO_DATA)}
    del given[missing]
    argv = [x for kv in given.items() for x in kv]
    assert main(["sft", *argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "vlft sft: error: invalid arguments:" in err
    assert f"{missing} is required" in err
    assert not (tmp_path / "out").exists()


def test_sft_lists_every_missing_flag(capsys):
    assert main(["sft"]) == 2
    err = capsys.readouterr().err
    assert "--model_id is required" in err and "--data_path is required" in err


def test_sft_unknown_flag(tmp_path, capsys):
    rc = main(["sft", "--model_id", str(tmp_path), "--data_path", str(DEMO_DATA), "--no_such_flag", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "vlft sft: error: unknown flag --no_such_flag; run with --help for the list of flags" in err


def test_sft_contradictory_flags_are_named(tmp_path, capsys):
    rc = main(["sft", "--model_id", str(tmp_path), "--data_path", str(DEMO_DATA), "--output_dir", str(tmp_path / "o"),
               "--freeze_vision_tower", "true", "--freeze_merger", "true", "--freeze_llm", "true"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "leave nothing to train" in err
    assert all(flag in err for flag in ("--freeze_vision_tower", "--freeze_merger", "--freeze_llm"))


def test_invalid_value_is_a_vlft_error(tmp_path, capsys):
    rc = main(["sft", "--model_id", str(tmp_path), "--data_path", str(DEMO_DATA), "--warmup_ratio", "1.5"])
    assert rc == 2
    assert "--warmup_ratio must be in [0, 1), got 1.5" in capsys.readouterr().err


# --- --config ---


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_values_are_used_and_the_command_line_wins(tmp_path):
    config = write(tmp_path / "run.yaml", "model_id: some/model\nlearning_rate: 0.1\nlora_enable: true\nlora_rank: 8\n"
                                          "num_train_epochs: 3\nlabel_names: [labels, extra]\n")
    model, data, tune, train = parse_args(SFT_GROUPS, ["--config", config, "--learning_rate", "0.5"])
    assert model.model_id == "some/model"
    assert train.learning_rate == 0.5
    assert (tune.lora_enable, tune.lora_rank, train.num_train_epochs) == (True, 8, 3)
    assert train.label_names == ["labels", "extra"]
    assert data.max_seq_length == 8192  # not in the file: the default

    # flags before --config win as well
    _, _, tune, _ = parse_args(SFT_GROUPS, ["--lora_rank", "4", "--config", config])
    assert tune.lora_rank == 4


def test_json_config(tmp_path):
    config = write(tmp_path / "run.json", '{"model_id": "m", "lora_alpha": 7, "lr_scheduler_kwargs": {"power": 2.0}}')
    model, _, tune, train = parse_args(SFT_GROUPS, ["--config", config])
    assert (model.model_id, tune.lora_alpha, train.lr_scheduler_kwargs) == ("m", 7, {"power": 2.0})


def test_config_unknown_key_is_named(tmp_path, capsys):
    config = write(tmp_path / "run.yaml", "model_id: m\nlearning_rte: 0.1\n")
    with pytest.raises(VlftError, match="unknown key") as info:
        parse_args(SFT_GROUPS, ["--config", config])
    assert "learning_rte" in str(info.value) and config in str(info.value)

    assert main(["sft", "--config", config]) == 2
    err = capsys.readouterr().err
    assert f"vlft sft: error: --config {config}: unknown key(s) learning_rte" in err


@pytest.mark.parametrize("text, words", [
    ("- a\n- b\n", "expected a mapping"),
    ("model_id: [unclosed\n", "not valid YAML"),
])
def test_config_that_is_not_a_mapping(tmp_path, text, words):
    config = write(tmp_path / "run.yaml", text)
    with pytest.raises(VlftError, match=words):
        parse_args(SFT_GROUPS, ["--config", config])


def test_config_file_missing_or_not_given(tmp_path):
    with pytest.raises(VlftError, match="file not found"):
        parse_args(SFT_GROUPS, ["--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(VlftError, match="--config needs a file path"):
        parse_args(SFT_GROUPS, ["--config"])
