"""LLaVA record -> chat-template messages. Pure: no file or image I/O, so it can check a whole file up front."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vlft.constants import IMAGE_TAG, RESERVED_STRINGS, ROLE_MAP, VIDEO_TAG
from vlft.errors import Problem

_VIDEO_MESSAGE = "video records are not supported yet"
_VIDEO_HINT = "drop video records from this file, or describe the video in text"

Report = Callable[[str, str, str], None]  # (field, message, hint)


@dataclass
class Sample:
    index: int  # position in the data file
    id: str | None  # record["id"] as str when present
    messages: list[dict]  # chat-template messages; user content is a list of {"type": "image"} / {"type": "text"}
    images: list[str]  # image paths exactly as written in the record, in tag order


def parse_record(record: object, index: int, file: str) -> tuple[Sample | None, list[Problem]]:
    """Convert one LLaVA record; on any defect return (None, every problem found in the record)."""
    if not isinstance(record, dict):
        problem = Problem(file, index, "", f"the record is a {type(record).__name__}, not an object",
                          'write each record as {"image": ..., "conversations": [...]}')
        return None, [problem]

    record_id = None if record.get("id") is None else str(record["id"])
    problems: list[Problem] = []

    def report(field: str, message: str, hint: str) -> None:
        problems.append(Problem(file, index, field, message, hint, record_id))

    if record.get("video") is not None:
        report("video", _VIDEO_MESSAGE, _VIDEO_HINT)
    images = _check_images(record.get("image"), report)
    turns = _check_turns(record.get("conversations"), report)
    if turns is not None:
        _check_order([role for role, _ in turns], report)

    if turns is not None and images is not None:
        n_tags = sum(value.count(IMAGE_TAG) for role, value in turns if role == "user")
        if n_tags != len(images):
            report("image", f"{n_tags} {IMAGE_TAG} tag(s) in the human turns but {len(images)} image path(s)",
                   f"add or remove {IMAGE_TAG} tags in the human turns, or paths in 'image', "
                   "so that each image has exactly one tag")

    if problems:
        return None, problems
    messages = [
        {"role": role, "content": _user_content(value) if role == "user" else value} for role, value in turns
    ]
    return Sample(index=index, id=record_id, messages=messages, images=images), []


def _check_images(value: object, report: Report) -> list[str] | None:
    """The image paths, or None when the field is unusable (already reported)."""
    hint = "give one path as a string or several as a list of strings, or leave 'image' out for text-only records"
    if value is None:
        return []
    if isinstance(value, str):
        if value.strip():
            return [value]
        report("image", "the image path is empty", hint)
        return None
    if not isinstance(value, list):
        report("image", f"'image' is a {type(value).__name__}", hint)
        return None
    if not value:
        report("image", "'image' is an empty list", hint)
        return None
    ok = True
    for k, path in enumerate(value):
        if not isinstance(path, str) or not path.strip():
            report(f"image[{k}]", f"expected a non-empty path string, got {path!r}", hint)
            ok = False
    return value if ok else None


def _check_turns(value: object, report: Report) -> list[tuple[str, str]] | None:
    """(chat role, text) per turn, or None when any turn is unusable (already reported)."""
    if not isinstance(value, list) or not value:
        got = "missing" if value is None else ("an empty list" if value == [] else f"a {type(value).__name__}")
        report("conversations", f"'conversations' must be a non-empty list of turns, got {got}",
               'add "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]')
        return None

    turns, ok = [], True
    for i, turn in enumerate(value):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            report(where, f"a turn must be an object, got {type(turn).__name__}",
                   'write each turn as {"from": "human", "value": "..."}')
            ok = False
            continue
        speaker, text = turn.get("from"), turn.get("value")
        role = ROLE_MAP.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            message = f"unknown speaker {speaker!r}" if "from" in turn else "the turn has no 'from'"
            report(f"{where}.from", message, f"use one of {', '.join(ROLE_MAP)}")
            ok = False
        if not isinstance(text, str) or not text.strip():
            got = "empty text" if isinstance(text, str) else f"{text!r}"
            report(f"{where}.value", f"a turn needs non-empty text, got {got}",
                   "write the turn's text, or drop the turn")
            ok = False
            continue
        _check_text(text, role, f"{where}.value", report)
        turns.append((role, text))
    return turns if ok else None


def _check_text(text: str, role: str | None, field: str, report: Report) -> None:
    reserved = [s for s in RESERVED_STRINGS if s in text]
    if reserved:
        report(field, f"contains {', '.join(reserved)}, which the tokenizer would read as chat structure",
               "remove these strings from the text or spell them differently")
    if VIDEO_TAG in text:
        report(field, _VIDEO_MESSAGE, _VIDEO_HINT)
    if IMAGE_TAG in text and role in ("system", "assistant"):
        speaker = "system" if role == "system" else "gpt"
        report(field, f"{IMAGE_TAG} in a {speaker} turn; images can only be given in human turns",
               f"move the {IMAGE_TAG} tag into a human turn")


def _check_order(roles: list[str], report: Report) -> None:
    """System first if at all, then human, gpt, human, gpt, ... ending with gpt."""
    ok = True
    for i, role in enumerate(roles[1:], start=1):
        if role == "system":
            report(f"conversations[{i}].from", "a system turn is only allowed as the first turn",
                   "move it to the front or merge it into the first system turn")
            ok = False
    if not ok:
        return

    start = 1 if roles[0] == "system" else 0
    body = roles[start:]
    if not body:
        report("conversations", "there is only a system turn", "add a human turn and its gpt answer")
        return
    for j, role in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            # only the first break is reported: after a missing turn every later one would be off by one
            want, got = ("human", "gpt") if expected == "user" else ("gpt", "human")
            report(f"conversations[{start + j}].from", f"expected a {want} turn here, got {got}",
                   "turns must alternate human, gpt, human, gpt, ...; add the missing turn or merge the two")
            return
    if body[-1] == "user":
        report(f"conversations[{len(roles) - 1}]",
               "the conversation ends with a human turn, which has no answer to learn",
               "add the gpt answer or drop the last human turn")


def _user_content(text: str) -> list[dict]:
    content: list[dict] = []
    for k, part in enumerate(text.split(IMAGE_TAG)):
        if k > 0:
            content.append({"type": "image"})
            # LLaVA writes "<image>\nQuestion"; that newline only separates the tag from the text
            part = part.removeprefix("\n")
        if part:
            content.append({"type": "text", "text": part})
    return content
