"""vlft/stages.py: every row's references import and have the signatures the tools call, and the tools (cli,
check-data, preview) take their stage knowledge from the table alone -- a stage added to it is a command, a
check-data stage and a preview stage without editing any of them."""
from __future__ import annotations

import importlib
import inspect
import json

import pytest
from conftest import DEMO_DATA, DEMO_IMAGES

from vlft.data.prepare import RecordFormat
from vlft.stages import STAGES, TRAINING_STAGES, Stage
from vlft.train.core.arguments import VlftArgumentsMixin

PARAMETERS = {  # reference field -> parameters the tools pass by name (after the positional ones)
    "record_format": ["max_seq_length", "options"],
    "dataset": ["prepared", "processor", "media", "max_length", "thinking"],
    "collator": ["processor", "model", "family", "distributed"],
    "preview_parts": ["item", "encoder", "sample", "specs"],
}


@pytest.mark.parametrize("name", list(STAGES))
def test_every_reference_imports_with_the_signature_the_tools_call(name):
    stage = STAGES[name]
    assert stage.name == name
    for field, expected in PARAMETERS.items():
        target = stage.load(field)
        params = list(inspect.signature(target).parameters)
        assert params[:len(expected)] == expected, (name, field, params)
    assert isinstance(stage.record_format_for(4096, None), RecordFormat)
    if stage.config:
        module = importlib.import_module(stage.entry)
        assert callable(module.main)
        config = stage.load("config")
        assert issubclass(config, VlftArgumentsMixin)
        assert config.__module__ == f"vlft.train.{name}.config"  # each stage's config lives beside its stage
        assert config.stage_key == name  # a family refuses the stage by this name (Family.unsupported)
        groups = importlib.import_module(config.__module__).GROUPS
        assert groups[-1] is config


def test_training_stages_are_commands_with_their_config_flags():
    from vlft.cli import commands, flag_groups, model_flags

    table = commands()
    for name in TRAINING_STAGES:
        assert table[name] == (STAGES[name].entry, STAGES[name].help)
        assert flag_groups()[name][-1] == STAGES[name].config
        assert model_flags(name) == ("--model_id",)
    assert "predict" in table and table["predict"][0] == "vlft.predict"  # the tool, not the record layout's row


def test_a_stage_added_to_the_table_reaches_every_tool(monkeypatch, tiny_model_dir, tmp_path, capsys):
    """A row named `echo` (SFT's references, its own entry module and config) is at once a `vlft echo` command with
    its config's flags checked early, a `vlft check-data --stage echo` and a `vlft preview --stage echo`."""
    import sys
    import types

    import vlft.cli as cli
    from vlft.check import main as check_main
    from vlft.preview import main as preview_main

    calls = []
    entry = types.ModuleType("vlft_echo_stage")
    entry.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "vlft_echo_stage", entry)
    sft = STAGES["sft"]
    echo = Stage("echo", "echo the flags", records="conversations", record_format=sft.record_format,
                 dataset=sft.dataset, collator=sft.collator, preview_parts=sft.preview_parts,
                 entry="vlft_echo_stage", config="vlft.train.sft.config:SFTConfig", reports_reasoning=True)
    monkeypatch.setitem(STAGES, "echo", echo)

    assert cli.main(["echo", "--learning_rate", "1e-5"]) == 0 and calls == [["--learning_rate", "1e-5"]]
    assert cli.main(["echo", "--lerning_rate", "1"]) == 2
    assert "did you mean --learning_rate" in capsys.readouterr().err

    data, folder = str(DEMO_DATA), str(DEMO_IMAGES)
    assert check_main(["--stage", "echo", "--model_id", str(tiny_model_dir), "--data_path", data,
                       "--image_folder", folder]) == 0
    out = tmp_path / "p.html"
    assert preview_main(["--stage", "echo", "--model_id", str(tiny_model_dir), "--data_path", data,
                         "--image_folder", folder, "--num_records", "2", "--output", str(out)]) == 0
    page = out.read_text()
    assert "stage <code>echo</code>" in page and page.count('class="tokens part-conversation"') == 2
    assert len(json.loads(DEMO_DATA.read_text())) > 2  # so that --num_records 2 chose
