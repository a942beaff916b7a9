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

import torch
from transformers.video_utils import VideoMetadata

from vlft.constants import IGNORE_INDEX, IM_END, IMAGE_PAD, VIDEO_PAD
from vlft.errors import VlftError

# Private-use code points: never produced by the templates, and rejected in user text by the check.
SPAN_OPEN = "\ue000"
SPAN_CLOSE = "\ue001"
MARKERS = (SPAN_OPEN, SPAN_CLOSE)


def special_token_ids(tokenizer, tokens) -> list[int]:
    """The ids of those of `tokens` (special-token strings such as constants.END_OF_REPLY_TOKENS) that `tokenizer`
    has, in their order. A missing one is left out rather than looked up: `convert_tokens_to_ids` answers the unk id
    for it, and Qwen3_5Tokenizer's unk token defaults to <|endoftext|>, a real token, so a lookup alone cannot tell
    a missing token from that one."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in tokens if t in vocab]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class VisionSpec:
    """What decides an image's or video's tokens: its grid (t, h, w) in patches, and for videos the
    sampled source frame numbers and the source fps (Qwen3-VL writes timestamps from them)."""

    grid: tuple[int, int, int]
    indices: tuple[int, ...] = ()
    source_fps: float = 0.0
    fps: float = 0.0  # effective sampled fps (Qwen2.5-VL: second_per_grid_ts = temporal_patch_size / fps)


class ChatEncoder:
    """Chat messages -> token ids and a mask of the tokens to learn, with the processor's own chat template,
    for every stage: `encode_conversation` (SFT: labels on the assistant turns), `encode_preference` (DPO: one
    prompt and several completions, each with its completion mask), `encode_prompt` (generation: GRPO,
    predict). All of them go through `encode`: one render, one tokenisation.

    Learned: the content of every assistant message and its closing <|im_end|>. Everything else
    (system, user, role headers, vision tokens, the newline after <|im_end|>) gets IGNORE_INDEX.
    """

    def __init__(self, processor):
        self.tokenizer = processor.tokenizer
        self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.template:
            raise VlftError("the processor has no chat template; use an Instruct checkpoint or add chat_template.jinja")
        self.processor = processor
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_pad_id = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        image_processor = processor.image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        video_processor = getattr(processor, "video_processor", None)
        self.video_patch_size = getattr(video_processor, "patch_size", self.patch_size)
        self.temporal_patch_size = getattr(video_processor, "temporal_patch_size", 2)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
        """Chat text and the [start, end) character spans to train.

        With `add_generation_prompt` the text ends where the template starts an assistant answer, ready for
        generation: the messages are rendered with one more, empty, assistant turn and cut where its content
        begins. That is the context every trained answer follows, which the template's own generation prompt is
        not for thinking templates: Qwen3.5's (TRL's qwen3_5_think, qwen3_6, qwen3_8) open the reply with
        `<think>\\n` but render a trained answer after an empty `<think>\\n\\n</think>\\n\\n`, so a model prompted
        with the former must write the closing tokens SFT never trained (predict would not reproduce its
        answers), and with the real tokenizer ("\\n\\n" is one token) the prompt ids are no prefix of the trained
        conversation's (every DPO pair refused). For the Qwen2/2.5/3-VL templates both are the same text."""
        if add_generation_prompt:
            text, spans = self.render([*messages, {"role": "assistant", "content": ""}])
            return text[:spans[-1][0]], spans[:-1]
        marked = [
            {**m, "content": SPAN_OPEN + m["content"] + SPAN_CLOSE} if m["role"] == "assistant" else m
            for m in messages
        ]
        text = self.tokenizer.apply_chat_template(marked, chat_template=self.template, tokenize=False)
        pieces, spans, pos, cursor = [], [], 0, 0
        while True:
            start = text.find(SPAN_OPEN, cursor)
            if start < 0:
                pieces.append(text[cursor:])
                break
            end = text.find(SPAN_CLOSE, start)
            pieces.append(text[cursor:start])
            pos += start - cursor
            content = text[start + 1:end]
            pieces.append(content)
            cursor = end + 1
            if not text.startswith(IM_END, cursor):
                raise VlftError("the chat template does not close assistant messages with <|im_end|>; "
                                "vlft supports the Qwen-VL chat templates")
            spans.append((pos, pos + len(content) + len(IM_END)))
            pos += len(content)
        n_assistant = sum(m["role"] == "assistant" for m in messages)
        if len(spans) != n_assistant:
            raise VlftError(f"the chat template rendered {len(spans)} of {n_assistant} assistant messages")
        return "".join(pieces), spans

    def encode(self, messages: list[dict], images: Sequence[VisionSpec] = (), videos: Sequence[VisionSpec] = (),
               add_generation_prompt: bool = False) -> Encoded:
        """ids/labels with each image/video placeholder expanded the way this processor expands it."""
        text, spans = self.render(messages, add_generation_prompt)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        span_iter = iter(spans)
        span = next(span_iter, None)
        for i, (s, e) in enumerate(offsets):
            while span is not None and s >= span[1]:
                span = next(span_iter, None)
            if span is None:
                break
            if s >= span[0] and e <= span[1]:
                labels[i] = ids[i]
        expansions = {self.image_pad_id: [self.expansion("image", images, k) for k in range(len(images))],
                      self.video_pad_id: [self.expansion("video", videos, k) for k in range(len(videos))]}
        found = {pad: ids.count(pad) for pad in expansions}
        for pad, what, given in ((self.image_pad_id, "image", images), (self.video_pad_id, "video", videos)):
            if found[pad] != len(given):
                raise VlftError(f"the chat template produced {found[pad]} {what} placeholders for {len(given)} {what}s")
        if not images and not videos:
            return Encoded(ids, labels)
        out_ids: list[int] = []
        out_labels: list[int] = []
        next_item = dict.fromkeys(expansions, 0)
        for tok, lab in zip(ids, labels):
            if tok in expansions:
                piece = expansions[tok][next_item[tok]]
                next_item[tok] += 1
                out_ids.extend(piece)
                out_labels.extend([IGNORE_INDEX] * len(piece))
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return Encoded(out_ids, out_labels)

    def encode_conversation(self, messages: list[dict], images: Sequence[VisionSpec] = (),
                            videos: Sequence[VisionSpec] = ()) -> Encoded:
        """SFT: the whole conversation; labels on every assistant turn."""
        return self.encode(messages, images, videos)

    def encode_prompt(self, messages: list[dict], images: Sequence[VisionSpec] = (),
                      videos: Sequence[VisionSpec] = ()) -> Encoded:
        """Generation (RL rollouts, predict): the messages (ending with a user turn) and what the template puts
        before an answer (the assistant header; Qwen3.5's thinking templates add an empty think block: `render`);
        nothing is learned, so every label is IGNORE_INDEX."""
        ids = self.encode(messages, images, videos, add_generation_prompt=True).input_ids
        return Encoded(ids, [IGNORE_INDEX] * len(ids))

    def encode_preference(self, prompt: list[dict], completions: Sequence[str], images: Sequence[VisionSpec] = (),
                          videos: Sequence[VisionSpec] = ()) -> EncodedPreference:
        """Preference pairs: `prompt` (ending with a user turn) answered by each of `completions`.

        Each completion is rendered as the final assistant turn of prompt + completion, so the tokens are exactly
        those SFT would train on; the prompt part must be the same for every completion and equal the
        generation prompt (`encode_prompt`), else the template is not one vlft can split (VlftError)."""
        if not completions:
            raise ValueError("encode_preference needs at least one completion")
        prompt_ids = self.encode_prompt(prompt, images, videos).input_ids
        ids, masks = [], []
        for text in completions:
            full = self.encode(list(prompt) + [{"role": "assistant", "content": text}], images, videos)
            if full.input_ids[:len(prompt_ids)] != prompt_ids:
                raise VlftError("the chat template renders the prompt differently with and without an answer; "
                                "vlft cannot split prompt and completion with this template")
            ids.append(full.input_ids[len(prompt_ids):])
            masks.append([int(lab != IGNORE_INDEX) for lab in full.labels[len(prompt_ids):]])
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
