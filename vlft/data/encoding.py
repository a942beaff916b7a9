"""Chat messages -> token ids and loss masks, from the model's own chat template, for every stage.

The chat template is rendered once per sequence, with private-use marker characters around every
assistant message; the markers give the character spans to learn, and the tokenizer's offsets map
them to tokens. One render and one tokenisation per sequence, for any Qwen-VL template, and the masks
come from the model's own template rather than from a re-implementation of it. Each image / video
placeholder is then expanded the way the processor expands it (grids come from `VisionSpec`s measured
by data preparation, so no pixels are needed here).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.video_utils import VideoMetadata

from vlft.constants import IGNORE_INDEX, IM_END, IMAGE_PAD, VIDEO_PAD
from vlft.data.reasoning import (
    REASONING_KEYS,
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningError,
    Thinking,
    check_flags,
    message_reasoning,
    probe_template,
)
from vlft.errors import VlftError

# Private-use code points: never produced by the templates, and rejected in user text by the check. The first pair
# marks an answer, the second its reasoning.
SPAN_OPEN = "\ue000"
SPAN_CLOSE = "\ue001"
REASONING_OPEN = "\ue002"
REASONING_CLOSE = "\ue003"
MARKERS = (SPAN_OPEN, SPAN_CLOSE, REASONING_OPEN, REASONING_CLOSE)
_MARKER_RE = re.compile(f"[{''.join(MARKERS)}]")
_IM_START = "<|im_start|>"
# Encoded.parts values
CONTEXT, REASONING, ANSWER = 0, 1, 2


def special_token_ids(tokenizer, tokens) -> list[int]:
    """The ids of those of `tokens` (special-token strings such as constants.END_OF_REPLY_TOKENS) that `tokenizer`
    has, in their order. A missing one is left out rather than looked up: `convert_tokens_to_ids` answers the unk id
    for it, and Qwen3_5Tokenizer's unk token defaults to <|endoftext|>, a real token, so a lookup alone cannot tell
    a missing token from that one."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


class EncodingError(VlftError):
    """A conversation the chat template cannot render as vlft must train it. `turn`: the index of the message at
    fault (None: the whole conversation); `completion`: for preference pairs, which completion; `hint`: what to do."""

    def __init__(self, message: str, turn: int | None = None, hint: str = "", completion: int | None = None):
        super().__init__(message)
        self.turn, self.hint, self.completion = turn, hint, completion


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    parts: list[int] | None = None  # per token, with `encode(..., parts=True)`: CONTEXT, REASONING or ANSWER


@dataclass(frozen=True)
class Span:
    """One assistant turn in rendered text, as character offsets. [start, end) is learned; [block, answer) is its
    think block as rendered (the <think> tag to the answer; block == answer when there is none), [answer, end) the
    answer and its <|im_end|>. `reasoning` is where the reasoning text begins (None when the turn renders none)."""

    turn: int  # index of the message in the conversation
    block: int
    start: int
    reasoning: int | None
    answer: int
    end: int


class Rendered(NamedTuple):
    text: str
    spans: list[Span]
    dropped: tuple[int, ...]  # turns whose reasoning the template left out (Qwen3.5: turns before the last query)


@dataclass(frozen=True)
class VisionSpec:
    """What decides an image's or video's tokens: its grid (t, h, w) in patches, and for videos the
    sampled source frame numbers and the source fps (Qwen3-VL writes timestamps from them)."""

    grid: tuple[int, int, int]
    indices: tuple[int, ...] = ()
    source_fps: float = 0.0
    fps: float = 0.0  # effective sampled fps (Qwen2.5-VL: second_per_grid_ts = temporal_patch_size / fps)


def _wrap(text: str, open_: str, close: str) -> str:
    """Markers around `text` without its surrounding whitespace, which stays outside them: a template that trims
    (Qwen3.5's `|trim`) then renders exactly what it renders unmarked."""
    core = text.strip()
    if not core:
        return text + open_ + close
    at = text.index(core)
    return text[:at] + open_ + core + close + text[at + len(core):]


class ChatEncoder:
    """Chat messages -> token ids and a mask of the tokens to learn, with the processor's own chat template,
    for every stage: `encode_conversation` (SFT: labels on the assistant turns), `encode_preference` (DPO: one
    prompt and several completions, each with its completion mask), `encode_prompt` (generation: GRPO,
    predict). All of them go through `render` (the template, with private-use markers around every answer and its
    reasoning) and one tokenisation.

    Learned: every assistant answer and its closing <|im_end|>, and its reasoning as the template renders it, from
    the <think> tag on (TRL's *_training templates' `{% generation %}` span, less the newline after <|im_end|>,
    which is never generated). An empty think block is learned only with `Thinking.train_empty_think`. Everything
    else (system, user, role headers, vision tokens, the newline after <|im_end|>) gets IGNORE_INDEX.

    `thinking` (data/reasoning.py): the reasoning flags, passed to the template in every render and checked against
    what the template can do (VlftError naming the flag)."""

    def __init__(self, processor, thinking: Thinking | None = None, verify: bool = True):
        self.tokenizer = processor.tokenizer
        self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.template:
            raise VlftError("the processor has no chat template; use an Instruct checkpoint or add chat_template.jinja")
        self.processor = processor
        # the plain render that proves the marked one faithful: once per record at start-up (data preparation);
        # the datasets' encoders, on the training hot path, skip it (verify=False) for records already proven
        self.verify = verify
        self.thinking = thinking or Thinking()
        self.template_kwargs = self.thinking.template_kwargs()
        self.reasoning = probe_template(self._apply, self.template, self.template_kwargs)
        check_flags(self.thinking, self.reasoning)
        on = self.thinking.enable_thinking
        self.thinks = self.reasoning.knows_reasoning and (self.reasoning.thinks_by_default if on is None else on)
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_pad_id = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        image_processor = processor.image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        video_processor = getattr(processor, "video_processor", None)
        self.video_patch_size = getattr(video_processor, "patch_size", self.patch_size)
        self.temporal_patch_size = getattr(video_processor, "temporal_patch_size", 2)

    def _apply(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def _assistant(self, message: dict, turn: int) -> tuple[dict, dict, bool]:
        """(message as rendered, the same with markers, whether it carries reasoning) for one assistant message."""
        try:
            reasoning, answer = message_reasoning(message)
        except ReasoningError as e:
            raise EncodingError(str(e), turn, e.hint) from None
        rest = {k: v for k, v in message.items() if k not in REASONING_KEYS}
        has = bool(reasoning and reasoning.strip())
        if self.reasoning.knows_reasoning:
            plain = {**rest, "content": answer, "reasoning_content": reasoning or ""}
            marked = {**rest, "content": _wrap(answer, SPAN_OPEN, SPAN_CLOSE),
                      "reasoning_content": _wrap(reasoning, REASONING_OPEN, REASONING_CLOSE) if has else ""}
            return plain, marked, has
        if reasoning is None:  # plain text for a template that knows no reasoning
            return rest, {**rest, "content": _wrap(answer, SPAN_OPEN, SPAN_CLOSE)}, False
        content = message.get("content") or ""
        if any(isinstance(message.get(k), str) for k in REASONING_KEYS):  # the field, written in Qwen3's layout
            head, answer = f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n", content
        else:  # inline: the text as written
            cut = content.index(THINK_CLOSE) + len(THINK_CLOSE)
            cut += len(content[cut:]) - len(content[cut:].lstrip("\n"))
            head, answer = content[:cut], content[cut:]
        return ({**rest, "content": head + answer},
                {**rest, "content": _wrap(head, REASONING_OPEN, REASONING_CLOSE) + _wrap(answer, SPAN_OPEN, SPAN_CLOSE)},
                has)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> Rendered:
        """Chat text, the span of every assistant turn (`Span`), and the turns whose reasoning the template drops.

        Reasoning comes inline (`<think>R</think>A`) or in `reasoning_content` (data/reasoning.py); both reach the
        template as `reasoning_content`, so both give the same text. The conversation is rendered twice, plain and
        with markers; the two must agree once the markers are removed, so the spans are those of the template's own
        text whatever it does to the content (Qwen3.5 trims it and moves the reasoning into a think block).

        With `add_generation_prompt` the text ends where the template starts an assistant answer, ready for
        generation: the messages are rendered with one more assistant turn and cut where its reasoning begins when
        thinking is on (Qwen3.5: `<|im_start|>assistant\\n<think>\\n`), where its answer begins when it is off
        (`...<think>\\n\\n</think>\\n\\n`). That is the context every trained answer follows, token for token, and
        equals the template's own generation prompt for the Qwen templates (tested).

        Raises EncodingError naming the turn when the template drops or changes an answer."""
        if add_generation_prompt:
            probe = {"role": "assistant", "content": "x", **({"reasoning_content": "x"} if self.thinks else {})}
            text, spans, dropped = self.render([*messages, probe])
            last = spans[-1]
            return Rendered(text[:last.reasoning if self.thinks else last.answer], spans[:-1], dropped)
        plain, marked, carries = [], [], {}
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                p, q, has = self._assistant(m, k)
                plain.append(p)
                marked.append(q)
                carries[k] = has
            else:
                plain.append(m)
                marked.append(m)
        text = self._apply(marked, **self.template_kwargs)
        pieces, marks, pos, cursor = [], [], 0, 0
        for found in _MARKER_RE.finditer(text):
            pieces.append(text[cursor:found.start()])
            pos += found.start() - cursor
            marks.append((found.group(), pos))
            cursor = found.end()
        pieces.append(text[cursor:])
        out = "".join(pieces)
        turns = list(carries)
        found_turns = []
        reasoning_at = None
        for mark, at in marks:
            if mark == REASONING_OPEN:
                reasoning_at = at
            elif mark == SPAN_OPEN:
                answer_at = at
            elif mark == SPAN_CLOSE:
                found_turns.append((reasoning_at, answer_at, at))
                reasoning_at = None
        if len(found_turns) != len(turns):
            missing = self._dropped_answer(marked, turns)
            raise EncodingError(f"the chat template rendered {len(found_turns)} of {len(turns)} assistant messages"
                                + ("" if missing is None else "; it drops this one"), missing,
                                "write the answer so that the template keeps it; vlft supports the Qwen-VL templates")
        if self.verify and out != self._apply(plain, **self.template_kwargs):
            raise EncodingError("the chat template renders this conversation differently once vlft marks its answers",
                                None, "use the model's own Qwen chat template")
        spans, dropped = [], []
        for turn, (reasoning_at, answer_at, close_at) in zip(turns, found_turns):
            header = max(0, out.rfind(_IM_START, 0, answer_at if reasoning_at is None else reasoning_at))
            think = out.find(THINK_OPEN, header, answer_at if reasoning_at is None else reasoning_at)
            block = think if think >= 0 else (answer_at if reasoning_at is None else reasoning_at)
            start = block if reasoning_at is not None or self.thinking.train_empty_think else answer_at
            end = close_at + len(out[close_at:]) - len(out[close_at:].lstrip(" \t\n"))
            if not out.startswith(IM_END, end):
                raise EncodingError("the chat template does not close assistant messages with <|im_end|>", turn,
                                    "vlft supports the Qwen-VL chat templates")
            if carries[turn] and reasoning_at is None:
                dropped.append(turn)
            spans.append(Span(turn, block, start, reasoning_at, answer_at, end + len(IM_END)))
        return Rendered(out, spans, tuple(dropped))

    def _dropped_answer(self, marked: list[dict], turns: list[int]) -> int | None:
        """The first assistant turn whose marked answer the template leaves out (error path only)."""
        for k in turns:
            only = [m if i == k or m["role"] != "assistant" else {**m, "content": re.sub(_MARKER_RE, "", m.get("content") or ""),
                                      **({"reasoning_content": re.sub(_MARKER_RE, "", m["reasoning_content"])}
                                         if "reasoning_content" in m else {})}
                    for i, m in enumerate(marked)]
            if SPAN_CLOSE not in self._apply(only, **self.template_kwargs):
                return k
        return None

    def _tokenise(self, text: str, spans: Sequence[Span], parts: bool = False):
        """ids, labels (IGNORE_INDEX outside [span.start, span.end)), and per-token parts when asked."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        kinds = [CONTEXT] * len(ids) if parts else None
        k = 0
        for i, (s, e) in enumerate(offsets):
            while k < len(spans) and s >= spans[k].end:
                k += 1
            if k == len(spans):
                break
            span = spans[k]
            if s >= span.start and e <= span.end:
                labels[i] = ids[i]
            if parts and s >= span.block and e <= span.end:
                kinds[i] = REASONING if s < span.answer else ANSWER
        return ids, labels, kinds

    def encode(self, messages: list[dict], images: Sequence[VisionSpec] = (), videos: Sequence[VisionSpec] = (),
               add_generation_prompt: bool = False, parts: bool = False) -> Encoded:
        """ids/labels with each image/video placeholder expanded the way this processor expands it; `parts=True`
        also marks each token CONTEXT, REASONING (a think block) or ANSWER (Encoded.parts)."""
        text, spans, _ = self.render(messages, add_generation_prompt)
        ids, labels, kinds = self._tokenise(text, spans, parts)
        return self._expand(ids, labels, kinds, images, videos)

    def _expand(self, ids, labels, kinds, images, videos) -> Encoded:
        expansions = {self.image_pad_id: [self.expansion("image", images, k) for k in range(len(images))],
                      self.video_pad_id: [self.expansion("video", videos, k) for k in range(len(videos))]}
        found = {pad: ids.count(pad) for pad in expansions}
        for pad, what, given in ((self.image_pad_id, "image", images), (self.video_pad_id, "video", videos)):
            if found[pad] != len(given):
                raise VlftError(f"the chat template produced {found[pad]} {what} placeholders for {len(given)} {what}s")
        if not images and not videos:
            return Encoded(ids, labels, kinds)
        out_ids: list[int] = []
        out_labels: list[int] = []
        out_kinds: list[int] | None = [] if kinds is not None else None
        next_item = dict.fromkeys(expansions, 0)
        for i, (tok, lab) in enumerate(zip(ids, labels)):
            if tok in expansions:
                piece = expansions[tok][next_item[tok]]
                next_item[tok] += 1
                out_ids.extend(piece)
                out_labels.extend([IGNORE_INDEX] * len(piece))
                if out_kinds is not None:
                    out_kinds.extend([CONTEXT] * len(piece))
            else:
                out_ids.append(tok)
                out_labels.append(lab)
                if out_kinds is not None:
                    out_kinds.append(kinds[i])
        return Encoded(out_ids, out_labels, out_kinds)

    def encode_conversation(self, messages: list[dict], images: Sequence[VisionSpec] = (),
                            videos: Sequence[VisionSpec] = ()) -> Encoded:
        """SFT: the whole conversation; labels on every assistant turn."""
        return self.encode(messages, images, videos)

    def encode_prompt(self, messages: list[dict], images: Sequence[VisionSpec] = (),
                      videos: Sequence[VisionSpec] = ()) -> Encoded:
        """Generation (RL rollouts, predict): the messages (ending with a user turn) and what the template puts
        before an answer (the assistant header; for thinking templates the opened think block, or the empty one
        with thinking off: `render`); nothing is learned, so every label is IGNORE_INDEX."""
        ids = self.encode(messages, images, videos, add_generation_prompt=True).input_ids
        return Encoded(ids, [IGNORE_INDEX] * len(ids))

    def encode_preference(self, prompt: list[dict], completions: Sequence[str | dict],
                          images: Sequence[VisionSpec] = (), videos: Sequence[VisionSpec] = ()) -> EncodedPreference:
        """Preference pairs: `prompt` (ending with a user turn) answered by each of `completions` (answer strings, or
        assistant messages {"content": ..., "reasoning_content": ...}; inline `<think>` works in both).

        Each completion is the text the template renders after the generation prompt (`encode_prompt`) in prompt +
        completion, tokenised on its own, as the policy generates it after the prompt's ids: with thinking on that
        includes the reasoning and the closing `</think>` (or the closing of an empty block). Its mask is 1 up to
        and including the answer's <|im_end|>. Raises EncodingError (with `completion`) when the template renders the
        prompt differently with that completion, e.g. reasoning after a prompt whose think block is already closed
        (--enable_thinking false)."""
        if not completions:
            raise ValueError("encode_preference needs at least one completion")
        prompt_text = self.render(prompt, add_generation_prompt=True).text
        prompt_ids = self.encode_prompt(prompt, images, videos).input_ids
        ids, masks = [], []
        for k, completion in enumerate(completions):
            message = ({"content": completion} if isinstance(completion, str) else dict(completion))
            message["role"] = "assistant"
            try:
                text, spans, _ = self.render([*prompt, message])
            except EncodingError as e:
                raise EncodingError(str(e), e.turn, e.hint, completion=k) from None
            if not text.startswith(prompt_text):
                closed = self.reasoning.knows_reasoning and not self.thinks
                raise EncodingError(
                    "the chat template renders the prompt differently with this answer"
                    + (": the answer carries reasoning, but with thinking off the prompt already closes the think "
                       "block" if closed else ""), len(prompt),
                    "set --enable_thinking true, or drop the reasoning" if closed else
                    "vlft cannot split prompt and completion with this template", completion=k)
            rest = text[len(prompt_text):]
            stop = spans[-1].end - len(prompt_text)
            enc = self.tokenizer(rest, add_special_tokens=False, return_offsets_mapping=True)
            ids.append(enc["input_ids"])
            masks.append([int(e <= stop) for _, e in enc["offset_mapping"]])
        return EncodedPreference(prompt_ids, ids, masks)

    def expansion(self, kind: str, specs: Sequence[VisionSpec], k: int) -> list[int]:
        """Token ids that replace the k-th <|image_pad|> / <|video_pad|> of the template.

        transformers >= 5.2x processors say it themselves (`replace_image_token` / `replace_video_token`:
        Qwen3-VL puts a "<t seconds>" timestamp and its own vision marks before every temporal patch); older
        ones expand to grid.prod() // merge**2 pads, which is what Qwen2-VL and Qwen2.5-VL do."""
        spec = specs[k]
        pad_id = self.image_pad_id if kind == "image" else self.video_pad_id
        n_pads = spec.grid[0] * spec.grid[1] * spec.grid[2] // self.merge_size**2
        replace = getattr(self.processor, f"replace_{kind}_token", None)
        if replace is None:
            return [pad_id] * n_pads
        inputs = {f"{kind}_grid_thw": torch.tensor([spec.grid])}
        if kind == "video":
            total = round(len(spec.indices) * spec.source_fps / spec.fps) if spec.fps else len(spec.indices)
            inputs["video_metadata"] = [VideoMetadata(fps=spec.source_fps, frames_indices=list(spec.indices),
                                                      total_num_frames=total)]
        try:
            text = replace(inputs, **{f"{kind}_idx": 0})
        except NotImplementedError:
            return [pad_id] * n_pads
        return self._tokens(text, IMAGE_PAD if kind == "image" else VIDEO_PAD, pad_id)

    def _tokens(self, text: str, pad: str, pad_id: int) -> list[int]:
        # Runs of pad tokens are counted, not tokenised (a video can expand to tens of thousands of them);
        # the text between them (timestamps, vision marks) repeats, so its ids are cached.
        out: list[int] = []
        for piece in re.split(f"((?:{re.escape(pad)})+)", text):
            if not piece:
                continue
            if piece.startswith(pad) and len(piece) % len(pad) == 0 and piece == pad * (len(piece) // len(pad)):
                out.extend([pad_id] * (len(piece) // len(pad)))
            else:
                out.extend(self._text_ids(piece))
        return out

    def lengths(self, items: Sequence[tuple], add_generation_prompt: bool = False) -> list[int | EncodingError]:
        """Token counts (vision tokens included) of many conversations, each `(messages, image specs, video specs)`:
        `len(self.encode(messages, images, videos, add_generation_prompt).input_ids)` for each, or the EncodingError
        its render raises, in order. Each conversation is rendered (and verified) as `encode` renders it; the texts
        are then tokenised in one call of the fast tokenizer's batch encoding, which gives the ids one call per text
        gives (no padding, no special tokens added: tests/data/test_encoding_lengths.py), without building labels.
        Raises VlftError when the template produced another number of media placeholders than media given."""
        texts, out = [], []
        for messages, _, _ in items:
            try:
                texts.append(self.render(messages, add_generation_prompt).text)
                out.append(None)
            except EncodingError as e:
                out.append(e)
        batch = iter(self.tokenizer([t for t in texts], add_special_tokens=False)["input_ids"] if texts else [])
        for k, (_, images, videos) in enumerate(items):
            if out[k] is not None:
                continue
            ids = next(batch)
            n = len(ids)
            for pad, kind, given in ((self.image_pad_id, "image", images), (self.video_pad_id, "video", videos)):
                found = ids.count(pad)
                if found != len(given):
                    raise VlftError(f"the chat template produced {found} {kind} placeholders for {len(given)} {kind}s")
                n += sum(self._expansion_length(kind, spec) for spec in given) - found
            out[k] = n
        return out

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one encoder per dataset, lives as long as it
    def _expansion_length(self, kind: str, spec: VisionSpec) -> int:
        """len(expansion(kind, [spec], 0)): a spec's tokens depend on the spec alone, and many media share one."""
        return len(self.expansion(kind, (spec,), 0))

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one encoder per dataset, lives as long as it
    def _text_ids(self, piece: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(piece, add_special_tokens=False)["input_ids"])


@dataclass
class EncodedPreference:
    """One prompt and its completions (DPO's chosen and rejected): `prompt_ids` ends where an answer starts (the
    assistant header, `encode_prompt`), ready for generation; `completion_ids[k]` follows it in the template's own
    rendering of prompt + completion k; `completion_masks[k]` is 1 on the tokens to learn (the answer and its
    <|im_end|>), 0 on what the template adds after it."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    completion_masks: list[list[int]]
