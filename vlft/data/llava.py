"""LLaVA record -> chat-template messages. Pure: no file or image I/O, so it can check a whole file up front."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vlft.constants import IMAGE_TAG, RESERVED_STRINGS, ROLE_MAP, VIDEO_TAG
from vlft.errors import Problem

Report = Callable[[str, str, str], None]  # (field, message, hint)
TAGS = {"image": IMAGE_TAG, "video": VIDEO_TAG}  # record key -> its placeholder in human turns
_TAG_SPLIT = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")


@dataclass
class Sample:
    index: int  # position in the data file
    id: str | None  # record["id"] as str when present
    messages: list[dict]  # chat-template messages; user content: list of {"type": "image" | "video" | "text"}
    images: list[str]  # image paths exactly as written in the record, in tag order
    # videos in tag order: a file or a folder of frames (str), or a list of frame image paths
    videos: list[str | list[str]] = field(default_factory=list)


def parse_record(record: object, index: int, file: str, *, require_answer: bool = True) -> tuple[Sample | None, list[Problem]]:
    """Convert one LLaVA record; on any defect return (None, every problem found in the record).
    `require_answer=False` (prediction) accepts a conversation that ends with a human turn."""
    if not isinstance(record, dict):
        problem = Problem(file, index, "", f"the record is a {type(record).__name__}, not an object",
                          'write each record as {"image": ..., "conversations": [...]}')
        return None, [problem]

    record_id = None if record.get("id") is None else str(record["id"])
    problems: list[Problem] = []

    def report(field: str, message: str, hint: str) -> None:
        problems.append(Problem(file, index, field, message, hint, record_id))

    media = {key: check_media(record.get(key), key, report) for key in TAGS}
    turns = _check_turns(record.get("conversations"), report)
    if turns is not None:
        _check_order([role for role, _ in turns], report, require_answer)

    for key, tag in TAGS.items():
        if turns is not None and media[key] is not None:
            n_tags = sum(value.count(tag) for role, value in turns if role == "user")
            if n_tags != len(media[key]):
                report(key, f"{n_tags} {tag} tag(s) in the human turns but {len(media[key])} {key} path(s)",
                       f"add or remove {tag} tags in the human turns, or paths in '{key}', "
                       f"so that each {key} has exactly one tag")

    if problems:
        return None, problems
    messages = [
        {"role": role, "content": _user_content(value) if role == "user" else value} for role, value in turns
    ]
    return Sample(index=index, id=record_id, messages=messages, images=media["image"], videos=media["video"]), []


def check_media(value: object, key: str, report: Report, kind: str | None = None) -> list | None:
    """The image paths (kind 'image') or videos (kind 'video': a file or frame folder, or a list of frame
    paths) of the record's field `key` (kind defaults to the key), or None when the field is unusable (already
    reported)."""
    kind = kind or key
    if kind == "image":
        hint = f"give one path as a string or several as a list of strings, or leave '{key}' out"
    else:
        hint = ("give one video (a file or a folder of frames) as a string, several as a list, and a video given "
                f"as frame images as a list of paths inside that list; or leave '{key}' out")
    if value is None:
        return []
    if isinstance(value, str):
        if value.strip():
            return [value]
        report(key, f"the {key} path is empty", hint)
        return None
    if not isinstance(value, list):
        report(key, f"'{key}' is a {type(value).__name__}", hint)
        return None
    if not value:
        report(key, f"'{key}' is an empty list", hint)
        return None
    ok = True
    for k, path in enumerate(value):
        frames = kind == "video" and isinstance(path, list)
        if frames and path and all(isinstance(f, str) and f.strip() for f in path):
            continue
        if not frames and isinstance(path, str) and path.strip():
            continue
        expected = "a non-empty list of frame paths" if frames else "a non-empty path string"
        report(f"{key}[{k}]", f"expected {expected}, got {path!r}", hint)
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
        check_text(text, role, f"{where}.value", report)
        turns.append((role, text))
    return turns if ok else None


def check_text(text: str, role: str | None, field: str, report: Report) -> None:
    reserved = [s for s in RESERVED_STRINGS if s in text]
    if reserved:
        report(field, f"contains {', '.join(reserved)}, which the tokenizer would read as chat structure",
               "remove these strings from the text or spell them differently")
    for key, tag in TAGS.items():
        if tag in text and role in ("system", "assistant"):
            speaker = "system" if role == "system" else "gpt"
            report(field, f"{tag} in a {speaker} turn; {key}s can only be given in human turns",
                   f"move the {tag} tag into a human turn")


def _check_order(roles: list[str], report: Report, require_answer: bool = True) -> None:
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
    if body[-1] == "user" and require_answer:
        report(f"conversations[{len(roles) - 1}]",
               "the conversation ends with a human turn, which has no answer to learn",
               "add the gpt answer or drop the last human turn")


def _user_content(text: str) -> list[dict]:
    content: list[dict] = []
    after_tag = False
    for piece in _TAG_SPLIT.split(text):
        if piece == IMAGE_TAG or piece == VIDEO_TAG:
            content.append({"type": "image" if piece == IMAGE_TAG else "video"})
            after_tag = True
            continue
        if after_tag:
            # LLaVA writes "<image>\nQuestion"; that newline only separates the tag from the text
            piece = piece.removeprefix("\n")
        after_tag = False
        if piece:
            content.append({"type": "text", "text": piece})
    return content
