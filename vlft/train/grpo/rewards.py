"""Reward functions for GRPO (RL with verifiable rewards): the built-ins, loading user functions, and a pre-flight.

Convention: TRL 1.16's, so that any TRL reward function works unchanged and ours work in TRL. The trainer calls

    f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]

by keyword, with one list entry per completion: `prompts` and `completions` are strings (TRL's standard,
non-conversational format: vlft renders the prompt with the model's chat template itself, so `completions` holds the
generated text), `completion_ids` the generated token ids, and every other column of the record (`solution`, `bbox`,
`choices`, `id`, ...) arrives as a keyword argument holding one value per completion. TRL's GRPOTrainer also passes
`trainer_state`, `log_extra` and `log_metric`; `check_rewards` passes them too. A function must therefore take
`**kwargs`. `None` means "not applicable to this completion" (TRL turns it into NaN and leaves it out of the sum).

Two shapes, as TRL has two (trl/trainer/grpo_trainer.py, `_generate`): for a standard prompt TRL passes the prompt
and completion as strings (`TEXT`); for a conversational prompt - and a vision-language dataset is conversational in
TRL - the prompt as its message list and each completion as one assistant message, `[{"role": "assistant", "content":
text}]` (`CONVERSATIONAL`). TRL's own `think_format_reward`, `accuracy_reward` and `reasoning_accuracy_reward` read
`completion[0]["content"]`, so they need the second; most user functions are written for strings. The pre-flight
(`preflight_rewards`) finds each function's shape: it calls it with strings and, only when that raises, with TRL's
conversational shape; the one that works is used for the whole run (`RewardCheck.shapes`, logged with the table).
A function that works with strings keeps getting strings. The built-ins below take strings (they read the rendered
prompt to tell an opened think block) and also accept a conversational completion (the text of its last message).

Built-ins (`BUILTIN`, names as given to `--reward_funcs`): `format`, `think_format`, `accuracy`, `count`, `choice`,
`iou`, `overlong`, `repetition`. Each docstring states its rule and where the rule comes from.

Thinking models: a completion is `<think>R</think>A`, or `R</think>A` when the prompt already opened the block
(Qwen3.5's thinking generation prompt ends `<think>\\n`; told from the `prompts` argument, `prompt_opens_think`).
`accuracy`, `count`, `choice` and `iou` score the answer A alone (`split_completion`): a number inside the reasoning
earns nothing, and a completion whose reasoning never closes has an empty answer (0). Completions without think
tags score as they always did. `format` and `think_format` read a completion of an opened prompt as if it began
with `<think>`.

A trained reward model (`vlft rm`) is a reward too: `rm:PATH[@DEVICE]` (`RewardModelReward`, named `rm`) scores each
completion with the model at PATH, on its prompt's own images and videos encoded with that model's processor and
media settings (data/rm.py `CompletionRows`), in batches, under torch.no_grad, on DEVICE (cpu, cuda, cuda:1, ...) or
else the policy's device. It is a plain module beside the policy, never wrapped by DeepSpeed: each process scores its
own completions, with no collective (so nothing can hang under ZeRO-3). TRL's reward signature passes no pixels, so a
function that needs the prompt's media says so with `takes_prompt_media = True` and gets one more keyword,
`prompt_media`: a data/rm.py `PromptMedia` (messages, image paths, video sources) per completion.

`load_reward_funcs` turns `--reward_funcs` specs into functions; `check_rewards` calls every function once on real
records before training step 1, so that a missing column, a wrong return length or a NaN stops the run with a message
instead of surfacing as a crash (or a silent NaN advantage) hours later.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlft.data.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningError, prompt_opens_think, split_reasoning
from vlft.errors import VlftError

# ---------------------------------------------------------------------------------------------------------- helpers


def completion_text(completion: Any) -> str:
    """The generated text of one completion: a string as is; a conversational completion (list of message dicts, as
    TRL passes for conversational prompts) -> the text of its last message (text parts joined)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(completion)


def opens_think(prompt: Any) -> bool:
    """Whether a reward's prompt (TRL's `prompts` entry: the rendered prompt text) ends inside an open think block
    (`prompt_opens_think`); False for None or a conversational prompt (a list of messages holds no generation
    prompt)."""
    return isinstance(prompt, str) and prompt_opens_think(prompt)


TEXT = "text"  # prompts and completions as strings: TRL's standard format
CONVERSATIONAL = "conversational"  # prompts as message lists, completions as [assistant message]: TRL's chat format


def conversational_prompt(messages: list[dict]) -> list[dict]:
    """A prompt's messages in the form TRL's GRPOTrainer passes reward functions for a vision-language dataset
    (after `prepare_multimodal_messages`): every content a list of parts, a string content becoming one text part,
    media as `{"type": "image"}` / `{"type": "video"}` parts (vlft passes no pixels: the record's `images` and
    `videos` paths are in completions.jsonl). A new list (a function may change it freely)."""
    out = []
    for message in messages:
        content = message.get("content", "")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]
        out.append({**message, "content": parts})
    return out


def conversational_completion(text: str) -> list[dict]:
    """One completion as TRL passes it for a conversational prompt: a list holding one assistant message whose
    content is the decoded text (TRL's `[{"role": "assistant", "content": content}]`)."""
    return [{"role": "assistant", "content": text}]


def split_completion(completion: Any, prompt: Any = None) -> tuple[str | None, str]:
    """(reasoning, answer) of one completion, as the answer-scoring rewards read it; reasoning None when the
    completion has none (then the answer is the whole text, as for a model without thinking).

    The rule is `split_reasoning`'s (the Qwen3 / Qwen3.5 chat templates'), with `opened` from the prompt
    (`opens_think`): after an opened prompt, everything before `</think>` is reasoning and a completion without
    `</think>` is unfinished reasoning with an empty answer. Never raises: a completion that opens `<think>` and never
    closes it is unfinished reasoning too (empty answer); one the rule cannot read otherwise (two `</think>`, a
    second `<think>`, text before `<think>`) is answered by its whole text, scored as a completion without tags."""
    text = completion_text(completion)
    try:
        return split_reasoning(text, opened=opens_think(prompt))
    except ReasoningError:
        if THINK_CLOSE not in text:  # <think> without </think>: the reasoning did not end
            return text.strip("\n"), ""
        return None, text


def _answers(completions: list, kwargs: dict) -> list[str]:
    """The answer part (`split_completion`) of each completion, read against the `prompts` keyword (TRL passes it;
    absent, or not one per completion: read as not opened)."""
    prompts = kwargs.get("prompts")
    if not isinstance(prompts, (list, tuple)) or len(prompts) != len(completions):
        prompts = [None] * len(completions)
    return [split_completion(c, p)[1] for c, p in zip(completions, prompts)]


def _think_prefixed(completions: list, kwargs: dict) -> list[str]:
    """Each completion's text, with `<think>` put back in front where its prompt opened the block."""
    prompts = kwargs.get("prompts")
    if not isinstance(prompts, (list, tuple)) or len(prompts) != len(completions):
        prompts = [None] * len(completions)
    return [(THINK_OPEN if opens_think(p) else "") + completion_text(c) for c, p in zip(completions, prompts)]


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    r"""Content of the last `\boxed{...}` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: Any) -> str:
    r"""The answer part of a completion (or of a solution): the content of the last `<answer>...</answer>` if there is
    one, else the whole text; then, if it contains a `\boxed{...}`, the content of the last one. Stripped."""
    text = completion_text(text)
    found = _ANSWER_RE.findall(text)
    answer = found[-1] if found else text
    boxed = _last_boxed(answer)
    if boxed is not None:
        answer = boxed
    return answer.strip()


def normalize_text(text: str) -> str:
    """casefold, strip, collapse whitespace, drop trailing periods."""
    return " ".join(text.casefold().split()).rstrip(".").strip()


_DECIMAL_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][+-]?\d+)?")
_FRACTION_RE = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")


def parse_number(text: str) -> float | None:
    """A number written as the whole of `text`, else None.

    Accepted: integers and decimals with an optional sign ("3", "3.0", " -2.5 ", ".5"), scientific notation ("1e3"),
    thousands separators in correct groups of three ("1,000", "12,345.6"; "1,5" is not a number, it stays text), a
    trailing period ("3.") and simple fractions ("1/2"). Not accepted (compared as text): percentages, units, currency.
    """
    s = text.strip().rstrip(".").strip()
    if not s:
        return None
    if _DECIMAL_RE.fullmatch(s) and any(c.isdigit() for c in s):
        try:
            value = float(s.replace(",", ""))
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    m = _FRACTION_RE.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return int(m.group(1)) / int(m.group(2))
    return None


def _numbers_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


# a number not glued to a word ("bbox_2d", "x3" and "3rd" hold none)
_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")


def _column(kwargs: dict, name: str, n: int) -> list:
    """Column `name` as a list of n values (a missing column -> all None; a scalar -> repeated)."""
    value = kwargs.get(name)
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * n


# ------------------------------------------------------------------------------------------------------------ format

_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 if the completion is `<think>...</think>` followed by `<answer>...</answer>` and nothing else, else 0.0.

    Whitespace-tolerant: leading and trailing whitespace, and any whitespace (newlines) between the two blocks. Each
    tag appears exactly once; the reasoning may be empty, the answer must not be blank. Where the prompt (the
    `prompts` keyword) already opened the think block, the completion is read as if it began with `<think>`
    (`R</think><answer>A</answer>` earns 1.0; one that opens `<think>` again earns 0.0). Source: the format reward of
    DeepSeek-R1 (arXiv 2501.12948, section 2.2.2), in the form R1-V / VLM-R1 / Open-R1 use for
    `<think>...</think><answer>...</answer>`.
    """
    rewards = []
    for text in _think_prefixed(completions, kwargs):
        m = _FORMAT_RE.fullmatch(text)
        ok = m is not None and all(text.count(tag) == 1 for tag in _TAGS) and m.group(2).strip() != ""
        rewards.append(1.0 if ok else 0.0)
    return rewards


def think_format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 if the completion is one think block followed by anything, `<think>R</think>A`, else 0.0: it starts with
    `<think>` (no whitespace before it), holds no second `<think>`, and closes the block with `</think>`; the reasoning
    and the answer may be empty. Where the prompt (the `prompts` keyword) already opened the block, the completion
    is read as if it began with `<think>` (`R</think>A` earns 1.0). Source: TRL 1.16's
    `trl.rewards.think_format_reward` (trl/rewards/format_rewards.py, the regex `^<think>(?!.*<think>)(.*?)</think>.*$`
    with DOTALL), here on plain-string completions as vlft passes them (TRL's reads `completion[0]["content"]`)."""
    rewards = []
    for text in _think_prefixed(completions, kwargs):
        ok = text.startswith(THINK_OPEN) and THINK_OPEN not in text[len(THINK_OPEN):] and THINK_CLOSE in text
        rewards.append(1.0 if ok else 0.0)
    return rewards


# ---------------------------------------------------------------------------------------------------------- accuracy


def _math_verify():
    """math_verify's (parse, verify), or None when it is not installed (it is optional)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    return parse, verify


def answers_match(answer: str, gold: str, math_verify=None) -> bool:
    """The accuracy rule on two extracted answers: numbers (see `parse_number`) within 1e-6 (relative or absolute),
    else normalised text equal (`normalize_text`), else - when math_verify is installed - its `verify`."""
    a, g = parse_number(answer), parse_number(gold)
    if a is not None and g is not None:
        return _numbers_close(a, g)
    if normalize_text(answer) == normalize_text(gold):
        return True
    if math_verify is not None:
        parse, verify = math_verify
        # math_verify times out with signal.alarm, which works only on the main thread
        main = threading.current_thread() is threading.main_thread()
        try:
            gold_parsed = parse(gold, parsing_timeout=10 if main else None)
            if gold_parsed:
                answer_parsed = parse(answer, parsing_timeout=10 if main else None)
                return bool(verify(gold_parsed, answer_parsed, timeout_seconds=5 if main else None))
        except Exception:  # a parser failure is a wrong answer, not a crashed step
            return False
    return False


def accuracy_reward(completions: list, solution: list, **kwargs) -> list[float | None]:
    r"""1.0 if the completion's answer equals the `solution` column's, else 0.0; None where the solution is None/empty.

    The answer is `extract_answer` of each side (last `<answer>...</answer>`, else the whole text; then the last
    `\boxed{}` inside, if any). Equal means: both are numbers (`parse_number`: "3" == "3.0" == " 3 ", "1,000" == "1000",
    "1/2" == "0.5") within 1e-6 relative or absolute; or the texts are equal after casefold, whitespace collapse and
    trailing-period removal ("Paris." == "paris"); or, when the optional `math_verify` package is installed, its
    `verify` accepts them (LaTeX such as "\frac{1}{2}" == "0.5"). A thinking model's completion is scored on its
    answer after `</think>` (`split_completion`: the reasoning is left out; unfinished reasoning scores 0.0). Source:
    the rule-based accuracy reward of DeepSeek-R1 (arXiv 2501.12948) and R1-V / Open-R1 (math_verify first, exact
    match as the fallback).
    """
    mv = _math_verify()
    rewards: list[float | None] = []
    for completion, sol in zip(_answers(completions, kwargs), solution):
        if sol is None:
            rewards.append(None)
            continue
        gold = extract_answer(str(sol) if not isinstance(sol, str) else sol)
        if not gold:
            rewards.append(None)
            continue
        rewards.append(1.0 if answers_match(extract_answer(completion), gold, mv) else 0.0)
    return rewards


# ------------------------------------------------------------------------------------------------------------- count

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()
_COUNT_RE = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?![\w])|\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def first_count(text: str) -> int | None:
    """The first integer in `text`: digits ("3", "3.0") or a number word zero..twenty ("three"), whichever comes first;
    None if there is none or the first number is not whole ("2.5")."""
    m = _COUNT_RE.search(text)
    if m is None:
        return None
    if m.group(2):
        return NUMBER_WORDS.index(m.group(2).lower())
    value = float(m.group(1))
    return int(value) if value.is_integer() else None


def _gold_count(sol: Any) -> int | None:
    if sol is None or isinstance(sol, bool):
        return None
    if isinstance(sol, int):
        return sol
    if isinstance(sol, float):
        return int(sol) if sol.is_integer() else None
    text = extract_answer(str(sol))
    if text.lower() in NUMBER_WORDS:
        return NUMBER_WORDS.index(text.lower())
    value = parse_number(text)
    return int(value) if value is not None and value.is_integer() else None


def count_reward(completions: list, solution: list, **kwargs) -> list[float | None]:
    """Counting questions ("how many ...?"): 1.0 if the first integer of the answer (`first_count` of
    `extract_answer`: digits, or a number word zero..twenty) equals the `solution` column (an int, or a string holding
    one, e.g. "3" or "<answer>3</answer>"), else 0.0; None where the solution is not a whole number. A thinking
    model's completion is scored on its answer after `</think>` (`split_completion`). Source: the counting reward of
    R1-V (CLEVR counting) and VisualThinker-R1-Zero, an exact integer match on the answer.
    """
    rewards: list[float | None] = []
    for completion, sol in zip(_answers(completions, kwargs), solution):
        gold = _gold_count(sol)
        if gold is None:
            rewards.append(None)
            continue
        rewards.append(1.0 if first_count(extract_answer(completion)) == gold else 0.0)
    return rewards


# ------------------------------------------------------------------------------------------------------------ choice

_LETTER_ONLY_RE = re.compile(r"\(?\s*([A-Za-z])\s*\)?\s*[.:)]?")
_LETTER_PHRASE_RE = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is)?\s*:?\s*(?i:option\s*)?"
                               r"(?:\(([A-Za-z])\)|([A-Z])(?![\w']))")
_LETTER_LEAD_RE = re.compile(r"\(?([A-Za-z])[).:]\s")
_LETTER_ANY_RE = re.compile(r"(?<![\w'])\(?([A-Z])\)?(?![\w'])")


def choice_letter(text: str, choices: Any = None) -> str | None:
    """The option letter chosen in `text` (upper case), or None. In order: the whole text is a letter ("B", "(b)",
    "B.", "B)"); a phrase "answer is B" / "answer: (b)" / "the correct option is B" (a bare letter there must be a
    capital: "the answer is a cat" chooses nothing); a leading "B. ..." / "(B) ..."; when the record has a `choices`
    list, the option whose text the whole answer equals (normalised) -> its letter (A for the first); else the only
    stand-alone capital letter other than "I" (several -> ambiguous -> None)."""
    s = text.strip()
    m = _LETTER_ONLY_RE.fullmatch(s)
    if m:
        return m.group(1).upper()
    m = _LETTER_PHRASE_RE.search(s)
    if m:
        return (m.group(1) or m.group(2)).upper()
    m = _LETTER_LEAD_RE.match(s)
    if m:
        return m.group(1).upper()
    if isinstance(choices, (list, tuple)):
        wanted = normalize_text(s)
        for k, option in enumerate(choices[:26]):
            if normalize_text(str(option)) == wanted:
                return chr(ord("A") + k)
    letters = {x for x in _LETTER_ANY_RE.findall(s) if x != "I"}
    return letters.pop() if len(letters) == 1 else None


def choice_reward(completions: list, solution: list, **kwargs) -> list[float | None]:
    """Multiple choice: 1.0 if the letter chosen in the answer (`choice_letter` of `extract_answer`) equals the
    `solution` column's letter ("B", "(B)", "b", "<answer>B</answer>"), case-insensitively, else 0.0; None where the
    solution holds no letter. An optional `choices` column (the option texts, in letter order) lets an answer that
    repeats an option's text count as that letter. A thinking model's completion is scored on its answer after
    `</think>` (`split_completion`). Source: the multiple-choice accuracy of MMMU / MathVista-style evaluation
    (extract the letter, exact match) as used for RL rewards by VLM-R1 and R1-OneVision.
    """
    n = len(completions)
    choices_col = _column(kwargs, "choices", n)
    rewards: list[float | None] = []
    for completion, sol, choices in zip(_answers(completions, kwargs), solution, choices_col):
        gold = None if sol is None else choice_letter(extract_answer(str(sol)), choices)
        if gold is None:
            rewards.append(None)
            continue
        rewards.append(1.0 if choice_letter(extract_answer(completion), choices) == gold else 0.0)
    return rewards


# --------------------------------------------------------------------------------------------------------------- iou


def parse_box(value: Any) -> tuple[float, float, float, float] | None:
    """[x1, y1, x2, y2] from a list/tuple of 4 numbers, or the first 4 numbers of a string ("[10, 20, 30, 40]",
    '{"bbox_2d": [10, 20, 30, 40]}', "(10,20),(30,40)"); None if there are fewer than 4."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and isinstance(value[0], (list, tuple)):
            value = value[0]  # [[x1, y1, x2, y2]]
        if len(value) >= 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[:4]):
            return tuple(float(v) for v in value[:4])  # type: ignore[return-value]
        value = str(value)
    numbers = _NUMBER_RE.findall(str(value))
    if len(numbers) < 4:
        return None
    return tuple(float(v) for v in numbers[:4])  # type: ignore[return-value]


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes; a box with x2 <= x1 or y2 <= y1 has no area."""
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def iou_reward(completions: list, solution: list | None = None, bbox: list | None = None, **kwargs) -> list[float | None]:
    """Grounding: the IoU in [0, 1] between the box in the answer (the first 4 numbers of `extract_answer`, as
    x1, y1, x2, y2) and the record's box - the `bbox` column if the record has one, else `solution` (a list or a
    string, parsed the same way); 0.0 when the answer holds no box, None when the record holds none. Both boxes must
    be in the same coordinates (Qwen2-VL: 0-1000 relative; Qwen2.5-VL / Qwen3-VL: absolute pixels of the resized
    image). A thinking model's completion is scored on its answer after `</think>` (`split_completion`). Source: the
    IoU reward of VLM-R1 (arXiv 2504.07615) and Visual-RFT (arXiv 2503.01785).
    """
    if solution is None and bbox is None:
        raise TypeError("iou_reward() missing 1 required argument: 'bbox'; give the records a 'bbox' or a 'solution' column")
    n = len(completions)
    boxes = list(bbox) if bbox is not None else [None] * n
    sols = list(solution) if solution is not None else [None] * n
    rewards: list[float | None] = []
    for completion, box, sol in zip(_answers(completions, kwargs), boxes, sols):
        gold = parse_box(box) if box is not None else parse_box(extract_answer(sol) if isinstance(sol, str) else sol)
        if gold is None:
            rewards.append(None)
            continue
        predicted = parse_box(extract_answer(completion))
        rewards.append(0.0 if predicted is None else box_iou(predicted, gold))
    return rewards


# ---------------------------------------------------------------------------------------------------------- overlong

DEFAULT_MAX_COMPLETION_LENGTH = 512


def overlong_value(length: int, max_completion_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13): 0 up to max - buffer tokens, then
    linearly down to -1 at max, -1 beyond. buffer 0: 0 up to max, -1 beyond."""
    start = max_completion_length - buffer
    if length <= start:
        return 0.0
    if length > max_completion_length or buffer == 0:
        return -1.0
    return (start - length) / buffer


def _check_overlong(max_completion_length: Any, buffer: Any) -> None:
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length <= 0:
        raise VlftError(f"overlong reward: max_completion_length must be a positive integer, got {max_completion_length!r}")
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 0 <= buffer <= max_completion_length:
        raise VlftError(f"overlong reward: the buffer must be an integer in [0, max_completion_length="
                        f"{max_completion_length}], got {buffer!r}")


class OverlongPenalty:
    """The soft overlong penalty with fixed lengths (a class, not a closure, so that it pickles)."""

    __name__ = "overlong"

    def __init__(self, max_completion_length: int = DEFAULT_MAX_COMPLETION_LENGTH, buffer: int | None = None):
        if buffer is None and isinstance(max_completion_length, int):
            buffer = max_completion_length // 4
        _check_overlong(max_completion_length, buffer)
        self.max_completion_length = max_completion_length
        self.buffer = buffer

    def __call__(self, completion_ids: list, **kwargs) -> list[float]:
        return [overlong_value(len(ids), self.max_completion_length, self.buffer) for ids in completion_ids]

    def __repr__(self) -> str:
        return f"OverlongPenalty(max_completion_length={self.max_completion_length}, buffer={self.buffer})"


def overlong_penalty(max_completion_length: int = DEFAULT_MAX_COMPLETION_LENGTH, buffer: int | None = None) -> OverlongPenalty:
    """The soft overlong penalty (`overlong_value`) for completions of at most `max_completion_length` tokens with a
    `buffer` (default: a quarter of the maximum) over which the penalty grows from 0 to -1. Set
    `max_completion_length` to the trainer's own (GRPO generation stops there, so the longest completions get -1)."""
    return OverlongPenalty(max_completion_length, buffer)


def overlong_reward(completion_ids: list, **kwargs) -> list[float]:
    """The soft overlong penalty of DAPO (Yu et al. 2025, arXiv 2503.14476, eq. 13; `overlong_value`) on the length of
    `completion_ids`: 0 up to max - buffer tokens, linearly down to -1 at max, -1 beyond. The lengths come from the
    keyword arguments `max_completion_length` (default 512) and `overlong_buffer` (default a quarter of the maximum),
    each a single value or a column (one value per completion; None -> the default); for fixed values build one with
    `overlong_penalty(max_completion_length, buffer)`."""
    n = len(completion_ids)
    maxima = _column(kwargs, "max_completion_length", n)
    buffers = _column(kwargs, "overlong_buffer", n)
    rewards = []
    for ids, max_len, buffer in zip(completion_ids, maxima, buffers):
        max_len = DEFAULT_MAX_COMPLETION_LENGTH if max_len is None else max_len
        buffer = max_len // 4 if buffer is None and isinstance(max_len, int) else buffer
        _check_overlong(max_len, buffer)
        rewards.append(overlong_value(len(ids), max_len, buffer))
    return rewards


# -------------------------------------------------------------------------------------------------------- repetition


def repetition_value(text: str, ngram_size: int = 3) -> float:
    """-(1 - unique n-grams / all n-grams) over the words (casefolded, split on whitespace) of `text`; 0.0 with no
    repeated n-gram or fewer than `ngram_size` words."""
    words = text.casefold().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    repeated = 1.0 - len(set(ngrams)) / len(ngrams)
    return -repeated if repeated > 0 else 0.0


class RepetitionPenalty:
    """The n-gram repetition penalty with a chosen n (a class, not a closure, so that it pickles)."""

    __name__ = "repetition"

    def __init__(self, ngram_size: int = 3):
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
            raise VlftError(f"repetition reward: ngram_size must be a positive integer, got {ngram_size!r}")
        self.ngram_size = ngram_size

    def __call__(self, completions: list, **kwargs) -> list[float]:
        return [repetition_value(completion_text(c), self.ngram_size) for c in completions]

    def __repr__(self) -> str:
        return f"RepetitionPenalty(ngram_size={self.ngram_size})"


def repetition_reward(completions: list, **kwargs) -> list[float]:
    """Penalty for repeated word 3-grams: -(1 - unique 3-grams / all 3-grams) of the completion (`repetition_value`),
    in [-1, 0]; 0.0 without repetition or under 3 words. Source: the n-gram repetition penalty of Yeo et al. 2025,
    "Demystifying Long Chain-of-Thought Reasoning in LLMs" (arXiv 2502.03373, appendix C.2), there on tokens, here on
    words so that it does not depend on the tokenizer. Other n: `RepetitionPenalty(ngram_size)`."""
    return [repetition_value(completion_text(c), 3) for c in completions]


BUILTIN: dict[str, Callable] = {
    "format": format_reward,
    "think_format": think_format_reward,
    "accuracy": accuracy_reward,
    "count": count_reward,
    "choice": choice_reward,
    "iou": iou_reward,
    "overlong": overlong_reward,
    "repetition": repetition_reward,
}

# ----------------------------------------------------------------------------------------------------------- loading

_SPEC_HELP = ("a reward spec is a built-in name (" + ", ".join(BUILTIN) + "), path/to/file.py:function, "
              "package.module:function, or rm:PATH[@DEVICE] (a reward model trained with vlft rm)")

# ------------------------------------------------------------------------------------------------------ reward model

RM_PREFIX = "rm:"
_DEVICE_RE = re.compile(r"cpu|(?:cuda|xpu|npu|mps)(?::\d+)?|\d+")


def takes_prompt_media(func: Callable) -> bool:
    """Whether a reward function wants each completion's prompt with its media (`prompt_media`, see the module
    docstring): it sets `takes_prompt_media = True`."""
    return bool(getattr(func, "takes_prompt_media", False))


def completion_message(completion: Any, prompt: Any = None) -> dict:
    """One completion as the assistant message a reward model encodes after its prompt: {"content": text}, or, when
    it holds reasoning (`split_completion` against the rendered `prompt`), {"content": answer, "reasoning_content":
    reasoning}, as vlft's pairs carry them."""
    reasoning, answer = split_completion(completion, prompt)
    if reasoning is None:
        return {"content": completion_text(completion)}
    return {"content": answer, "reasoning_content": reasoning}


def parse_rm_spec(spec: str) -> tuple[str, str | None]:
    """`rm:PATH[@DEVICE]` -> (PATH, DEVICE or None); a bare number N is `cuda:N`. A last `@...` that names no device
    stays part of the path."""
    rest = spec[len(RM_PREFIX):]
    path, at, device = rest.rpartition("@")
    if at and path and _DEVICE_RE.fullmatch(device):
        return path, f"cuda:{device}" if device.isdigit() else device
    return rest, None


class RewardModelReward:
    """`--reward_funcs rm:PATH[@DEVICE]`: the rewards of a reward model trained with `vlft rm` (train/rm/model.py
    `load_reward_model`: PATH is its run directory or a checkpoint-N in it), one float per completion, higher is
    better. The model loads on the first call (the pre-flight, before the policy loads) on `device`, in `dtype`
    ("fp32", "bf16"); every call scores the completions after their own prompts and media (`prompt_media`), in
    batches of `batch_size`, under torch.no_grad."""

    takes_prompt_media = True

    def __init__(self, path: str, *, device=None, dtype: str = "fp32", batch_size: int = 16):
        self.path, self.device, self.dtype, self.batch_size = path, device, dtype, batch_size
        self.__name__ = "rm"
        self._model = None

    def load(self):
        """The reward model (train/rm/model.py RewardModel), loaded on the first call."""
        if self._model is None:
            from vlft.train.rm.model import load_reward_model

            self._model = load_reward_model(self.path, device=self.device, dtype=self.dtype)
        return self._model

    def __call__(self, prompts: list, completions: list, prompt_media: list, **kwargs) -> list[float]:
        if len(prompt_media) != len(completions):
            raise ValueError(f"rm reward: {len(prompt_media)} prompts for {len(completions)} completions")
        if not isinstance(prompts, (list, tuple)) or len(prompts) != len(completions):
            prompts = [None] * len(completions)
        messages = [completion_message(c, p) for c, p in zip(completions, prompts)]
        scores = self.load().score(list(prompt_media), messages, batch_size=self.batch_size)
        return [float(v) for v in scores]

    def __repr__(self) -> str:
        return f"RewardModelReward({self.path!r}, device={self.device!r}, dtype={self.dtype!r})"


def _reward_model_reward(spec: str, device, dtype: str) -> RewardModelReward:
    """The `rm:` spec checked before anything loads: PATH holds a reward head (run_dir.py REWARD_HEAD_WEIGHTS)."""
    from vlft.run_dir import REWARD_HEAD_WEIGHTS

    path, given = parse_rm_spec(spec)
    if not path:
        raise VlftError(f"reward '{spec}': no path after rm: -> give the output_dir of a vlft rm run, e.g. "
                        "rm:output/rm_run (or rm:output/rm_run@cuda:1 for another device)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise VlftError(f"reward '{spec}': {folder.resolve()} is no folder -> give the output_dir of a vlft rm run or "
                        f"a checkpoint-N inside it (a relative path is read from {Path.cwd()})")
    if not (folder / REWARD_HEAD_WEIGHTS).is_file():
        raise VlftError(f"reward '{spec}': {folder} holds no {REWARD_HEAD_WEIGHTS}, so it is no reward model -> train "
                        "one with vlft rm (scripts/finetune_rm.sh) and give its output_dir or a checkpoint-N inside it")
    return RewardModelReward(str(folder), device=given if given is not None else device, dtype=dtype)


def _load_file(path_text: str, spec: str):
    path = Path(path_text).expanduser()
    resolved = path.resolve()
    if not resolved.is_file():
        raise VlftError(f"reward '{spec}': file {resolved} not found -> check the path (a relative path is read from "
                        f"the current directory, {Path.cwd()})")
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"vlft_reward_{re.sub(r'[^0-9A-Za-z_]', '_', resolved.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise VlftError(f"reward '{spec}': cannot import {resolved} as Python -> give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # registered before running it: dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise VlftError(f"reward '{spec}': importing {resolved} failed: {type(e).__name__}: {e}\n"
                        f"{_where(e)}-> fix the file") from e
    return module


def _load_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise VlftError(f"reward '{spec}': module '{module_name}' not found -> install its package, add its "
                            f"directory to PYTHONPATH, or give a file path (path/to/file.py:function)") from e
        raise VlftError(f"reward '{spec}': importing module '{module_name}' failed: {e} -> install '{e.name}'") from e
    except Exception as e:
        raise VlftError(f"reward '{spec}': importing module '{module_name}' failed: {type(e).__name__}: {e}\n"
                        f"{_where(e)}-> fix the module") from e


def _looks_like_path(text: str) -> bool:
    return text.endswith(".py") or "/" in text or "\\" in text


def load_reward_funcs(specs: list[str], *, device=None, dtype: str = "fp32") -> list[tuple[str, Callable]]:
    """Each spec: a built-in name (a key of `BUILTIN`), `path/to/file.py:function`, `package.module:function`
    (`function` may be dotted: `module:obj.method`), or `rm:PATH[@DEVICE]` (a vlft rm reward model,
    `RewardModelReward`, named `rm`; on DEVICE, else `device`: the policy's; weights in `dtype`). -> (display name,
    function), in order.

    The display name (used for the logged reward columns) is the built-in name or the function's `__name__`; if two
    specs would share a name, the later one is named by its spec. A file is imported as a module of its own (once per
    path). VlftError naming the spec and what to do when it is unknown, or its file, module or function is missing or
    not callable.
    """
    loaded: list[tuple[str, Callable]] = []
    names: set[str] = set()
    for raw in specs:
        spec = str(raw).strip()
        if spec in BUILTIN:
            name, func = spec, BUILTIN[spec]
        elif spec.startswith(RM_PREFIX):
            func = _reward_model_reward(spec, device, dtype)
            name = func.__name__
        else:
            if ":" not in spec:
                raise VlftError(f"unknown reward '{spec}' -> {_SPEC_HELP}")
            where, attr = spec.rsplit(":", 1)
            if not where or not attr:
                raise VlftError(f"reward '{spec}': empty module/file or function name -> {_SPEC_HELP}")
            module = _load_file(where, spec) if _looks_like_path(where) else _load_module(where, spec)
            func = module
            for part in attr.split("."):
                if not hasattr(func, part):
                    available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                                       and getattr(v, "__module__", None) == module.__name__)
                    raise VlftError(f"reward '{spec}': '{where}' has no '{attr}' -> check the name; callables defined "
                                    f"there: {', '.join(available) or 'none'}")
                func = getattr(func, part)
            if not callable(func):
                raise VlftError(f"reward '{spec}': '{attr}' in '{where}' is a {type(func).__name__}, not a function -> "
                                f"name a function f(prompts, completions, completion_ids, **kwargs) -> list[float | None]")
            name = getattr(func, "__name__", None) or type(func).__name__
        if name in names:
            name = spec
        names.add(name)
        loaded.append((name, func))
    return loaded


# --------------------------------------------------------------------------------------------------------- pre-flight

_MISSING_ARG_RE = re.compile(r"missing (?:\d+ |a )?required (?:positional |keyword-only )?arguments?: "
                             r"((?:'[^']+'(?:,? and |, )?)+)")
_QUOTED_RE = re.compile(r"'([^']+)'")
_RESERVED = ("prompt", "completion", "completion_ids")  # never passed as columns (TRL drops them too)


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f"  at {f.filename}:{f.lineno} in {f.name}\n"


def _missing_arguments(e: TypeError, passed: set[str]) -> list[str]:
    m = _MISSING_ARG_RE.search(str(e))
    if not m:
        return []
    return list(dict.fromkeys(a for a in _QUOTED_RE.findall(m.group(1)) if a not in passed))


def _trainer_extras() -> dict[str, Any]:
    """What TRL's GRPOTrainer adds to every reward call: trainer_state (a fresh TrainerState: step 0), log_extra and
    log_metric (no-ops here)."""
    try:
        from transformers import TrainerState

        state = TrainerState()
    except Exception:  # pragma: no cover - transformers is a dependency
        state = None
    return {"trainer_state": state, "log_extra": lambda *a, **k: None, "log_metric": lambda *a, **k: None}


def _format_value(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return str(value)
    return f"{value:.4g}"


def _excerpt(text: str, width: int = 40) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


@dataclass
class RewardCheck:
    """What the pre-flight found: the printable table, and each function's shape (`TEXT` or `CONVERSATIONAL`, in the
    order of the functions), which the trainer passes it for the whole run."""

    table: str
    shapes: list[str]


def check_rewards(funcs: list[tuple[str, Callable]], weights: list[float] | None, samples: list[dict]) -> str:
    """`preflight_rewards(...)`'s table alone."""
    return preflight_rewards(funcs, weights, samples).table


def preflight_rewards(funcs: list[tuple[str, Callable]], weights: list[float] | None,
                      samples: list[dict]) -> RewardCheck:
    """Pre-flight, before training step 1: call every reward on real records with a sample completion, and find the
    shape each one takes.

    `samples`: one dict per record, {"prompt": str (the rendered prompt), "completion": str, "completion_ids":
    list[int], "columns": dict[str, object], "messages": list[dict] (optional: the prompt's messages; default one
    user turn holding `prompt`), "images" / "videos": the record's resolved media (optional; for the functions that
    take `prompt_media`, e.g. a reward model)}; columns = that record's extra keys. The call is TRL's: `prompts`,
    `completions` and `completion_ids` as lists over the samples, every column as a keyword list (a column missing
    from some records is passed with None for those), plus `trainer_state`, `log_extra` and `log_metric` as
    GRPOTrainer passes them, and `prompt_media` to the functions that take it.

    Shapes (TRL's two, see the module docstring): each function is called with strings (`TEXT`); only if that raises,
    again with the prompts as message lists and each completion as `[{"role": "assistant", "content": text}]`
    (`CONVERSATIONAL`, TRL's shape for conversational - vision-language - prompts, which `trl.rewards`' own functions
    read). The first shape that returns a valid list is the function's for the run.

    VlftError when: `weights` is given and its length differs from the number of functions (names --reward_weights);
    a function lacks a column it requires (names the function, the argument and the columns the data has); it
    raises in both shapes (names the function, the error and where: the conversational call's error when the string
    call failed on the shape, else the string call's); it returns something that is not a list/tuple of one value
    per sample (names expected and got); a value is not int/float/bool/None, or not finite (names the function,
    index and value). The table has one row per sample (record id if the records have `id`, an excerpt of the
    completion - of its reasoning and of its answer (`split_completion` against the sample's prompt) in two columns
    when a completion has reasoning -, each reward's value, and the weighted total as the trainer sums it), and a
    line naming the functions that get conversational completions.
    """
    if not funcs:
        raise VlftError("no reward functions -> pass --reward_funcs (e.g. format accuracy)")
    if weights is not None:
        if len(weights) != len(funcs):
            raise VlftError(f"--reward_weights has {len(weights)} value(s) but there are {len(funcs)} reward function(s) "
                            f"({', '.join(n for n, _ in funcs)}) -> give one weight per reward function, in the same order")
        bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
        if bad:
            raise VlftError(f"--reward_weights must be finite numbers, got {bad}")
    if not samples:
        raise VlftError("the reward pre-flight got no records to try the reward functions on")
    n = len(samples)
    prompts = [s.get("prompt") for s in samples]
    completions = [s.get("completion") for s in samples]
    completion_ids = [list(s.get("completion_ids") or []) for s in samples]
    keys: list[str] = []
    for s in samples:
        for key in s.get("columns") or {}:
            if key not in keys and key not in _RESERVED:
                keys.append(key)
    columns = {key: [(s.get("columns") or {}).get(key) for s in samples] for key in keys}
    partial = [key for key in keys if any(key not in (s.get("columns") or {}) for s in samples)]
    have = ", ".join(keys) or "none"
    call_kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns,
                   **_trainer_extras()}
    passed = set(call_kwargs)
    messages = [s.get("messages") or [{"role": "user", "content": str(s.get("prompt") or "")}] for s in samples]
    media_kwargs = {}
    if any(takes_prompt_media(func) for _, func in funcs):
        from vlft.data.rm import PromptMedia

        media_kwargs["prompt_media"] = [PromptMedia(m, list(s.get("images") or []), list(s.get("videos") or []), key=i)
                                        for i, (m, s) in enumerate(zip(messages, samples))]

    def conversational_kwargs(kwargs: dict) -> dict:
        return {**kwargs, "prompts": [conversational_prompt(m) for m in messages],
                "completions": [conversational_completion(completion_text(c)) for c in completions]}

    def missing_error(name: str, missing: list[str]) -> VlftError:
        args = ", ".join(f"'{a}'" for a in missing)
        return VlftError(f"reward '{name}' needs the argument {args}, which is no column of the data; the records have "
                         f"the columns: {have} -> add {args} to every record (a record's keys other than the prompt "
                         f"and its media reach reward functions as keyword lists), or choose a reward that reads the "
                         f"columns there")

    results: list[list] = []
    shapes: list[str] = []
    for name, func in funcs:
        func_kwargs = {**call_kwargs, **media_kwargs} if takes_prompt_media(func) else call_kwargs
        if isinstance(func, RewardModelReward):
            func.load()  # a run that does not load says so as itself, not as a failed reward call
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            try:
                signature.bind(**func_kwargs)
            except TypeError as e:
                missing = _missing_arguments(e, passed)
                if missing:
                    raise missing_error(name, missing) from e
                raise VlftError(f"reward '{name}' cannot be called as f(prompts, completions, completion_ids, **columns): "
                                f"{e} -> a reward function must take **kwargs (TRL passes every column and trainer_state, "
                                f"log_extra, log_metric by keyword); a factory (e.g. trl.rewards.get_soft_overlong_punishment)"
                                f" must be called first, in your own file") from e
        shape = TEXT
        try:
            out = _call(func, func_kwargs)
        except Exception as text_error:
            missing = _missing_arguments(text_error, passed) if isinstance(text_error, TypeError) else []
            if missing:
                raise missing_error(name, missing) from text_error
            try:  # TRL's shape for conversational prompts (trl.rewards' own functions read completion[0]["content"])
                out, shape = _call(func, conversational_kwargs(func_kwargs)), CONVERSATIONAL
            except Exception as chat_error:
                if _shape_error(text_error):
                    raise VlftError(_raised(name, chat_error, partial, after=text_error)) from chat_error
                raise VlftError(_raised(name, text_error, partial)) from text_error
        if not isinstance(out, (list, tuple)):
            raise VlftError(f"reward '{name}' returned a {type(out).__name__}; expected a list of {n} values (one per "
                            f"completion) -> return a list of floats (None where the reward does not apply)")
        if len(out) != n:
            raise VlftError(f"reward '{name}' returned {len(out)} value(s) for {n} completions; expected length {n}, got "
                            f"{len(out)} -> return exactly one value per completion (None where it does not apply)")
        for i, value in enumerate(out):
            if value is not None and not isinstance(value, (int, float)):
                raise VlftError(f"reward '{name}' returned {value!r} ({type(value).__name__}) at index {i}; expected a "
                                f"float, int, bool or None -> return Python numbers (e.g. float(x))")
            if isinstance(value, float) and not math.isfinite(value):
                raise VlftError(f"reward '{name}' returned {value} at index {i} -> return a finite number, or None where "
                                f"the reward does not apply (a NaN would poison the group's advantages)")
        results.append(list(out))
        shapes.append(shape)
    table = _table(funcs, weights, samples, results)
    chat = [name for (name, _), shape in zip(funcs, shapes) if shape == CONVERSATIONAL]
    if chat:
        table += (f"\n  conversational completions for {', '.join(chat)}: it raised on plain strings, so it gets TRL's "
                  "shape for chat prompts (prompts as message lists, each completion [{'role': 'assistant', "
                  "'content': text}]) for the whole run")
    return RewardCheck(table, shapes)


def _call(func: Callable, kwargs: dict):
    out = func(**kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    return out


def _shape_error(e: BaseException) -> bool:
    """Whether an error of a call with string completions looks like a function that wants message dicts
    (`completion[0]["content"]` on a string: "string indices must be integers"; `.get` on a str; a KeyError)."""
    text = str(e)
    return (isinstance(e, TypeError) and ("string indices" in text or "'str'" in text)) or \
        (isinstance(e, AttributeError) and "'str' object" in text) or isinstance(e, KeyError)


async def _await(awaitable):
    return await awaitable


def _raised(name: str, e: Exception, partial: list[str], after: Exception | None = None) -> str:
    """The pre-flight's message for a function that raised; `after`: the error of the string call that came first,
    when `e` is the conversational call's."""
    text = f"reward '{name}' raised {type(e).__name__}: {e}\n{_where(e)}"
    if after is not None:
        text += (f"  (called with TRL's conversational completions, [{{'role': 'assistant', 'content': text}}], after "
                 f"plain strings had failed with {type(after).__name__}: {after})\n")
    if isinstance(e, ImportError):
        text += "-> install the package it imports in this environment (the message names it)"
    else:
        text += "-> fix the reward function (it was called on the records in the table of the start-up check)"
    if partial:
        text += f"\n   note: some records lack the column(s) {', '.join(partial)}; the call passes None for them"
    return text


def _table(funcs, weights, samples, results) -> str:
    names = [name for name, _ in funcs]
    w = list(weights) if weights is not None else [1.0] * len(funcs)
    with_id = any("id" in (s.get("columns") or {}) for s in samples)
    # a thinking model's completions: the reasoning and the answer the rewards score, side by side
    parts = [split_completion(s.get("completion"), s.get("prompt")) for s in samples]
    thinking = any(reasoning is not None for reasoning, _ in parts)
    shown = ["reasoning", "answer"] if thinking else ["completion"]
    header = ["#"] + (["id"] if with_id else []) + shown + names + ["total"]
    rows = []
    all_none = 0
    for i, s in enumerate(samples):
        values = [r[i] for r in results]
        present = [(wi, v) for wi, v in zip(w, values) if v is not None]
        total = sum(wi * float(v) for wi, v in present) if present else None
        all_none += total is None
        row = [str(i)] + ([_excerpt(str((s.get("columns") or {}).get("id", "")), 16)] if with_id else [])
        if thinking:
            reasoning, answer = parts[i]
            row += ["-" if reasoning is None else _excerpt(reasoning, 30), _excerpt(answer, 30) or '""']
        else:
            row += [_excerpt(completion_text(s.get("completion")))]
        row += [_format_value(v) for v in values] + [_format_value(total)]
        rows.append(row)
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    lines = [f"reward check on {len(samples)} record(s) (weights: "
             + ", ".join(f"{n}={wi:g}" for n, wi in zip(names, w)) + "):"]
    lines.append("  " + "  ".join(h.ljust(widths[k]) for k, h in enumerate(header)).rstrip())
    lines += ["  " + "  ".join(c.ljust(widths[k]) for k, c in enumerate(r)).rstrip() for r in rows]
    if all_none:
        lines.append(f"  note: every reward returned None for {all_none} record(s); they get no learning signal")
    return "\n".join(lines)
