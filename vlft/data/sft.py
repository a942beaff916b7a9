"""The SFT dataset: prepared conversation records -> model inputs (ids, labels, pixels), and packed rows."""
from __future__ import annotations

import torch

from vlft.data.encoding import ChatEncoder, VisionSpec
from vlft.data.llava import Sample
from vlft.data.media import MediaError, fit_image, load_image
from vlft.data.pixels import PixelNorm, patchify
from vlft.data.prepare import MediaSettings
from vlft.data.reasoning import Thinking
from vlft.data.video import load_video
from vlft.errors import VlftError


class SFTDataset(torch.utils.data.Dataset):
    """Checked samples -> model inputs. Images and videos are loaded, sized to their pixel budgets and
    patchified here (in the DataLoader workers); everything that can fail was already tried by the check.

    `raw_pixels=True` keeps `pixel_values` / `pixel_values_videos` as uint8 patch rows, to be normalised on the
    device (data/pixels.py says why; the trainer's input preparation does it: train/core/model_inputs.py); otherwise they
    are the float32 values the processor itself would give."""

    def __init__(self, samples: list[Sample], image_paths: list[list[str]], processor, *, media: MediaSettings,
                 video_sources: list[list] | None = None, add_generation_prompt: bool = False,
                 raw_pixels: bool = False, thinking: Thinking | None = None):
        self.samples = samples
        self.image_paths = image_paths  # resolved paths, parallel to samples
        self.video_sources = video_sources or [[] for _ in samples]  # resolved files / frame folders / frame lists
        self.encoder = ChatEncoder(processor, thinking, verify=False)  # prepare_data rendered every record already
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
        item: dict = {"record": i}  # the dataset index: a failing training step names its records (train/core/trainer.py)
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


# --- the sft and predict rows of vlft/stages.py ------------------------------------------------------------------


def record_format(max_seq_length: int, options=None):
    """SFT records: LLaVA conversations ending with an answer (data/prepare.py CONVERSATION); the length limit is
    applied by preparation's policy, so `max_seq_length` and `options` change nothing here."""
    from vlft.data.prepare import CONVERSATION

    return CONVERSATION


def predict_record_format(max_seq_length: int, options=None):
    """`vlft predict`'s records: conversations or prompts, the answer optional (CONVERSATION_OR_PROMPT)."""
    from vlft.data.prepare import CONVERSATION_OR_PROMPT

    return CONVERSATION_OR_PROMPT


def build_dataset(prepared, processor, *, media: MediaSettings, max_length: int | None = None,
                  thinking: Thinking | None = None) -> SFTDataset:
    """An SFTDataset over `prepared` (data/prepare.py PreparedData), items as training builds them (float pixels:
    for showing; training asks for raw uint8 ones). `max_length` is unused: SFT records over the limit were dropped
    by preparation."""
    return SFTDataset(prepared.samples, prepared.image_paths, processor, media=media,
                      video_sources=prepared.video_sources, thinking=thinking)
