"""The GRPO stage's data: prompt records (with any extra keys for the reward functions) -> prompt items.

    {"id": "count-3", "image": "shapes_3.png",
     "conversations": [{"from": "human", "value": "<image>\\nHow many shapes are there?"}],
     "solution": "3"}                                   any other key (bbox, choices, ...) reaches the rewards too

A record whose conversation ends with a gpt turn and that has no `solution` gets that turn as its solution, and
the prompt is everything before it (2U1's layout). 2U1's flat form (`prompt` as a string) is read too. Media are
SFT's keys and are loaded exactly as in SFT (data/sft.py); a top-level `system` string is the prompt's system
message (data/llava.py), not a column. A prompt is never cut (a vision span would break): data preparation drops a
prompt longer than `--max_prompt_length` and counts it, and lists the reward columns once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from vlft.constants import IGNORE_INDEX
from vlft.data.llava import LLAVA_KEYS, parse_record
from vlft.data.media import MediaError
from vlft.data.prepare import RecordFormat
from vlft.data.reasoning import message_reasoning
from vlft.data.sft import SFTDataset
from vlft.errors import Problem, VlftError

RECORD_KEYS = LLAVA_KEYS | {"prompt"}  # the prompt's keys; every other key is a reward column
# the reward functions' own arguments (TRL's signature): a column may not take these names
RESERVED_COLUMNS = frozenset({"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"})


@dataclass
class PromptSample:
    index: int  # position in the data file
    id: str | None
    messages: list[dict]  # ends with a user turn
    images: list[str]
    videos: list = field(default_factory=list)
    columns: dict = field(default_factory=dict)  # every other key of the record (solution, bbox, ...), as written
    turn_offset: int = 0  # messages[k] is the record's conversations[k - turn_offset] (llava.Sample)


def parse_prompt_record(record: object, index: int, file: str) -> tuple[PromptSample | None, list[Problem]]:
    """One GRPO record -> PromptSample, or (None, every problem found)."""
    if not isinstance(record, dict):
        return parse_record(record, index, file)
    as_llava = dict(record)
    flat = "conversations" not in record and isinstance(record.get("prompt"), str)
    if flat:
        as_llava["conversations"] = [{"from": "human", "value": record["prompt"]}]
    sample, problems = parse_record(as_llava, index, file, require_answer=False)
    record_id = None if record.get("id") is None else str(record["id"])
    columns = {k: v for k, v in record.items() if k not in RECORD_KEYS}
    for key in sorted(RESERVED_COLUMNS & columns.keys()):
        problems.append(Problem(file, index, key, f"'{key}' is the name of a reward function argument",
                                "rename the key (reward functions receive it by that name)", record_id))
    for key, value in columns.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            problems.append(Problem(file, index, key, "the value is not plain JSON", "use strings, numbers, lists",
                                    record_id))
    if sample is None or problems:
        return None, problems
    messages = list(sample.messages)
    if messages[-1]["role"] == "assistant":
        # the reference solution is the answer: reasoning written with it (inline or reasoning_content) is left out
        answer = message_reasoning(messages.pop())[1]
        columns.setdefault("solution", answer)
        if not messages or messages[-1]["role"] != "user":
            return None, [Problem(file, index, "conversations", "no human turn before the final gpt turn",
                                  "give the prompt as a human turn", record_id)]
    return PromptSample(index, sample.id, messages, sample.images, sample.videos, columns, sample.turn_offset), []


def _prompt_lengths(encoder, sample: PromptSample, images, videos) -> tuple[int, ...]:
    return (len(encoder.encode_prompt(sample.messages, images, videos).input_ids),)


def _prompt_batch(encoder, items) -> list:
    """`_prompt_lengths` of many (sample, image specs, video specs) at once (ChatEncoder.lengths)."""
    found = encoder.lengths([(s.messages, images, videos) for s, images, videos in items], add_generation_prompt=True)
    return [n if isinstance(n, Exception) else (n,) for n in found]


PROMPT = RecordFormat("prompt", parse_prompt_record, _prompt_lengths, keys=RECORD_KEYS, columns=True,
                      cache_key="prompt", batch_lengths=_prompt_batch)


class PromptDataset(SFTDataset):
    """Prepared prompt samples -> one dict per prompt: `prompt_ids` [P] (ending where an answer starts:
    ChatEncoder.encode_prompt), the media as the SFT dataset gives them, and `record` (the index into the dataset:
    the key to the sample's columns for the reward functions)."""

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        item: dict = {"record": i}
        try:
            image_specs = self._images(self.image_paths[i], item)
            video_specs = self._videos(self.video_sources[i], item)
        except MediaError as err:
            raise VlftError(f"record {sample.index} (id {sample.id!r}): {err}") from None
        ids = self.encoder.encode_prompt(sample.messages, image_specs, video_specs).input_ids
        item["prompt_ids"] = torch.tensor(ids, dtype=torch.long)
        return item


MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def generation_rows(items: list[dict], num_generations: int) -> list[dict]:
    """Each prompt item repeated `num_generations` times (generations of one prompt contiguous), as SFT collator
    items: ids = the prompt, labels all IGNORE_INDEX, the prompt's media with every copy."""
    rows = []
    for item in items:
        row = {"input_ids": item["prompt_ids"], "labels": torch.full_like(item["prompt_ids"], IGNORE_INDEX),
               **{k: item[k] for k in MEDIA_KEYS if k in item}}
        rows += [row] * num_generations
    return rows


def training_rows(items: list[dict], num_generations: int, completions: list[torch.Tensor],
                  masks: list[torch.Tensor]) -> list[dict]:
    """Prompt + completion rows for the log-prob pass: labels are the completion ids where `masks` is 1."""
    rows = []
    for k, row in enumerate(generation_rows(items, num_generations)):
        ids, mask = completions[k], masks[k]
        rows.append({**row, "input_ids": torch.cat([row["input_ids"], ids]),
                     "labels": torch.cat([row["labels"], ids.masked_fill(mask == 0, IGNORE_INDEX)])})
    return rows


def first_items(batch: list[dict]) -> list[dict]:
    """The DataLoader's collate function for GRPO: the items themselves (the trainer builds rows per step)."""
    return batch


# --- the grpo row of vlft/stages.py --------------------------------------------------------------------------------


def record_format(max_seq_length: int, options=None) -> RecordFormat:
    """GRPO prompts (PROMPT); their limit, --max_prompt_length, is applied by `vlft grpo` itself."""
    return PROMPT


def build_dataset(prepared, processor, *, media, max_length: int | None = None, thinking=None) -> PromptDataset:
    """One item per prompt of `prepared`, float pixels (`max_length` unused: prompts are never cut)."""
    return PromptDataset(prepared.samples, prepared.image_paths, processor, media=media,
                         video_sources=prepared.video_sources, thinking=thinking)


def build_collator(processor, model=None, *, family=None, distributed: bool = False):
    """Prompts -> a left-padded batch for generation (the rollout side; the trainer builds its training rows with
    a right-padded SFT collator from the completions: `training_rows`)."""
    from vlft.data.collator import SFTCollator

    return SFTCollator.for_model(processor, model, family=family, distributed=distributed, padding_side="left")
