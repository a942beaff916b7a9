"""Reading LLaVA data files: a JSON list of records, or JSONL with one record per line.

Record numbers: a JSON list's records are numbered from 0 in list order; a JSONL file's from 0 over its non-empty
lines (blank lines are not records), so record i is the (i+1)-th non-empty line. In JSONL a line that is not valid
JSON is a bad record like any other: it keeps its number (a `BadLine` in its place), is reported with the other
records' problems and skipped by --skip_bad_samples. A JSON list with a syntax error cannot be cut into records:
the file is refused whole, as is a JSONL file of which no line is valid JSON (not JSONL at all).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlft.errors import DataError, Problem, VlftError

# A JSON list is read whole before any record is checked: --skip_bad_samples skips invalid records (a JSONL line that
# is not valid JSON among them), not a file that cannot be cut into records.
_UNREADABLE = "Fix the file: --skip_bad_samples skips invalid records, not a file that cannot be read."
_SHAPE_HINT = 'write the records as a JSON list [{"conversations": [...]}, ...] or as JSONL, one record per line'
_LINE_HINT = "each line must hold one complete JSON object; a record must not span several lines"
# said in every bad line's message, so that "record 3" next to "line 5" does not read as a contradiction
_NUMBERING = "records are numbered from 0 over the file's non-empty lines"


@dataclass(frozen=True)
class BadLine:
    """The place of a JSONL line that is not valid JSON in the list `load_records` returns: a bad record, whose
    `problem` names the file, the record index, the line and column, and what to do. Not a dict, so the format
    detection of data/convert.py passes it on untouched; data/prepare.py reports it with the other records'
    problems (and --skip_bad_samples skips it)."""

    problem: Problem
    line: int  # 1-based line number in the file, as an editor counts lines


def load_records(path: str | Path) -> list:
    """Return the raw records of one data file, in file order.

    JSONL: one entry per non-empty line; a line that is not valid JSON is a `BadLine` in its place (see the module
    docstring for the numbering). Raises VlftError for a missing, empty or non-UTF-8 file, DataError for a JSON list
    with a syntax error, a JSONL file of which no line is valid JSON (every line listed), or a file of the wrong
    shape (one object instead of a list of records)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise VlftError(f"data file {path} {what}; check --data_path")
    try:
        # utf-8-sig: editors on Windows often prepend a BOM, which json rejects
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise VlftError(f"data file {path} is not UTF-8 text ({e}); save it as UTF-8") from e
    stripped = text.lstrip()
    if not stripped:
        raise VlftError(f"data file {path} is empty; check --data_path")

    if stripped[0] == "[":
        records = _load_json_list(text, path)
    else:
        records = _load_jsonl(text, path)
    if not records:
        raise VlftError(f"data file {path} holds no records; check --data_path")
    return records


def _json_problem(file: Path, index: int | None, e: json.JSONDecodeError, lineno: int, hint: str,
                  note: str = "") -> Problem:
    message = f"invalid JSON at line {lineno}, column {e.colno}: {e.msg}" + (f" ({note})" if note else "")
    return Problem(file=str(file), index=index, field="", message=message, hint=hint)


def _load_json_list(text: str, path: Path) -> list:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = "fix the syntax there (a missing comma, quote or bracket is the usual cause)"
        raise DataError([_json_problem(path, None, e, e.lineno, hint)], header=f"{path} is not valid JSON:",
                        advice=_UNREADABLE) from e


def _load_jsonl(text: str, path: Path) -> list:
    # Lines end at "\n" only, as editors count them: str.splitlines would also cut at U+2028, U+0085 and other
    # characters JSON allows unescaped inside a string, breaking a valid record in two. A "\r" left by Windows line
    # ends is JSON whitespace.
    lines = text.split("\n")
    if sum(1 for line in lines if line.strip()) > 1:
        # A pretty-printed object spanning several lines is one document, not JSONL; naming its real shape
        # beats reporting every one of its lines as broken.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            _raise_wrong_shape(path, whole)

    records: list = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            # the line number in the file, not within the line, so an editor can jump to it
            records.append(BadLine(_json_problem(path, len(records), e, lineno, _LINE_HINT, _NUMBERING), lineno))
    bad = [r.problem for r in records if isinstance(r, BadLine)]
    if bad and len(bad) == len(records):  # no line is JSON: not a JSONL file with some bad records
        raise DataError(bad, header=f"no line of {path} is valid JSON ({len(bad)} non-empty line(s)); is it a JSON "
                        "list or JSONL file?", advice=_UNREADABLE)
    if len(records) == 1 and _is_container(records[0]):
        _raise_wrong_shape(path, records[0])
    return records


def _raise_wrong_shape(path: Path, value: object) -> None:
    kinds = {dict: "an object", str: "a string", int: "a number", float: "a number", bool: "true/false"}
    kind = kinds.get(type(value), "null")
    message = f"the top level is {kind}, but a data file holds a list of records"
    hint = _SHAPE_HINT
    if isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
        hint = "move the list of records to the top level, or " + hint
    raise DataError([Problem(str(path), None, "", message, hint)], header=f"{path} has the wrong shape:",
                    advice=_UNREADABLE)


def _is_container(value: object) -> bool:
    """A lone JSONL line that is not a record but a wrapper such as {"data": [...]}, or not an object at all."""
    if not isinstance(value, dict):
        return True
    keys = ("conversations", "messages")  # LLaVA/ShareGPT, OpenAI messages (data/convert.py)
    return not any(k in value for k in keys) and any(
        isinstance(v, list) and v and all(isinstance(r, dict) and any(k in r for k in keys) for r in v)
        for v in value.values()
    )
