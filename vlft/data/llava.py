"""LLaVA record -> chat-template messages. Pure: no file or image I/O, so it can check a whole file up front.

A gpt turn may carry its reasoning (data/reasoning.py) inline, `"value": "<think>R</think>A"`, or in a field next to
the value, `"reasoning_content": "R"` (alias `reasoning`, vLLM's / OpenRouter's name). The inline form stays in the
message's content as written (a thinking template splits it by the rule `split_reasoning` checks; other templates
train it as text, as R1-style data expect); the field becomes the message's `reasoning_content`. Either is checked
here, so text a template would silently rewrite is refused before any model loads.

The system prompt is a leading `{"from": "system"}` turn, or a top-level `"system": "..."` string (LLaMA-Factory's
ShareGPT layout, and the `system` column of its other formats), which becomes that turn; a record giving both is
refused. Without either, the chat template's default system prompt is used (Qwen2-VL: "You are a helpful
assistant.")."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from vlft.constants import IMAGE_TAG, RESERVED_STRINGS, ROLE_MAP, VIDEO_TAG
from vlft.data.reasoning import REASONING_KEYS, THINK_CLOSE, THINK_OPEN, ReasoningError, split_reasoning
from vlft.errors import Problem

Report = Callable[[str, str, str], None]  # (field, message, hint)
TAGS = {"image": IMAGE_TAG, "video": VIDEO_TAG}  # record key -> its placeholder in human turns
_TAG_SPLIT = re.compile(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})")
SYSTEM_KEY = "system"
# the top-level keys parse_record reads; data preparation lists any other key of the records as unused
LLAVA_KEYS = frozenset({"id", "image", "video", "conversations", SYSTEM_KEY})


@dataclass
class Sample:
    index: int  # position in the data file
    id: str | None  # record["id"] as str when present
    # chat-template messages; user content: list of {"type": "image" | "video" | "text"}; an assistant message has
    # "reasoning_content" too when its turn gave the reasoning as a field
    messages: list[dict]
    images: list[str]  # image paths exactly as written in the record, in tag order
    # videos in tag order: a file or a folder of frames (str), or a list of frame image paths
    videos: list[str | list[str]] = field(default_factory=list)
    # messages[k] is the record's conversations[k - turn_offset]: 1 when the `system` key gave the system message
    turn_offset: int = 0


def parse_record(record: object, index: int, file: str, *, require_answer: bool = True) -> tuple[Sample | None, list[Problem]]:
    """Convert one LLaVA record; on any defect return (None, every problem found in the record).
    `require_answer=False` (prediction) accepts a conversation that ends with a human turn. A top-level `system`
    string becomes the leading system message (`system_prompt`)."""
    if not isinstance(record, dict):
        problem = Problem(file, index, "", f"the record is a {type(record).__name__}, not an object",
                          'write each record as {"image": ..., "conversations": [...]}')
        return None, [problem]

    record_id = None if record.get("id") is None else str(record["id"])
    problems: list[Problem] = []

    def report(field: str, message: str, hint: str) -> None:
        problems.append(Problem(file, index, field, message, hint, record_id))

    media = {key: check_media(record.get(key), key, report) for key in TAGS}
    system = system_prompt(record, report)
    turns = _check_turns(record.get("conversations"), report)
    if turns is not None:
        _check_order([role for role, _, _ in turns], report, require_answer)

    for key, tag in TAGS.items():
        if turns is not None and media[key] is not None:
            n_tags = sum(value.count(tag) for role, value, _ in turns if role == "user")
            if n_tags != len(media[key]):
                report(key, f"{n_tags} {tag} tag(s) in the human turns but {len(media[key])} {key} path(s)",
                       f"add or remove {tag} tags in the human turns, or paths in '{key}', "
                       f"so that each {key} has exactly one tag")

    if problems:
        return None, problems
    messages = [
        {"role": role, "content": _user_content(value) if role == "user" else value}
        | ({} if reasoning is None else {"reasoning_content": reasoning})
        for role, value, reasoning in turns
    ]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return Sample(index=index, id=record_id, messages=messages, images=media["image"], videos=media["video"],
                  turn_offset=int(system is not None)), []


def system_prompt(record: dict, report: Report) -> str | None:
    """The record's top-level `system` string (LLaMA-Factory's ShareGPT `system` column), or None when the key is
    absent or null (a parquet or arrow column is null in the rows that lack it). Reported, field `system`: a value
    that is not a string, an empty one, text the tokenizer would read as chat structure or with a media tag, and a
    record whose conversation starts with a system turn too (the prompt given twice)."""
    value = record.get(SYSTEM_KEY)
    if value is None:
        return None
    hint = ('write the system prompt as a string, "system": "You are ...", or leave the key out to use the chat '
            "template's default system prompt")
    if not isinstance(value, str):
        report(SYSTEM_KEY, f"'system' is a {type(value).__name__}, not a string", hint)
        return None
    if not value.strip():
        report(SYSTEM_KEY, "the system prompt is empty", hint)
        return None
    turns = record.get("conversations")
    first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
    speaker = first.get("from")
    if isinstance(speaker, str) and ROLE_MAP.get(speaker) == "system":
        report(SYSTEM_KEY, "the system prompt is given twice: in the 'system' key and as the conversation's first "
               "(system) turn", "keep one of them: drop the 'system' key, or the system turn")
        return None
    check_text(value, "system", SYSTEM_KEY, report)
    return value


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


def _check_turns(value: object, report: Report) -> list[tuple[str, str, str | None]] | None:
    """(chat role, text, reasoning field or None) per turn, or None when any turn is unusable (already reported)."""
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
            hint = "write the turn's text, or drop the turn"
            if given_reasoning(turn):  # the rule is the value's as written, reasoning field or not
                hint += "; an answer that is only reasoning is written inline: \"value\": \"<think>...</think>\""
            report(f"{where}.value", f"a turn needs non-empty text, got {got}", hint)
            ok = False
            continue
        check_text(text, role, f"{where}.value", report)
        if check_reasoning(text, turn, role, where, f"{where}.value", report) is None:
            ok = False
            continue
        reasoning = given_reasoning(turn)
        turns.append((role, text, next(iter(reasoning.values())) if reasoning else None))
    return turns if ok else None


def given_reasoning(holder: dict) -> dict[str, object]:
    """The reasoning fields (REASONING_KEYS) of a turn or answer object, key -> value as written, in key order.
    null and "" count as absent: exporters write them on answers without reasoning."""
    return {key: holder[key] for key in REASONING_KEYS if holder.get(key) is not None and holder.get(key) != ""}


def check_reasoning(text: str, holder: dict, role: str | None, where: str, value_field: str,
                    report: Report) -> tuple[str | None, str] | None:
    """The (reasoning, answer) pair a thinking chat template reads from a turn whose text is `text` (non-empty) and
    whose object `holder` may carry a reasoning field; None when something is wrong (reported: fields are
    `{where}.<key>` and `value_field`, the text's field). Reasoning is None when the turn gives none.

    Refused: a reasoning field on a non-gpt turn, one that is not a string or holds the think tags or reserved
    strings, `reasoning_content` and `reasoning` that differ, a field together with an inline `</think>` (reasoning
    given twice), inline text `split_reasoning` refuses (the Qwen3 / Qwen3.5 templates' rule would rewrite it), and a
    think block with no reasoning and no answer. An answer that is only reasoning (`<think>R</think>`) is allowed:
    reasoning-only answers exist, and the template renders the block and an empty answer."""
    given = given_reasoning(holder)
    problems = []

    def note(field: str, message: str, hint: str) -> None:
        problems.append(field)
        report(field, message, hint)

    if not given:
        if role != "assistant":
            return None, text
        try:
            reasoning, answer = split_reasoning(text)
        except ReasoningError as err:
            note(value_field, str(err), err.hint)
            return None
        if reasoning is not None and not reasoning.strip() and not answer.strip():
            note(value_field, "the answer is an empty think block with nothing after it",
                 "write the reasoning inside <think>...</think>, the answer after it, or both")
            return None
        return reasoning, answer
    key, value = next(iter(given.items()))
    field = f"{where}.{key}"
    if role is not None and role != "assistant":
        speaker = "human" if role == "user" else role
        report(field, f"'{key}' on a {speaker} turn; only gpt turns (answers) carry reasoning",
               "move the reasoning to the gpt turn that answers, or drop it")
        return None
    for k, v in given.items():
        if not isinstance(v, str):
            note(f"{where}.{k}", f"'{k}' is a {type(v).__name__}, not a string",
                 "give the reasoning as one string: the text of the think block, without the tags")
    if len(given) > 1 and all(isinstance(v, str) for v in given.values()) and len(set(given.values())) > 1:
        other = list(given)[1]
        note(f"{where}.{other}", f"'{key}' and '{other}' hold different reasoning",
             f"keep one of them ('{key}' is vlft's name; '{other}' is its alias)")
    if isinstance(value, str):
        inline = [t for t in (THINK_OPEN, THINK_CLOSE) if t in text]
        if inline:  # with the field, a tag in the answer would be trained as answer text
            note(field, f"reasoning given twice: in '{key}' and inline ({' and '.join(inline)} in the answer)",
                 f"keep one: the '{key}' field, or the inline <think>...</think> block")
        tags = [t for t in (THINK_OPEN, THINK_CLOSE) if t in value]
        if tags:
            note(field, f"'{key}' holds {' and '.join(tags)}; the chat template adds the think block itself",
                 "give the reasoning without the <think> / </think> tags")
        check_text(value, "assistant", field, note)
    if problems:
        return None
    return value, text


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
