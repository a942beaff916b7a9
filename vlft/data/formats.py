"""Reading LLaVA data files: a JSON list of records, or JSONL with one record per line."""
from __future__ import annotations

import json
from pathlib import Path

from vlft.errors import DataError, Problem, VlftError

# A file is read whole before any record is checked: --skip_bad_samples skips invalid records, not unreadable text.
_UNREADABLE = "Fix the file: --skip_bad_samples skips invalid records, not a file that cannot be read."
_SHAPE_HINT = 'write the records as a JSON list [{"conversations": [...]}, ...] or as JSONL, one record per line'


def load_records(path: str | Path) -> list:
    """Return the raw records of one data file; every syntax error is reported, not only the first."""
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


def _json_problem(file: Path, index: int | None, e: json.JSONDecodeError, lineno: int, hint: str) -> Problem:
    message = f"invalid JSON at line {lineno}, column {e.colno}: {e.msg}"
    return Problem(file=str(file), index=index, field="", message=message, hint=hint)


def _load_json_list(text: str, path: Path) -> list:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = "fix the syntax there (a missing comma, quote or bracket is the usual cause)"
        raise DataError([_json_problem(path, None, e, e.lineno, hint)], header=f"{path} is not valid JSON:",
                        advice=_UNREADABLE) from e


def _load_jsonl(text: str, path: Path) -> list:
    lines = text.splitlines()
    if sum(1 for line in lines if line.strip()) > 1:
        # A pretty-printed object spanning several lines is one document, not JSONL; naming its real shape
        # beats reporting every one of its lines as broken.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            _raise_wrong_shape(path, whole)

    records, problems = [], []
    hint = "each line must hold one complete JSON object; a record must not span several lines"
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # the line number in the file, not within the line, so an editor can jump to it
            problems.append(_json_problem(path, len(records) + len(problems), e, lineno, hint))
            continue
        records.append(record)
    if problems:
        raise DataError(problems, header=f"{len(problems)} line(s) of {path} are not valid JSON:", advice=_UNREADABLE)
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
