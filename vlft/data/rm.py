"""The reward-model stage's data (`vlft rm`): preference pairs -> batches of [chosen rows; rejected rows] with a margin
per pair, and, for GRPO's `rm:` reward, (prompt, completion) pairs -> rows for a trained reward model.

Records are DPO's (data/preference.py: the LLaVA and the flat layout, media, history, reasoning, image-side pairs)
with one optional key more, TRL's `margin` (trl RewardTrainer: a number per pair; the loss asks the chosen reward to
exceed the rejected one by it):

    {"image": "cat.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}],
     "chosen": "A cat.", "rejected": "A dog.", "margin": 1.5}

A pair without `margin` gets 0, the plain Bradley-Terry loss. A pair whose prompt and longer answer exceed
--max_seq_length is left out (counted and listed), as TRL's RewardTrainer filters it: cutting an answer would move
the token the reward is read at (the last one). Items are data/dpo.py's (`prompt_ids`, `chosen_ids` / `chosen_mask`,
`rejected_ids` / `rejected_mask`, the media), so preview shows them as DPO pairs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vlft.constants import IGNORE_INDEX
from vlft.data.collator import SFTCollator
from vlft.data.dpo import PreferenceCollator, PreferenceDataset, PreferenceFormat
from vlft.data.encoding import EncodingError
from vlft.data.media import MediaError
from vlft.data.preference import PREFERENCE_KEYS, PreferenceSample, parse_preference_record
from vlft.data.prepare import RecordFormat
from vlft.data.sft import SFTDataset
from vlft.errors import Problem, VlftError

MARGIN_KEY = "margin"  # TRL's column name
REWARD_KEYS = PREFERENCE_KEYS | {MARGIN_KEY}


@dataclass
class RewardSample(PreferenceSample):
    margin: float = 0.0  # the record's `margin`, 0 when it gives none


def parse_reward_record(record: object, index: int, file: str) -> tuple[RewardSample | None, list[Problem]]:
    """One pair (data/preference.py `parse_preference_record`) and its optional `margin`: a finite number (a bool, a
    string or NaN is a problem naming the field). Returns (None, every problem) on any defect."""
    sample, problems = parse_preference_record(record, index, file)
    margin = record.get(MARGIN_KEY) if isinstance(record, dict) else None
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        record_id = None if record.get("id") is None else str(record["id"])
        problems = [*problems, Problem(file, index, MARGIN_KEY, f"'{MARGIN_KEY}' is {margin!r}, not a finite number",
                                       "give how far the chosen reward should exceed the rejected one as a number "
                                       "(e.g. 1.0), or leave the key out (0)", record_id)]
    if problems or sample is None:
        return None, problems
    fields = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample)}
    return RewardSample(**fields, margin=0.0 if margin is None else float(margin)), []


def reward_format(max_length: int) -> RecordFormat:
    """Reward pairs with their margin; the lengths are the pair's two sequences, never cut (a pair longer than
    `max_length` is dropped by data preparation)."""
    return RecordFormat("reward pair", parse_reward_record, PreferenceFormat(max_length, "drop").lengths,
                        keys=REWARD_KEYS, cache_key=f"reward:{max_length}")


class RewardDataset(PreferenceDataset):
    """data/dpo.py's PreferenceDataset items (one per pair; answers never cut) with `margin` (float) added."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        item[MARGIN_KEY] = float(getattr(self.samples[i], MARGIN_KEY, 0.0))
        return item


class RewardCollator(PreferenceCollator):
    """data/dpo.py's PreferenceCollator batch (2B rows, [chosen; rejected], `pair_index`, `image_copy_of` /
    `video_copy_of`) with `margin` [B] float32."""

    def __call__(self, pairs: list[dict]) -> dict:
        batch = super().__call__(pairs)
        batch[MARGIN_KEY] = torch.tensor([float(pair.get(MARGIN_KEY, 0.0)) for pair in pairs], dtype=torch.float32)
        return batch


# --- completions scored by a trained reward model (GRPO's rm: reward) --------------------------------------------


@dataclass(frozen=True)
class PromptMedia:
    """The prompt of one completion, for a reward model that encodes it with its own processor: `messages` (chat
    messages ending with a user turn), the record's resolved `images` and `videos` (data preparation's `image_paths`
    and `video_sources` entries), and `key`, equal for the completions of one prompt (its media load once)."""

    messages: list
    images: list
    videos: list
    key: object = None


class CompletionRows(SFTDataset):
    """(prompt, completion) -> one row for the SFT collator, built as the reward model's training built its chosen
    rows: the prompt with its images and videos sized by `media` (the reward model's own settings) and encoded by
    `processor`'s chat template, then the completion (`ChatEncoder.encode_preference`). Float pixels."""

    def __init__(self, processor, *, media, thinking=None):
        super().__init__([], [], processor, media=media, thinking=thinking)

    def rows(self, prompts: list[PromptMedia], completions: list[dict]) -> list[dict]:
        """One row per (prompt, completion): `input_ids` [L] (prompt + completion), `labels` [L] (all IGNORE_INDEX:
        nothing is learned), and the prompt's media tensors. `completions`: assistant messages ({"content": answer,
        optionally "reasoning_content"}); one the template cannot place after its prompt with its reasoning (thinking
        off) is encoded as its answer alone. VlftError when a medium cannot be read or a completion not encoded."""
        loaded: dict = {}
        rows = []
        for k, (prompt, completion) in enumerate(zip(prompts, completions)):
            key = ("key", prompt.key) if prompt.key is not None else ("row", k)
            if key not in loaded:
                item: dict = {}
                try:
                    specs = (self._images(list(prompt.images), item), self._videos(list(prompt.videos), item))
                except MediaError as err:  # the file changed after the start-up check
                    raise VlftError(f"reward model: {err}") from None
                loaded[key] = item, specs
            item, specs = loaded[key]
            try:
                pair = self.encoder.encode_preference(prompt.messages, (completion,), *specs)
            except EncodingError:
                if "reasoning_content" not in completion:
                    raise
                pair = self.encoder.encode_preference(prompt.messages, ({"content": completion["content"]},), *specs)
            ids = torch.tensor(list(pair.prompt_ids) + list(pair.completion_ids[0]), dtype=torch.long)
            rows.append({"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX), **item})
        return rows


# --- the rm row of vlft/stages.py ----------------------------------------------------------------------------------


def record_format(max_seq_length: int, options=None) -> RecordFormat:
    """Reward pairs (`reward_format`): over-long pairs are dropped, never cut."""
    return reward_format(max_seq_length)


def build_dataset(prepared, processor, *, media, max_length: int | None = None, thinking=None) -> RewardDataset:
    """One item per pair of `prepared` (`max_length` unused: pairs are never cut), float pixels."""
    return RewardDataset(prepared.samples, prepared.image_paths, processor, media=media,
                         video_sources=prepared.video_sources, rejected_media=prepared.rejected_media,
                         thinking=thinking)


def build_collator(processor, model=None, *, family=None, distributed: bool = False) -> RewardCollator:
    """Pairs -> [chosen; rejected] rows and margins through the SFT collator matched to `model`."""
    return RewardCollator(SFTCollator.for_model(processor, model, family=family, distributed=distributed))
