"""`vlft check-data` on a thinking model's data (tiny Qwen3.5, TRL's qwen3_5_think template): how many records train
on reasoning and how many on answers without it, how many history turns' reasoning the template drops and how to keep
it, the warning when most records lack reasoning (and not at half), one line for a template without reasoning, and
records the template would rewrite named by file, record and field before any model loads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

import vlft.models.loading
from vlft.check import KEEP_REASONING_SHARE, PLAIN_WARN_SHARE
from vlft.cli import main


def turn(speaker: str, value: str, **extra) -> dict:
    return {"from": speaker, "value": value, **extra}


# reasoning inline and as a field, plain answers, and two conversations whose first answer's reasoning Qwen3.5's
# template drops (it is before the last user message): "multi" still trains reasoning on its last answer,
# "history_only" does not. 3 records with trained reasoning, 3 without, 2 dropped turns in 2 records.
MIX = [
    {"id": "inline", "conversations": [turn("human", "2+2?"), turn("gpt", "<think>\nadd them\n</think>\n\n4")]},
    {"id": "field", "conversations": [turn("human", "3+3?"), turn("gpt", "6", reasoning_content="add them")]},
    {"id": "plain", "conversations": [turn("human", "Hi"), turn("gpt", "Hello.")]},
    {"id": "plain2", "conversations": [turn("human", "Bye"), turn("gpt", "Goodbye.")]},
    {"id": "multi", "conversations": [turn("human", "1+1?"), turn("gpt", "<think>one and one</think>2"),
                                      turn("human", "and 2+2?"), turn("gpt", "4", reasoning_content="two twice")]},
    {"id": "history_only", "conversations": [turn("human", "5+5?"), turn("gpt", "10", reasoning_content="fives"),
                                             turn("human", "Thanks"), turn("gpt", "You are welcome.")]},
]
PLAIN = {"id": "plain3", "conversations": [turn("human", "Why?"), turn("gpt", "Because.")]}


def write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """check-data reads the processor and config only: loading the model is a failure."""
    fail = lambda *a, **k: pytest.fail("the model was loaded")  # noqa: E731
    monkeypatch.setattr(vlft.models.loading, "load_model", fail)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fail)


@pytest.fixture
def check_data(capsys, no_model_load):
    """Run `vlft check-data` in-process; returns (exit code, stderr)."""

    def run(model, path, *extra):
        capsys.readouterr()
        rc = main(["check-data", "--model_id", str(model), "--data_path", str(path), *extra])
        return rc, capsys.readouterr().err

    return run


@pytest.fixture(scope="module")
def qwen3_5(tiny_model_factory) -> Path:
    return tiny_model_factory("qwen3_5")


def test_counts_on_a_thinking_model(tmp_path, qwen3_5, check_data):
    rc, err = check_data(qwen3_5, write(tmp_path / "mix.json", MIX))
    assert rc == 0, err
    assert "sft data: 6 of 6 records usable" in err
    assert "reasoning (thinking chat template): 3 of 6 records train on reasoning in their answers, 3 on answers " \
           "without reasoning" in err
    assert "leaves out the reasoning of 2 turn(s) in 2 records (answers before the last user message)" in err
    # the template has no preserve_thinking switch: the fix names one that has it, and the other way out
    assert "TRL's qwen3_6) and pass --preserve_thinking true" in err and "split each conversation" in err
    assert "warning" not in err  # exactly half without reasoning: not "mostly"


def test_warning_when_most_records_lack_reasoning(tmp_path, qwen3_5, check_data):
    assert PLAIN_WARN_SHARE == 0.5 and KEEP_REASONING_SHARE == 0.75
    rc, err = check_data(qwen3_5, write(tmp_path / "mostly_plain.json", [*MIX, PLAIN]))
    assert rc == 0, err
    assert "3 of 7 records train on reasoning in their answers, 4 on answers without reasoning" in err
    [warning] = [line for line in err.splitlines() if "warning:" in line]
    assert "4 of 7 records (57%) train this thinking model on answers without reasoning" in warning
    assert "learns to answer without its think block and loses its reasoning" in warning
    assert "Unsloth" in warning and "about 75% of the examples with reasoning" in warning


def test_no_warning_when_most_records_carry_reasoning(tmp_path, qwen3_5, check_data):
    reasoned = [{**MIX[1], "id": f"r{i}"} for i in range(3)]
    rc, err = check_data(qwen3_5, write(tmp_path / "mostly_reasoning.json", [*MIX, *reasoned]))
    assert rc == 0, err
    assert "6 of 9 records train on reasoning in their answers, 3 on answers without reasoning" in err
    assert "warning:" not in err  # (the temporary folder's name holds "warning")


def test_preserve_thinking_keeps_the_history_reasoning(tmp_path, check_data):
    from vlft.models.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-qwen3_6", "qwen3_5", chat_template="qwen3_6")
    path = write(tmp_path / "mix.json", MIX)
    rc, err = check_data(model, path)
    assert rc == 0, err
    assert "3 of 6 records train on reasoning" in err
    assert "2 turn(s) in 2 records" in err and "pass --preserve_thinking true (this chat template has that switch)" in err
    rc, err = check_data(model, path, "--preserve_thinking", "true")
    assert rc == 0, err
    # history_only's first answer now trains its reasoning; nothing is dropped
    assert "4 of 6 records train on reasoning in their answers, 2 on answers without reasoning" in err
    assert "leaves out" not in err and "warning" not in err


def test_template_without_reasoning_says_one_line(tmp_path, tiny_model_dir, check_data):
    rc, err = check_data(tiny_model_dir, write(tmp_path / "mix.json", MIX))
    assert rc == 0, err
    [line] = [line for line in err.splitlines() if "reasoning" in line]
    assert "reasoning: 4 of 6 records carry reasoning" in line and "trains as answer text" in line
    assert "warning" not in err
    rc, err = check_data(tiny_model_dir, write(tmp_path / "plain.json", [MIX[2], MIX[3]]))
    assert rc == 0, err
    assert "reasoning" not in err and "think" not in err


def test_text_before_think_is_named(tmp_path, qwen3_5, check_data):
    bad = {"id": "before", "conversations": [turn("human", "2+2?"), turn("gpt", "Sure. <think>add</think>4")]}
    path = write(tmp_path / "bad.json", [MIX[0], bad])
    rc, err = check_data(qwen3_5, path)
    assert rc == 2
    assert f"{path}: record 1 (id 'before'), field 'conversations[1].value': text before <think>" in err
    assert "start the answer with <think>" in err and "Traceback" not in err


def test_an_answer_the_template_drops_is_named(tmp_path, qwen3_5, check_data):
    """A chat template that leaves out earlier answers (Qwen3.5's, edited to write only the header of an answer
    before the last user message): the record is named by the turn the template drops, before the model loads."""
    model = tmp_path / "drops-history"
    shutil.copytree(qwen3_5, model)
    template = (model / "chat_template.jinja").read_text()
    keep = "{{- '<|im_start|>' + message.role + '\\n' + content }}"
    assert template.count(keep) == 1
    (model / "chat_template.jinja").write_text(template.replace(keep, "{{- '<|im_start|>' + message.role + '\\n' }}"))
    path = write(tmp_path / "mix.json", MIX)
    rc, err = check_data(model, path)
    assert rc == 2
    for index, record_id in ((4, "multi"), (5, "history_only")):
        assert f"{path}: record {index} (id '{record_id}'), field 'conversations[1].value': the chat template " \
               "rendered 1 of 2 assistant messages; it drops this one" in err
    assert "record 0 " not in err and "Traceback" not in err
