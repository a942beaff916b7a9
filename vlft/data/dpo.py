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

from dataclasses import dataclass

import torch

from vlft.constants import IGNORE_INDEX
from vlft.data.collator import SFTCollator
from vlft.data.encoding import ChatEncoder
from vlft.data.media import MediaError
from vlft.data.preference import PreferenceSample, parse_preference_record
from vlft.data.prepare import RecordFormat, preference_parts
from vlft.data.sft import SFTDataset
from vlft.errors import VlftError

TRUNCATION_MODES = ("keep_start", "drop")
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
IMAGE_KEYS, VIDEO_KEYS = MEDIA_KEYS[:2], MEDIA_KEYS[2:]


@dataclass
class PreferenceFormat:
    """The DPO record format for data preparation (data/prepare.py), with the over-long policy: the lengths it
    reports are those the pair will have after truncation, so preparation drops exactly the pairs that cannot
    fit. A pair whose answers will be cut gets lengths marked `cut` (`CutLengths`): data preparation keeps that as the
    record's data/store.py CUT flag (`PreparedData.count_flag(CUT)` counts them)."""

    max_length: int
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"--truncation_mode {self.truncation_mode!r}: choose one of {', '.join(TRUNCATION_MODES)}")

    def lengths(self, encoder: ChatEncoder, sample: PreferenceSample, images, videos, rejected=None) -> tuple[int, ...]:
        parts = preference_parts(encoder, sample, images, videos, rejected)
        full = tuple(p + c for p, c in parts)
        if (self.truncation_mode == "keep_start" and max(full) > self.max_length
                and max(p for p, _ in parts) < self.max_length):
            return CutLengths(min(n, self.max_length) for n in full)
        return full

    def record_format(self) -> RecordFormat:
        return RecordFormat("preference", parse_preference_record, self.lengths,
                            cache_key=f"preference:{self.max_length}:{self.truncation_mode}")


class CutLengths(tuple):
    """The lengths of a pair whose answers truncation will cut (`PreferenceFormat.lengths`)."""

    cut = True


class PreferenceDataset(SFTDataset):
    """Prepared preference samples -> one dict per pair:

        prompt_ids [P], chosen_ids [C], chosen_mask [C], rejected_ids [R], rejected_mask [R] (long tensors;
        the masks are 1 on what the policy generates after the prompt, up to and including the answer's
        <|im_end|>: after a thinking prompt, the reasoning and `</think>` too), pair_index (int: the position in
        the dataset, the key of precomputed reference log-probs), and the prompt's media as the SFT dataset gives
        them (`pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`).
        Image-side pairs (`rejected_media[i]` not None) also hold `rejected_prompt_ids` [P'] (the prompt with the
        rejected sequence's pictures: its own vision spans) and `rejected_media`: the media tensors of the kinds
        the record replaces (`image_grid_thw` present: its images; `video_grid_thw`: its videos); the other kind
        is the prompt's.

    Media loading, sizing and patchifying are the SFT dataset's (one code path); `max_length` cuts answers
    from their end so that prompt + answer <= max_length (None: no cut; data preparation has dropped what
    cannot fit). `rejected_media`: data preparation's `PreparedData.rejected_media` (None: no image-side pairs)."""

    def __init__(self, samples: list[PreferenceSample], image_paths, processor, *, media, video_sources=None,
                 max_length: int | None = None, raw_pixels: bool = False, rejected_media=None, thinking=None):
        super().__init__(samples, image_paths, processor, media=media, video_sources=video_sources,
                         raw_pixels=raw_pixels, thinking=thinking)
        self.max_length = max_length
        self.rejected_media = rejected_media or [None] * len(samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        item: dict = {"pair_index": i}
        try:
            image_specs = self._images(self.image_paths[i], item)
            video_specs = self._videos(self.video_sources[i], item)
        except MediaError as err:  # the file changed after the start-up check
            raise VlftError(f"record {sample.index} (id {sample.id!r}): {err}") from None
        other = self.rejected_media[i]
        if other is None:
            pair = self.encoder.encode_preference(sample.messages, sample.completions, image_specs, video_specs)
            sides = [(pair.prompt_ids, ids, mask) for ids, mask in zip(pair.completion_ids, pair.completion_masks)]
        else:  # image-side pair: the rejected sequence's prompt shows its own pictures
            rejected: dict = {}
            try:
                other_images = (self._images(other[0], rejected) if sample.rejected_images is not None
                                else image_specs)
                other_videos = (self._videos(other[1], rejected) if sample.rejected_videos is not None
                                else video_specs)
            except MediaError as err:
                raise VlftError(f"record {sample.index} (id {sample.id!r}): {err}") from None
            item["rejected_media"] = rejected
            sides = []
            for answer, specs in zip(sample.completions, ((image_specs, video_specs), (other_images, other_videos))):
                pair = self.encoder.encode_preference(sample.messages, (answer,), *specs)
                sides.append((pair.prompt_ids, pair.completion_ids[0], pair.completion_masks[0]))
            item["rejected_prompt_ids"] = torch.tensor(sides[1][0], dtype=torch.long)
        item["prompt_ids"] = torch.tensor(sides[0][0], dtype=torch.long)
        for name, (prompt_ids, ids, mask) in zip(("chosen", "rejected"), sides):
            room = None if self.max_length is None else self.max_length - len(prompt_ids)
            item[f"{name}_ids"] = torch.tensor(ids[:room], dtype=torch.long)
            item[f"{name}_mask"] = torch.tensor(mask[:room], dtype=torch.long)
        return item


class PreferenceCollator:
    """Pairs -> one padded batch of 2B rows, [chosen; rejected] (see the module docstring), plus `pair_index` [B]
    and `image_copy_of` / `video_copy_of` [n] (long; present when the chosen rows show pictures of that kind): for
    each of the n images (videos) of the 2B rows, in the order of the media tensors, the index of the picture whose
    features it may reuse, itself when it must be encoded. A rejected row showing the prompt's pictures points at
    the chosen row's copies; an image-side pair's rejected pictures (`rejected_media`) point at themselves; any
    dummy media of a distributed batch (data/collator.py: DummyMedia) come after the n. With these the trainer
    encodes each distinct picture once (train/preference/logprobs.py: encode_vision_once).
    `base` is the stage's SFTCollator (SFTCollator.for_model), which does the padding and the media."""

    def __init__(self, base: SFTCollator):
        self.base = base

    @staticmethod
    def _replaces(pair: dict, grid_key: str) -> bool:
        """Whether the pair's rejected sequence shows its own pictures of the kind `grid_key` counts."""
        return grid_key in pair.get("rejected_media", {})

    def __call__(self, pairs: list[dict]) -> dict:
        rows = []
        for side in ("chosen", "rejected"):
            for pair in pairs:
                prompt = pair["rejected_prompt_ids"] if side == "rejected" and "rejected_prompt_ids" in pair \
                    else pair["prompt_ids"]
                ids = torch.cat([prompt, pair[f"{side}_ids"]])
                labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX),
                                    pair[f"{side}_ids"].masked_fill(pair[f"{side}_mask"] == 0, IGNORE_INDEX)])
                media = {k: pair[k] for k in MEDIA_KEYS if k in pair}
                if side == "rejected":
                    for keys in (IMAGE_KEYS, VIDEO_KEYS):
                        if self._replaces(pair, keys[1]):
                            media.update({k: pair["rejected_media"][k] for k in keys if k in pair["rejected_media"]})
                rows.append({"input_ids": ids, "labels": labels, **media})
        batch = self.base(rows)
        batch["pair_index"] = torch.tensor([pair["pair_index"] for pair in pairs], dtype=torch.long)
        for key, grid in (("image_copy_of", "image_grid_thw"), ("video_copy_of", "video_grid_thw")):
            counts = [len(pair.get(grid, ())) for pair in pairs]
            n_chosen = sum(counts)
            if not n_chosen:
                continue
            copy_of = list(range(n_chosen))
            start = 0
            for pair, n in zip(pairs, counts):
                own = self._replaces(pair, grid)
                copy_of += [len(copy_of) + k if own else start + k for k in range(n)]
                start += n
            batch[key] = torch.tensor(copy_of, dtype=torch.long)
        return batch


# --- the dpo row of vlft/stages.py ---------------------------------------------------------------------------------


def record_format(max_seq_length: int, options=None) -> RecordFormat:
    """Preference pairs under the over-long policy `options.truncation_mode` (default keep_start, `vlft dpo`'s)."""
    return PreferenceFormat(max_seq_length, getattr(options, "truncation_mode", "keep_start")).record_format()


def build_dataset(prepared, processor, *, media, max_length: int | None = None, thinking=None,
                  raw_pixels: bool = False) -> PreferenceDataset:
    """One item per pair of `prepared` (answers cut to `max_length` as keep_start cuts them); float pixels, or
    uint8 patch rows normalised on the device with `raw_pixels` (training's: train/core/model_inputs.py)."""
    return PreferenceDataset(prepared.samples, prepared.image_paths, processor, media=media,
                             video_sources=prepared.video_sources, max_length=max_length, raw_pixels=raw_pixels,
                             rejected_media=prepared.rejected_media, thinking=thinking)


def build_collator(processor, model=None, *, family=None, distributed: bool = False) -> PreferenceCollator:
    """Pairs -> [chosen; rejected] rows through the SFT collator matched to `model` (SFTCollator.for_model)."""
    return PreferenceCollator(SFTCollator.for_model(processor, model, family=family, distributed=distributed))
