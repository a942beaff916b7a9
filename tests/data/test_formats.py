import json

import pytest

from vlft.data.formats import BadLine, load_records
from vlft.errors import DataError, VlftError

RECORDS = [
    {"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]},
    {"id": 2, "conversations": [{"from": "human", "value": "Hello"}]},
]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.txt"])
def test_json_list_detected_by_content(tmp_path, name):
    path = write(tmp_path, name, "\n  " + json.dumps(RECORDS, indent=2))
    assert load_records(path) == RECORDS


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_jsonl_skips_blank_lines(tmp_path, name):
    text = "\n" + json.dumps(RECORDS[0]) + "\n\n   \n" + json.dumps(RECORDS[1]) + "\n"
    assert load_records(write(tmp_path, name, text)) == RECORDS


def test_single_line_jsonl(tmp_path):
    assert load_records(write(tmp_path, "one.jsonl", json.dumps(RECORDS[0]))) == RECORDS[:1]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    assert load_records(path) == RECORDS


def test_missing_file_names_path_and_flag(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(VlftError, match="--data_path") as info:
        load_records(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, DataError)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(VlftError, match="directory"):
        load_records(tmp_path)


@pytest.mark.parametrize("text", ["", "   \n\n", "[]", " [ ]\n"])
def test_empty_file_or_list(tmp_path, text):
    with pytest.raises(VlftError) as info:
        load_records(write(tmp_path, "empty.json", text))
    assert not isinstance(info.value, DataError)


def test_invalid_json_list_reports_position(tmp_path):
    path = write(tmp_path, "bad.json", '[\n  {"id": 1},\n  {"id": 2,}\n]')
    with pytest.raises(DataError) as info:
        load_records(path)
    (problem,) = info.value.problems
    assert problem.file == str(path)
    assert problem.index is None
    assert problem.field == ""
    assert problem.message.startswith("invalid JSON at line 3, column 12:")
    assert problem.hint


def test_jsonl_bad_lines_are_bad_records_in_place(tmp_path):
    """A JSONL line that is not valid JSON is a bad record: it keeps its place (a BadLine), the records after it keep
    their numbers (record i = the (i+1)-th non-empty line), and its message says the line and how records count.
    Before: the file was refused whole, naming only the bad lines."""
    lines = [json.dumps(RECORDS[0]), "", '{"id": 2', json.dumps(RECORDS[1]), "{oops}", ""]
    path = write(tmp_path, "bad.jsonl", "\n".join(lines))
    records = load_records(path)
    assert len(records) == 4
    assert records[0] == RECORDS[0] and records[2] == RECORDS[1]
    bad = [records[1], records[3]]
    assert all(isinstance(r, BadLine) for r in bad)
    assert [r.line for r in bad] == [3, 5]
    assert [r.problem.index for r in bad] == [1, 3]
    assert bad[0].problem.message.startswith("invalid JSON at line 3, column")
    assert bad[1].problem.message.startswith("invalid JSON at line 5, column 2:")
    assert all(r.problem.file == str(path) and r.problem.hint for r in bad)
    assert all("records are numbered from 0 over the file's non-empty lines" in r.problem.message for r in bad)
    assert str(bad[1].problem).startswith(f"{path}: record 3: invalid JSON at line 5, column 2:")


def test_jsonl_without_one_valid_line_is_refused_whole(tmp_path):
    """Not JSONL with a few bad records but no JSONL at all (a CSV, a pretty-printed object with a syntax error):
    every line is listed in one file-level error, which --skip_bad_samples cannot skip."""
    path = write(tmp_path, "bad.jsonl", "a,b\n\n1,2\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert [p.index for p in info.value.problems] == [0, 1]
    assert "no line of" in str(info.value) and "line 3" in str(info.value)
    assert str(info.value).endswith("not a file that cannot be read.")


def test_jsonl_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    """JSON allows U+2028 / U+0085 unescaped in strings; str.splitlines would cut such a record in two."""
    record = {"id": 1, "conversations": [{"from": "human", "value": "one\u2028two\x85three"}]}
    path = write(tmp_path, "sep.jsonl", json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(RECORDS[1]) + "\r\n")
    assert load_records(path) == [record, RECORDS[1]]


@pytest.mark.parametrize(
    "text, kind",
    [
        ('{"data": [{"conversations": []}]}', "an object"),
        ('{\n  "data": [\n    {"conversations": []}\n  ]\n}\n', "an object"),
        ("42", "a number"),
        ('"records.json"', "a string"),
        ("null", "null"),
    ],
)
def test_wrong_top_level_shape(tmp_path, text, kind):
    with pytest.raises(DataError) as info:
        load_records(write(tmp_path, "shape.json", text))
    (problem,) = info.value.problems
    assert kind in problem.message and "list of records" in problem.message
    assert "JSONL" in problem.hint


def test_object_with_a_list_inside_suggests_moving_it(tmp_path):
    with pytest.raises(DataError) as info:
        load_records(write(tmp_path, "shape.json", '{\n"data": []\n}'))
    assert "move the list of records to the top level" in info.value.problems[0].hint


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"value": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(VlftError, match="UTF-8"):
        load_records(path)


def test_lone_record_with_a_typo_stays_a_record(tmp_path):
    # a list of strings inside must not make a single JSONL record look like a wrapper of records
    record = {"image": ["a.png"], "conversation": []}
    assert load_records(write(tmp_path, "one.jsonl", json.dumps(record))) == [record]
