"""The DPO stage's data: prepared preference records -> one item per pair -> batches of [chosen rows; rejected rows].

A pair is one prompt (with its media, loaded once) and two completions. The batch lays the B chosen sequences
(prompt + chosen answer) in rows 0..B-1 and the B rejected ones in rows B..2B-1, TRL's layout, so every per-row
result splits with `.chunk(2)`. Rows are built by the SFT collator itself (padding, `mm_token_type_ids`, media
tensors in row order, `second_per_grid_ts`, the masked dummy media of distributed runs), with labels equal to the
input ids on the completion tokens and IGNORE_INDEX elsewhere: the completion mask is `labels != IGNORE_INDEX`.

Over-long pairs (`--truncation_mode`): `drop` leaves a pair whose prompt plus longer answer exceeds
`--max_seq_length` out of training (counted and listed, like SFT); `keep_start` (TRL's name and default) cuts the
answers from their end to fit. A prompt is never cut (it holds the vision spans): a pair whose prompt leaves no
room for one answer token is dropped under either mode.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlft.constants import IGNORE_INDEX
from vlft.data.collator import SFTCollator
from vlft.data.encoding import ChatEncoder
from vlft.data.media import MediaError
from vlft.data.preference import PreferenceSample, parse_preference_record
from vlft.data.prepare import RecordFormat
from vlft.data.sft import SFTDataset
from vlft.errors import VlftError

TRUNCATION_MODES = ("keep_start", "drop")
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass
class PreferenceFormat:
    """The DPO record format for data preparation (data/prepare.py), with the over-long policy: the lengths it
    reports are those the pair will have after truncation, so preparation drops exactly the pairs that cannot
    fit. `truncated` collects the indices of records whose answers will be cut."""

    max_length: int
    truncation_mode: str = "keep_start"
    truncated: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"--truncation_mode {self.truncation_mode!r}: choose one of {', '.join(TRUNCATION_MODES)}")

    def lengths(self, encoder: ChatEncoder, sample: PreferenceSample, images, videos) -> tuple[int, ...]:
        pair = encoder.encode_preference(sample.messages, sample.completions, images, videos)
        full = tuple(len(pair.prompt_ids) + len(ids) for ids in pair.completion_ids)
        if (self.truncation_mode == "keep_start" and max(full) > self.max_length
                and len(pair.prompt_ids) < self.max_length):
            self.truncated.append(sample.index)
            return tuple(min(n, self.max_length) for n in full)
        return full

    def record_format(self) -> RecordFormat:
        return RecordFormat("preference", parse_preference_record, self.lengths)


class PreferenceDataset(SFTDataset):
    """Prepared preference samples -> one dict per pair:

        prompt_ids [P], chosen_ids [C], chosen_mask [C], rejected_ids [R], rejected_mask [R] (long tensors; the
        masks are 1 on the answer and its <|im_end|>), pair_index (int: the position in the dataset, the key of
        precomputed reference log-probs), and the prompt's media as the SFT dataset gives them (`pixel_values`,
        `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`).

    Media loading, sizing and patchifying are the SFT dataset's (one code path); `max_length` cuts answers
    from their end so that prompt + answer <= max_length (None: no cut; data preparation has dropped what
    cannot fit)."""

    def __init__(self, samples: list[PreferenceSample], image_paths, processor, *, media, video_sources=None,
                 max_length: int | None = None, raw_pixels: bool = False):
        super().__init__(samples, image_paths, processor, media=media, video_sources=video_sources,
                         raw_pixels=raw_pixels)
        self.max_length = max_length

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        item: dict = {"pair_index": i}
        try:
            image_specs = self._images(self.image_paths[i], item)
            video_specs = self._videos(self.video_sources[i], item)
        except MediaError as err:  # the file changed after the start-up check
            raise VlftError(f"record {sample.index} (id {sample.id!r}): {err}") from None
        pair = self.encoder.encode_preference(sample.messages, sample.completions, image_specs, video_specs)
        room = None if self.max_length is None else self.max_length - len(pair.prompt_ids)
        item["prompt_ids"] = torch.tensor(pair.prompt_ids, dtype=torch.long)
        for name, ids, mask in zip(("chosen", "rejected"), pair.completion_ids, pair.completion_masks):
            item[f"{name}_ids"] = torch.tensor(ids[:room], dtype=torch.long)
            item[f"{name}_mask"] = torch.tensor(mask[:room], dtype=torch.long)
        return item


class PreferenceCollator:
    """Pairs -> one padded batch of 2B rows, [chosen; rejected] (see the module docstring), plus `pair_index`
    [B] and `image_pairs` / `video_pairs` (scalars): the number n of images (videos) of the chosen rows. The media
    tensors hold those n, the rejected rows' n identical copies, then any dummy media of a distributed batch
    (data/collator.py: DummyMedia), so the trainer can encode each picture once (train/dpo_trainer.py).
    `base` is the stage's SFTCollator (SFTCollator.for_model), which does the padding and the media."""

    def __init__(self, base: SFTCollator):
        self.base = base

    def __call__(self, pairs: list[dict]) -> dict:
        rows = []
        for side in ("chosen", "rejected"):
            for pair in pairs:
                ids = torch.cat([pair["prompt_ids"], pair[f"{side}_ids"]])
                labels = torch.cat([torch.full_like(pair["prompt_ids"], IGNORE_INDEX),
                                    pair[f"{side}_ids"].masked_fill(pair[f"{side}_mask"] == 0, IGNORE_INDEX)])
                rows.append({"input_ids": ids, "labels": labels, **{k: pair[k] for k in MEDIA_KEYS if k in pair}})
        batch = self.base(rows)
        batch["pair_index"] = torch.tensor([pair["pair_index"] for pair in pairs], dtype=torch.long)
        # images (videos) of the chosen rows; the rejected rows repeat them, in the same order, right after
        for key, grid in (("image_pairs", "image_grid_thw"), ("video_pairs", "video_grid_thw")):
            batch[key] = torch.tensor(sum(len(pair.get(grid, ())) for pair in pairs), dtype=torch.long)
        return batch
