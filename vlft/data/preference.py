"""Preference record -> prompt messages + chosen and rejected answers (the DPO stage's record format). Pure: no I/O.

Two layouts are read:

    {"image": "cat.png",                                            LLaVA: the prompt conversation (optional system
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}],   turn, history allowed, last turn human)
     "chosen": "A cat.",                       (or {"from": "gpt", "value": "A cat."})
     "rejected": "A dog."}

    {"image": "cat.png", "prompt": "<image>\\nWhat is it?",          2U1/Qwen2-VL-Finetune's flat form: one human
     "chosen": "A cat.", "rejected": "A dog."}                        turn as a string

Media keys are SFT's (`image`, `video`: one or a list), with one tag per item in the human turns; the chosen and
rejected answers share the prompt's media. A top-level `system` string is the prompt's system message in both
layouts, as in SFT (data/llava.py). Every problem names the record's field as the user wrote it.

Reasoning: an answer may carry it inline, `"chosen": "<think>R</think>A"`, or in its object form,
`{"from": "gpt", "value": "A", "reasoning_content": "R"}` (alias `reasoning`), with SFT's checks (data/llava.py
`check_reasoning`). Both give the same sample: `chosen` is the answer "A", `chosen_reasoning` the reasoning "R", and
`completions` the assistant messages with "reasoning_content".

Image-side pairs: `rejected_image` / `rejected_video` (one per `<image>` / `<video>` tag, in tag order) give the
rejected sequence other pictures in the same prompt text, e.g. a corrupted or unrelated image; what the record does
not replace stays the prompt's. `rejected` may then be left out: the rejected sequence repeats the chosen answer,
so the pair teaches which picture the answer belongs to (mDPO's conditional preference, arXiv 2406.11839):

    {"image": "cat.png", "rejected_image": "cat_cropped.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}], "chosen": "A cat."}
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from vlft.data import llava
from vlft.data.llava import LLAVA_KEYS, TAGS, Report, check_media, check_reasoning, check_text, parse_record
from vlft.errors import Problem

ANSWER_KEYS = ("chosen", "rejected")
REJECTED_MEDIA = {"rejected_image": "image", "rejected_video": "video"}  # record key -> the prompt media it replaces
# the top-level keys a preference record is read from (data preparation lists any other key as unused)
PREFERENCE_KEYS = LLAVA_KEYS | {"prompt", *ANSWER_KEYS, *REJECTED_MEDIA}
_ANSWER_HINT = 'give the answer as a string, or as {"from": "gpt", "value": "..."}'
Answer = tuple[str, str | None]  # (answer, reasoning or None), as the chat template reads them


@dataclass
class PreferenceSample:
    index: int  # position in the data file
    id: str | None
    messages: list[dict]  # the prompt as chat-template messages, ending with a user turn
    chosen: str  # the answers without their reasoning (an inline think block is split off)
    rejected: str
    images: list[str]  # image paths as written, in tag order (the chosen sequence's; the rejected one's too unless
    videos: list = field(default_factory=list)  # rejected_images / rejected_videos replace them)
    rejected_images: list[str] | None = None  # image-side pairs: the rejected sequence's images, else None
    rejected_videos: list | None = None
    chosen_reasoning: str | None = None  # the answers' reasoning, inline or from the field; None when none is given
    rejected_reasoning: str | None = None
    turn_offset: int = 0  # messages[k] is the record's conversations[k - turn_offset] (llava.Sample)

    @property
    def rejected_media(self) -> tuple[list, list] | None:
        """(images, videos) of the rejected sequence as written, or None when it shows the prompt's media."""
        if self.rejected_images is None and self.rejected_videos is None:
            return None
        return (self.images if self.rejected_images is None else self.rejected_images,
                self.videos if self.rejected_videos is None else self.rejected_videos)

    @property
    def completions(self) -> tuple[dict, dict]:
        """The chosen and the rejected answer as assistant chat messages: {"role": "assistant", "content": answer},
        plus "reasoning_content" when the answer gives reasoning."""
        return tuple({"role": "assistant", "content": answer} | ({} if reasoning is None else
                                                                  {"reasoning_content": reasoning})
                     for answer, reasoning in ((self.chosen, self.chosen_reasoning),
                                               (self.rejected, self.rejected_reasoning)))


def _answer(value: object, key: str, report: Report) -> Answer | None:
    """(answer, reasoning) of the record's `key` (a string, or a gpt turn object), or None (reported)."""
    holder, value_field = {}, key
    if isinstance(value, dict):
        speaker = value.get("from", "gpt")
        if speaker not in ("gpt", "assistant"):
            report(f"{key}.from", f"the answer's speaker is {speaker!r}", 'answers are gpt turns: "from": "gpt"')
            return None
        holder, value_field = value, f"{key}.value"
        value = value.get("value")
    if value is None:
        extra = " (or, for an image-side pair, rejected_image / rejected_video)" if key == "rejected" else ""
        report(key, f"'{key}' is missing", f"add the {key} answer{extra}; {_ANSWER_HINT}")
        return None
    if not isinstance(value, str):
        report(key, f"'{key}' is a {type(value).__name__}", _ANSWER_HINT)
        return None
    if not value.strip():
        report(key, f"the {key} answer is empty", f"write the {key} answer, or drop the record")
        return None
    check_text(value, "assistant", key, report)
    pair = check_reasoning(value, holder, "assistant", key, value_field, report)
    return None if pair is None else (pair[1], pair[0])


def parse_prompt(record: dict, index: int, file: str) -> tuple[llava.Sample | None, list[Problem], Report]:
    """The prompt of a record that carries its answers in other keys (preference pairs, KTO's labelled answers):
    its `conversations` (LLaVA, ending with a human turn) or its flat `prompt` (a string or a conversation), with
    media, parsed the SFT way. Returns (the prompt's sample or None, the problems so far -- under the field the
    user wrote --, a `report(field, message, hint)` that adds one more for this record)."""
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

    return sample, problems, report


def parse_preference_record(record: object, index: int, file: str) -> tuple[PreferenceSample | None, list[Problem]]:
    """Convert one preference record (either layout above); on any defect return (None, every problem found)."""
    if not isinstance(record, dict):
        return parse_record(record, index, file)  # reports the non-object record the SFT way
    sample, problems, report = parse_prompt(record, index, file)
    if "completion" in record and "label" in record and "chosen" not in record:  # a KTO record given to a pair stage
        report("completion", "this record is a single answer with a label (KTO's layout), not a pair",
               "train labelled answers with `vlft kto`; for a pair, give 'chosen' and 'rejected' answers to one prompt")
        return None, problems
    flat = "conversations" not in record and "prompt" in record  # the field to name
    for key in record:  # a misspelt rejected_* key would silently make an ordinary pair of an image-side one
        if isinstance(key, str) and key.startswith("rejected") and key not in ("rejected", *REJECTED_MEDIA):
            close = difflib.get_close_matches(key, ["rejected", *REJECTED_MEDIA], n=1, cutoff=0.6)
            report(key, f"unknown key '{key}'", f"did you mean '{close[0]}'? vlft reads 'rejected', 'rejected_image' "
                   "and 'rejected_video'" if close else "vlft reads 'rejected', 'rejected_image' and 'rejected_video'")
    given = [key for key in REJECTED_MEDIA if key in record]
    rejected_media = {}  # kind -> the rejected sequence's paths, where they differ from the prompt's
    media_reported = sample is None
    for key in given:
        kind = REJECTED_MEDIA[key]
        value = check_media(record[key], key, report, kind=kind)
        if value is None or sample is None:
            media_reported = True
            continue
        prompt_media = sample.images if kind == "image" else sample.videos
        if len(value) != len(prompt_media):
            report(key, f"{len(value)} {key} path(s) for the prompt's {len(prompt_media)} {TAGS[kind]} tag(s)",
                   f"give one {kind} per {TAGS[kind]} tag, in tag order: the rejected sequence shows it in that "
                   "tag's place")
            media_reported = True
        elif value != prompt_media:
            rejected_media[kind] = value
    # without 'rejected', an image-side pair repeats the chosen answer with the other picture
    same_answer = bool(given) and record.get("rejected") is None
    answers = {key: _answer(record.get(key), key, report) for key in (("chosen",) if same_answer else ANSWER_KEYS)}
    if same_answer:
        answers["rejected"] = answers["chosen"]
    # the same (answer, reasoning) pair, however written, is the same sequence
    if (answers["chosen"] is not None and answers["chosen"] == answers["rejected"] and not rejected_media
            and not (given and media_reported)):
        if given:
            report(given[0], f"'{given[0]}' is the prompt's own media and the rejected answer is the chosen one, so "
                   "the pair teaches nothing", "give the rejected sequence another picture, or a different answer")
        else:
            report("rejected", "the rejected answer is the same as the chosen one, so the pair teaches nothing",
                   "give two different answers, or drop the record")
    if sample is not None and sample.messages[-1]["role"] != "user":
        last = "prompt" if flat else f"conversations[{len(sample.messages) - 1 - sample.turn_offset}]"
        report(last, "the prompt ends with a gpt turn", "end the prompt with the human turn the answers reply to; "
               "the answers go in 'chosen' and 'rejected'")
    if problems or sample is None:
        return None, problems
    (chosen, chosen_reasoning), (rejected, rejected_reasoning) = answers["chosen"], answers["rejected"]
    return PreferenceSample(index, sample.id, sample.messages, chosen, rejected, sample.images, sample.videos,
                            rejected_media.get("image"), rejected_media.get("video"), chosen_reasoning,
                            rejected_reasoning, sample.turn_offset), []
