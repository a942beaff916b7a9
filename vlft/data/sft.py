"""Messages -> token ids + labels (assistant-only loss), and the SFT dataset.

The chat template is rendered once per record, with private-use marker characters around every
assistant message; the markers give the character spans to train, and the tokenizer's offsets map
them to tokens. One render and one tokenisation per record, for any Qwen-VL template, and the labels
come from the model's own template rather than from a re-implementation of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlft.constants import IGNORE_INDEX, IM_END, IMAGE_PAD
from vlft.data.llava import Sample
from vlft.data.media import MediaError, fit_image, load_image
from vlft.errors import VlftError

# Private-use code points: never produced by the templates, and rejected in user text by the check.
SPAN_OPEN = "\ue000"
SPAN_CLOSE = "\ue001"
MARKERS = (SPAN_OPEN, SPAN_CLOSE)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class SFTEncoder:
    """Turns chat messages into ids and labels with the processor's own chat template.

    Trained: the content of every assistant message and its closing <|im_end|>. Everything else
    (system, user, role headers, vision tokens, the newline after <|im_end|>) gets IGNORE_INDEX.
    """

    def __init__(self, processor):
        self.tokenizer = processor.tokenizer
        self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        if not self.template:
            raise VlftError("the processor has no chat template; use an Instruct checkpoint or add chat_template.jinja")
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        image_processor = processor.image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """Chat text and the [start, end) character spans to train."""
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

    def encode(self, messages: list[dict], image_token_counts: list[int]) -> Encoded:
        """ids/labels with each <|image_pad|> expanded to that image's number of tokens."""
        text, spans = self.render(messages)
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
        n_pads = ids.count(self.image_pad_id)
        if n_pads != len(image_token_counts):
            raise VlftError(f"the chat template produced {n_pads} image placeholders for {len(image_token_counts)} images")
        if n_pads:
            out_ids, out_labels, k = [], [], 0
            for tok, lab in zip(ids, labels):
                if tok == self.image_pad_id:
                    out_ids.extend([tok] * image_token_counts[k])
                    out_labels.extend([IGNORE_INDEX] * image_token_counts[k])
                    k += 1
                else:
                    out_ids.append(tok)
                    out_labels.append(lab)
            ids, labels = out_ids, out_labels
        return Encoded(ids, labels)


class SFTDataset(torch.utils.data.Dataset):
    """Checked samples -> model inputs. Images are loaded, resized to the pixel budget and patchified
    here (in the DataLoader workers); everything that can fail was already tried by the data check."""

    def __init__(self, samples: list[Sample], image_paths: list[list[str]], processor, *,
                 image_min_pixels: int, image_max_pixels: int, lengths: list[int] | None = None):
        self.samples = samples
        self.image_paths = image_paths  # resolved paths, parallel to samples
        self.encoder = SFTEncoder(processor)
        self.image_processor = processor.image_processor
        self.min_pixels = image_min_pixels
        self.max_pixels = image_max_pixels
        self.lengths = lengths  # token counts from the data check (for length grouping)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        item: dict = {}
        counts: list[int] = []
        if self.image_paths[i]:
            factor = self.encoder.patch_size * self.encoder.merge_size
            try:
                images = [
                    fit_image(load_image(p), factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
                    for p in self.image_paths[i]
                ]
            except MediaError as err:  # the file changed after the start-up check
                raise VlftError(f"record {sample.index} (id {sample.id!r}): {err}") from None
            # Already resized to multiples of patch*merge within the budget: the processor must not resize again.
            vision = self.image_processor(images=images, do_resize=False, return_tensors="pt")
            item["pixel_values"] = vision["pixel_values"]
            item["image_grid_thw"] = vision["image_grid_thw"]
            counts = (vision["image_grid_thw"].prod(-1) // self.encoder.merge_size**2).tolist()
        enc = self.encoder.encode(sample.messages, counts)
        item["input_ids"] = torch.tensor(enc.input_ids, dtype=torch.long)
        item["labels"] = torch.tensor(enc.labels, dtype=torch.long)
        return item
