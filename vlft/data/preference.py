"""Preference record -> prompt messages + chosen and rejected answers (the DPO stage's record format). Pure: no I/O.

Two layouts are read:

    {"image": "cat.png",                                            LLaVA: the prompt conversation (optional system
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}],   turn, history allowed, last turn human)
     "chosen": "A cat.",                       (or {"from": "gpt", "value": "A cat."})
     "rejected": "A dog."}

    {"image": "cat.png", "prompt": "<image>\\nWhat is it?",          2U1/Qwen2-VL-Finetune's flat form: one human
     "chosen": "A cat.", "rejected": "A dog."}                        turn as a string

Media keys are SFT's (`image`, `video`: one or a list), with one tag per item in the human turns; the chosen and
rejected answers share the prompt's media. Every problem names the record's field as the user wrote it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vlft.data.llava import Report, check_text, parse_record
from vlft.errors import Problem

ANSWER_KEYS = ("chosen", "rejected")
_ANSWER_HINT = 'give the answer as a string, or as {"from": "gpt", "value": "..."}'


@dataclass
class PreferenceSample:
    index: int  # position in the data file
    id: str | None
    messages: list[dict]  # the prompt as chat-template messages, ending with a user turn
    chosen: str
    rejected: str
    images: list[str]  # image paths as written, in tag order (shared by both answers)
    videos: list = field(default_factory=list)

    @property
    def completions(self) -> tuple[str, str]:
        return self.chosen, self.rejected


def _answer(value: object, key: str, report: Report) -> str | None:
    if isinstance(value, dict):
        speaker = value.get("from", "gpt")
        if speaker not in ("gpt", "assistant"):
            report(f"{key}.from", f"the answer's speaker is {speaker!r}", 'answers are gpt turns: "from": "gpt"')
            return None
        value = value.get("value")
    if value is None:
        report(key, f"'{key}' is missing", f"add the {key} answer; {_ANSWER_HINT}")
        return None
    if not isinstance(value, str):
        report(key, f"'{key}' is a {type(value).__name__}", _ANSWER_HINT)
        return None
    if not value.strip():
        report(key, f"the {key} answer is empty", f"write the {key} answer, or drop the record")
        return None
    check_text(value, "assistant", key, report)
    return value


def parse_preference_record(record: object, index: int, file: str) -> tuple[PreferenceSample | None, list[Problem]]:
    """Convert one preference record (either layout above); on any defect return (None, every problem found)."""
    if not isinstance(record, dict):
        return parse_record(record, index, file)  # reports the non-object record the SFT way
    flat = "conversations" not in record and "prompt" in record
    as_llava = dict(record)
    if flat:
        prompt = record["prompt"]
        as_llava["conversations"] = [{"from": "human", "value": prompt}] if isinstance(prompt, str) else prompt
    sample, problems = parse_record(as_llava, index, file, require_answer=False)
    if flat:  # name the field the user wrote
        problems = [dataclasses.replace(p, field=p.field.replace("conversations[0].value", "prompt")
                                        .replace("conversations[0]", "prompt").replace("conversations", "prompt"))
                    for p in problems]
    record_id = None if record.get("id") is None else str(record["id"])

    def report(where: str, message: str, hint: str) -> None:
        problems.append(Problem(file, index, where, message, hint, record_id))

    answers = {key: _answer(record.get(key), key, report) for key in ANSWER_KEYS}
    if answers["chosen"] is not None and answers["chosen"] == answers["rejected"]:
        report("rejected", "the rejected answer is the same as the chosen one, so the pair teaches nothing",
               "give two different answers, or drop the record")
    for key in ("rejected_image", "rejected_video"):
        if key in record:
            report(key, f"'{key}' (a different picture for the rejected answer) is not supported yet",
                   "give both answers the prompt's media, or drop the record")
    if sample is not None and sample.messages[-1]["role"] != "user":
        last = "prompt" if flat else f"conversations[{len(sample.messages) - 1}]"
        report(last, "the prompt ends with a gpt turn", "end the prompt with the human turn the answers reply to; "
               "the answers go in 'chosen' and 'rejected'")
    if problems or sample is None:
        return None, problems
    return PreferenceSample(index, sample.id, sample.messages, answers["chosen"], answers["rejected"], sample.images,
                            sample.videos), []
