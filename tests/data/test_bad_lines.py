"""Issue 24, items 4 and 5: in JSONL a line that is not valid JSON is a bad record, reported with the other records'
problems in one error and skipped by --skip_bad_samples; and what --skip_bad_samples may leave out is capped by
--max_bad_fraction, so a run does not train on 1 of 6 records without a louder word."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEMO_MEDIA
from PIL import Image

from vlft.cli import main
from vlft.config import DataArguments
from vlft.data.prepare import prepare_sft_data
from vlft.errors import DataError, VlftError


def turn(speaker, value):
    return {"from": speaker, "value": value}


def good(i):
    return {"id": f"good{i}", "image": "red.png", "conversations": [turn("human", "<image>\nWhat is it?"),
                                                                     turn("gpt", "Red.")]}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 24), (200, 30, 30)).save(folder / "red.png")
    return folder


def check(path, images, processor, **kw):
    return prepare_sft_data(str(path), processor=processor, image_folder=str(images), media=DEMO_MEDIA, workers=1,
                            max_seq_length=512, **kw)


def mixed_file(tmp_path) -> Path:
    """Six records on seven lines: a blank line, one line cut short (not JSON) and two invalid records."""
    lines = [
        json.dumps(good(0)),                                                      # line 1, record 0
        "",                                                                       # line 2, not a record
        json.dumps({"id": "bot", "conversations": [turn("human", "Hi"), turn("bot", "Hello")]}),  # line 3, record 1
        json.dumps(good(2))[:40],                                                 # line 4, record 2: cut short
        json.dumps(good(3)),                                                      # line 5, record 3
        json.dumps({**good(4), "id": "gone", "image": "nowhere.png"}),            # line 6, record 4: no such image
        json.dumps(good(5)),                                                      # line 7, record 5
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_one_bad_line_and_two_bad_records_in_one_error(tmp_path, images, processor):
    """Before: the bad line alone was reported ('1 line(s) ... are not valid JSON'), hiding the other two."""
    path = mixed_file(tmp_path)
    with pytest.raises(DataError) as info:
        check(path, images, processor)
    problems = info.value.problems
    assert [p.index for p in problems] == [1, 2, 4]
    assert problems[0].field == "conversations[1].from" and "bot" in problems[0].message
    assert problems[1].message.startswith("invalid JSON at line 4, column ")
    assert "records are numbered from 0 over the file's non-empty lines" in problems[1].message
    assert problems[2].field == "image[0]" and problems[2].record_id == "gone"  # line 6 = the 5th non-empty line
    text = str(info.value)
    assert text.startswith(f"3 problem(s) in {path}:")
    assert f"{path}: record 2: invalid JSON at line 4, column " in text
    assert "pass --skip_bad_samples true" in text  # the bad line is a record it can skip


def test_skip_bad_samples_skips_the_bad_line_too(tmp_path, images, processor, capsys):
    path = mixed_file(tmp_path)
    data = check(path, images, processor, skip_bad_samples=True)
    assert [s.id for s in data.samples] == ["good0", "good3", "good5"]
    assert [s.index for s in data.samples] == [0, 3, 5]  # the records after the bad line keep their numbers
    assert [p.index for p in data.skipped] == [1, 2, 4]
    assert data.summary().startswith("3 of 6 records usable; 3 problem(s) skipped")
    assert "skipped: " + str(data.skipped[1]) in capsys.readouterr().err
    # 3 of 6 is not more than half: the default limit lets it go
    assert len(check(path, images, processor, skip_bad_samples=True, max_bad_fraction=0.5).samples) == 3


def six_records(tmp_path, usable: int) -> Path:
    """`usable` good records, then 6 - `usable` records whose image does not exist."""
    records = [good(i) if i < usable else {**good(i), "id": f"gone{i}", "image": f"gone{i}.png"} for i in range(6)]
    path = tmp_path / f"usable{usable}.json"
    path.write_text(json.dumps(records))
    return path


def test_fraction_limit_stops_one_of_six_and_lets_five_of_six_go(tmp_path, images, processor):
    """Before: --skip_bad_samples trained on 1 of 6 records, the only word a 'skipped:' line per record."""
    with pytest.raises(DataError) as info:
        check(six_records(tmp_path, 1), images, processor, skip_bad_samples=True, max_bad_fraction=0.5)
    text = str(info.value)
    assert "--skip_bad_samples would leave out 5 of the 6 records" in text and "(83%)" in text
    assert "more than --max_bad_fraction 0.5 allows" in text
    assert [p.index for p in info.value.problems] == [1, 2, 3, 4, 5]  # why, record by record
    assert text.endswith("or pass --max_bad_fraction 0.84 (1 turns the limit off) to train on the 1 usable record(s).")
    # the value it names does let the run go on
    assert len(check(six_records(tmp_path, 1), images, processor, skip_bad_samples=True,
                     max_bad_fraction=0.84).samples) == 1
    assert [s.id for s in check(six_records(tmp_path, 5), images, processor, skip_bad_samples=True,
                                max_bad_fraction=0.5).samples] == [f"good{i}" for i in range(5)]


def test_fraction_limit_is_a_flag_with_a_default_that_stops_most_lost(tmp_path, images, processor):
    field = DataArguments.__dataclass_fields__["max_bad_fraction"]
    assert field.default == 0.5 and "--skip_bad_samples" in field.metadata["help"]
    with pytest.raises(VlftError, match=r"--max_bad_fraction 1\.5 must be between 0 and 1"):
        check(six_records(tmp_path, 5), images, processor, skip_bad_samples=True, max_bad_fraction=1.5)


STAGE_RECORDS = {  # one usable record of each stage's format, text only
    "sft": {"id": "ok", "conversations": [turn("human", "Hi"), turn("gpt", "Hello.")]},
    "dpo": {"id": "ok", "prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
    "grpo": {"id": "ok", "prompt": "Hi", "solution": "Hello."},
}


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_each_stage_applies_the_limit_before_the_model_loads(stage, tmp_path, tiny_model_dir, capsys,
                                                             stop_after_data):
    """The stages pass --max_bad_fraction (default 0.5): one good line and five cut short stop the run at the data
    check, naming the flag; with --max_bad_fraction 1 the same file passes the check."""
    path = tmp_path / "train.jsonl"
    line = json.dumps(STAGE_RECORDS[stage])
    path.write_text("\n".join([line] + [line[:-5]] * 5) + "\n")
    argv = [stage, "--model_id", str(tiny_model_dir), "--data_path", str(path), "--output_dir", str(tmp_path / "out"),
            "--skip_bad_samples", "true", "--report_to", "none"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--skip_bad_samples would leave out 5 of the 6 records" in err and "--max_bad_fraction 0.5" in err
    assert "stopped by the test" not in err and "Traceback" not in err

    assert main([*argv, "--max_bad_fraction", "1"]) == 2
    err = capsys.readouterr().err
    assert "1 of 6 records usable; 5 problem(s) skipped" in err and "stopped by the test after the data check" in err
