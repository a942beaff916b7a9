"""Messages -> token ids + labels (assistant-only loss), and the SFT dataset.

The chat template is rendered once per record, with private-use marker characters around every
assistant message; the markers give the character spans to train, and the tokenizer's offsets map
them to tokens. One render and one tokenisation per record, for any Qwen-VL template, and the labels
come from the model's own template rather than from a re-implementation of it.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.video_utils import VideoMetadata

from vlft.constants import IGNORE_INDEX, IM_END, IMAGE_PAD, VIDEO_PAD
from vlft.data.llava import Sample
from vlft.data.media import MediaError, fit_image, load_image
from vlft.data.pixels import PixelNorm, patchify
from vlft.data.video import load_video
from vlft.errors import VlftError

# Private-use code points: never produced by the templates, and rejected in user text by the check.
SPAN_OPEN = "\ue000"
SPAN_CLOSE = "\ue001"
MARKERS = (SPAN_OPEN, SPAN_CLOSE)


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
        """Chat text and the [start, end) character spans to train (with `add_generation_prompt`, the text ends
        with the assistant header, ready for generation)."""
        marked = [
            {**m, "content": SPAN_OPEN + m["content"] + SPAN_CLOSE} if m["role"] == "assistant" else m
            for m in messages
        ]
        text = self.tokenizer.apply_chat_template(marked, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
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


@dataclass(frozen=True)
class MediaSettings:
    """Pixel budgets and frame sampling, shared by the start-up check and the dataset so both agree."""

    image_min_pixels: int
    image_max_pixels: int
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_max_total_pixels: int | None = None
    fps: float | None = None
    nframes: int | None = None
    video_min_frames: int = 4
    video_max_frames: int = 768
    frames_fps: float = 2.0  # rate assumed for a video given as frame images

    def video_kwargs(self, encoder: SFTEncoder) -> dict:
        return dict(fps=self.fps, nframes=self.nframes, min_frames=self.video_min_frames,
                    max_frames=self.video_max_frames, min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels,
                    total_pixels=self.video_max_total_pixels, factor=encoder.video_patch_size * encoder.merge_size,
                    temporal_patch_size=encoder.temporal_patch_size, frames_fps=self.frames_fps)


class SFTDataset(torch.utils.data.Dataset):
    """Checked samples -> model inputs. Images and videos are loaded, sized to their pixel budgets and
    patchified here (in the DataLoader workers); everything that can fail was already tried by the check.

    `raw_pixels=True` keeps `pixel_values` / `pixel_values_videos` as uint8 patch rows, to be normalised on the
    device (data/pixels.py says why; train/model_inputs.py: `normalize_pixels_on_device` does it); otherwise they
    are the float32 values the processor itself would give."""

    def __init__(self, samples: list[Sample], image_paths: list[list[str]], processor, *, media: MediaSettings,
                 video_sources: list[list] | None = None, add_generation_prompt: bool = False,
                 raw_pixels: bool = False):
        self.samples = samples
        self.image_paths = image_paths  # resolved paths, parallel to samples
        self.video_sources = video_sources or [[] for _ in samples]  # resolved files / frame folders / frame lists
        self.encoder = SFTEncoder(processor)
        self.image_temporal_patch_size = getattr(processor.image_processor, "temporal_patch_size", 2)
        self.image_norm = PixelNorm.of(processor.image_processor)
        video_processor = getattr(processor, "video_processor", None)
        self.video_norm = PixelNorm.of(video_processor) if video_processor is not None else self.image_norm
        self.media = media
        self.add_generation_prompt = add_generation_prompt  # prediction: prompts end with the assistant header
        self.raw_pixels = raw_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        item: dict = {}
        try:
            image_specs = self._images(self.image_paths[i], item)
            video_specs = self._videos(self.video_sources[i], item)
        except MediaError as err:  # the file changed after the start-up check
            raise VlftError(f"record {sample.index} (id {sample.id!r}): {err}") from None
        enc = self.encoder.encode(sample.messages, image_specs, video_specs,
                                  add_generation_prompt=self.add_generation_prompt)
        item["input_ids"] = torch.tensor(enc.input_ids, dtype=torch.long)
        item["labels"] = torch.tensor(enc.labels, dtype=torch.long)
        return item

    def _images(self, paths: list[str], item: dict) -> list[VisionSpec]:
        if not paths:
            return []
        enc, patch = self.encoder, self.encoder.patch_size
        rows, grids = [], []
        for path in paths:
            image = fit_image(load_image(path), factor=patch * enc.merge_size, min_pixels=self.media.image_min_pixels,
                              max_pixels=self.media.image_max_pixels)
            image_rows, grid = patchify(image[None], patch_size=patch, merge_size=enc.merge_size,
                                        temporal_patch_size=self.image_temporal_patch_size)
            rows.append(image_rows)
            grids.append(grid)
        pixels = torch.cat(rows) if len(rows) > 1 else rows[0]
        item["pixel_values"] = pixels if self.raw_pixels else self.image_norm(pixels)
        item["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return [VisionSpec(g) for g in grids]

    def _videos(self, sources: list, item: dict) -> list[VisionSpec]:
        if not sources:
            return []
        enc, patch, tps = self.encoder, self.encoder.video_patch_size, self.encoder.temporal_patch_size
        clips = [load_video(src, **self.media.video_kwargs(enc)) for src in sources]
        # Frames are already sampled and sized: they are only cut into patches here.
        rows, grids = zip(*(patchify(torch.from_numpy(c.frames).permute(0, 3, 1, 2), patch_size=patch,
                                     merge_size=enc.merge_size, temporal_patch_size=tps) for c in clips))
        pixels = torch.cat(rows) if len(rows) > 1 else rows[0]
        item["pixel_values_videos"] = pixels if self.raw_pixels else self.video_norm(pixels)
        item["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        item["second_per_grid_ts"] = [tps / c.fps for c in clips]
        return [VisionSpec(g, tuple(c.indices), c.source_fps, c.fps) for g, c in zip(grids, clips)]


class PackedDataset(torch.utils.data.Dataset):
    """Packs of records (lists of indices into an SFTDataset, from data/packing.py's plan_packs): each item is
    one packed row's records, for PackingCollator."""

    def __init__(self, dataset: SFTDataset, packs: list[list[int]]):
        self.dataset = dataset
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.dataset[j] for j in self.packs[i]]
