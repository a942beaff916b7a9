"""Batch SFT items: right padding, attention mask from lengths, image and video tensors in batch order."""
from __future__ import annotations

import torch

from vlft.constants import IGNORE_INDEX


class SFTCollator:
    """`mm_token_type_ids` (0 text, 1 image, 2 video) is what transformers >= 5.2x needs to build mRoPE
    positions; pass `image_token_id` to emit it, leave it None for versions that do not take it."""

    def __init__(self, pad_token_id: int, *, image_token_id: int | None = None, video_token_id: int | None = None,
                 pad_to_multiple_of: int | None = None, second_per_grid_ts: bool = False):
        self.second_per_grid_ts = second_per_grid_ts  # Qwen2.5-VL's forward takes the seconds per temporal patch
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict]) -> dict:
        lengths = [len(it["input_ids"]) for it in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (it, n) in enumerate(zip(items, lengths)):
            input_ids[row, :n] = it["input_ids"]
            labels[row, :n] = it["labels"]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.image_token_id is not None:
            types = (input_ids == self.image_token_id).long()
            if self.video_token_id is not None:
                types += 2 * (input_ids == self.video_token_id).long()
            batch["mm_token_type_ids"] = types
        with_images = [it for it in items if "pixel_values" in it]
        if with_images:
            batch["pixel_values"] = torch.cat([it["pixel_values"] for it in with_images])
            batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in with_images])
        with_videos = [it for it in items if "pixel_values_videos" in it]
        if with_videos:
            batch["pixel_values_videos"] = torch.cat([it["pixel_values_videos"] for it in with_videos])
            batch["video_grid_thw"] = torch.cat([it["video_grid_thw"] for it in with_videos])
            if self.second_per_grid_ts:
                batch["second_per_grid_ts"] = torch.tensor([s for it in with_videos for s in it["second_per_grid_ts"]])
        return batch
