"""Batch SFT items: right padding, attention mask from lengths, image and video tensors in batch order."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlft.constants import IGNORE_INDEX


@dataclass(frozen=True)
class DummyMedia:
    """A one-token image or video for batches that have none, so that every process of a distributed run
    runs the vision tower for images and for videos at every step, in the same code path.

    Why: under DeepSpeed ZeRO-3 the tower's weights are gathered by collective calls whenever it runs,
    forward and backward; a rank whose micro-batch holds no image (or no video) would skip those calls and
    the job hangs (2U1 tells users to avoid ZeRO-3 for mixed data); DDP fails on trainable weights that got
    no gradient. The dummy is a 1 x merge x merge grid of zero pixels whose single placeholder token sits
    after the last row's tokens, with attention mask 0 and label -100: no real token attends to it and the
    loss ignores it, so the loss and the gradients are those of the batch without it."""

    patch_dim: int  # channels x temporal_patch_size x patch_size**2, the width of a pixel_values row
    merge_size: int
    vision_start_id: int
    vision_end_id: int


class SFTCollator:
    """`mm_token_type_ids` (0 text, 1 image, 2 video) is what transformers >= 5.2x needs to build mRoPE
    positions (`mm_token_type_ids=True` for versions whose forward takes it)."""

    def __init__(self, pad_token_id: int, *, image_token_id: int, video_token_id: int, mm_token_type_ids: bool = False,
                 pad_to_multiple_of: int | None = None, second_per_grid_ts: bool = False,
                 dummy_media: DummyMedia | None = None, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.mm_token_type_ids = mm_token_type_ids
        self.pad_to_multiple_of = pad_to_multiple_of
        self.second_per_grid_ts = second_per_grid_ts  # Qwen2.5-VL's forward takes the seconds per temporal patch
        self.dummy_media = dummy_media
        self.padding_side = padding_side  # "left" for batched generation: every prompt ends at the last column

    @classmethod
    def for_model(cls, processor, model, *, family=None, distributed: bool = False,
                  padding_side: str = "right") -> SFTCollator:
        """The collator matched to `model` (a bare `Qwen*VLForConditionalGeneration`): its special token ids, the
        arguments this transformers version's forward accepts, and in distributed runs (`family`, the model's
        registry entry, required then) a masked one-token image/video for media-less batches (see DummyMedia)
        shaped like the model's patch embedding."""
        import inspect

        config = model.config
        accepted = inspect.signature(type(model).forward).parameters  # the class's: instance patches take **kwargs
        dummy = None
        if distributed:
            if family is None:
                raise ValueError("a distributed collator needs the model's family to find its patch embedding")
            weight = family.patch_embed(model).proj.weight  # Conv3d [embed, channels, temporal, patch, patch]
            shape = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3 keeps the real shape aside
            dummy = DummyMedia(patch_dim=shape[1] * shape[2] * shape[3] * shape[4],
                               merge_size=config.vision_config.spatial_merge_size,
                               vision_start_id=config.vision_start_token_id, vision_end_id=config.vision_end_token_id)
        return cls(processor.tokenizer.pad_token_id, image_token_id=config.image_token_id,
                   video_token_id=config.video_token_id, mm_token_type_ids="mm_token_type_ids" in accepted,
                   second_per_grid_ts="second_per_grid_ts" in accepted, dummy_media=dummy, padding_side=padding_side)

    def __call__(self, items: list[dict]) -> dict:
        lengths = [len(it["input_ids"]) for it in items]
        has_images = any("pixel_values" in it for it in items)
        has_videos = any("pixel_values_videos" in it for it in items)
        dummies = []
        if self.dummy_media is not None:
            dummies = [pad for pad, present in ((self.image_token_id, has_images), (self.video_token_id, has_videos))
                       if not present]
        width = max(lengths[:-1] + [lengths[-1] + 3 * len(dummies)])
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (it, n) in enumerate(zip(items, lengths)):
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            input_ids[row, cols] = it["input_ids"]
            labels[row, cols] = it["labels"]
            attention_mask[row, cols] = 1
        for k, pad in enumerate(dummies):  # after everything real, so mRoPE and feature order stay as they were
            start = lengths[-1] + 3 * k
            input_ids[-1, start:start + 3] = torch.tensor([self.dummy_media.vision_start_id, pad,
                                                         self.dummy_media.vision_end_id])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.mm_token_type_ids:
            batch["mm_token_type_ids"] = ((input_ids == self.image_token_id).long()
                                          + 2 * (input_ids == self.video_token_id).long())
        images = [it for it in items if "pixel_values" in it]
        videos = [it for it in items if "pixel_values_videos" in it]
        pixel_values = [it["pixel_values"] for it in images]
        image_grids = [it["image_grid_thw"] for it in images]
        video_values = [it["pixel_values_videos"] for it in videos]
        video_grids = [it["video_grid_thw"] for it in videos]
        seconds = [s for it in videos for s in it["second_per_grid_ts"]]
        if dummies:
            merge, dim = self.dummy_media.merge_size, self.dummy_media.patch_dim
            zeros, grid = torch.zeros(merge * merge, dim), torch.tensor([[1, merge, merge]])
            if self.image_token_id in dummies:
                pixel_values.append(zeros)
                image_grids.append(grid)
            if self.video_token_id in dummies:
                video_values.append(zeros)
                video_grids.append(grid)
                seconds.append(1.0)
        if pixel_values:
            batch["pixel_values"] = torch.cat(pixel_values)
            batch["image_grid_thw"] = torch.cat(image_grids)
        if video_values:
            batch["pixel_values_videos"] = torch.cat(video_values)
            batch["video_grid_thw"] = torch.cat(video_grids)
            if self.second_per_grid_ts:
                batch["second_per_grid_ts"] = torch.tensor(seconds)
        return batch


class PackingCollator:
    """Batch packs (lists of records) into rows without padding between records.

    Each row is its records' tokens back to back, right-padded to the longest row; vision tensors follow
    record order. No attention mask is built: instead `pack_layout` [B, R, 4] gives, per row, each segment's
    (tokens, images, videos, is_record) (the row's padding is a last segment of its own), from which the model side
    (train/core/model_inputs.py) computes per-record mRoPE positions with the model's own rope-index
    function; transformers then builds a block-diagonal causal mask from the text positions restarting at 0,
    so attention never crosses a record boundary."""

    def __init__(self, collator: SFTCollator):
        self.base = collator  # token ids, media handling and mm_token_type_ids come from the padded collator

    def __call__(self, packs: list[list[dict]]) -> dict:
        rows = [torch.cat([it["input_ids"] for it in pack]) for pack in packs]
        width = max(len(r) for r in rows)
        segments = []
        for pack, row in zip(packs, rows):
            segs = [(len(it["input_ids"]), len(it.get("image_grid_thw", ())), len(it.get("video_grid_thw", ())), 1)
                    for it in pack]
            if len(row) < width:
                segs.append((width - len(row), 0, 0, 0))
            segments.append(segs)
        merged = [{"input_ids": row, "labels": torch.cat([it["labels"] for it in pack]),
                   **self._media(pack)} for pack, row in zip(packs, rows)]
        batch = self.base(merged)
        batch.pop("attention_mask")
        layout = torch.zeros((len(packs), max(len(s) for s in segments), 4), dtype=torch.long)
        for b, segs in enumerate(segments):
            layout[b, :len(segs)] = torch.tensor(segs)
        batch["pack_layout"] = layout
        return batch

    @staticmethod
    def _media(pack: list[dict]) -> dict:
        out = {}
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            parts = [it for it in pack if pixels in it]
            if parts:
                out[pixels] = torch.cat([it[pixels] for it in parts])
                out[grid] = torch.cat([it[grid] for it in parts])
        seconds = [s for it in pack for s in it.get("second_per_grid_ts", [])]
        if seconds:
            out["second_per_grid_ts"] = seconds
        return out
