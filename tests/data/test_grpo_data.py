"""GRPO prompt records: extra keys become reward columns, 2U1's final gpt turn becomes the solution, reserved
names are refused by field, and a prompt over --max_prompt_length is dropped and named by that flag."""
from __future__ import annotations

import json

import pytest
from conftest import DEMO_MEDIA

from vlft.data.grpo import PROMPT, parse_prompt_record
from vlft.data.prepare import prepare_data
from vlft.errors import DataError

ASK = [{"from": "human", "value": "<image>\nHow many?"}]


def test_extra_keys_become_columns_and_a_final_gpt_turn_the_solution():
    sample, found = parse_prompt_record({"id": "a", "image": "x.png", "conversations": ASK, "bbox": [1, 2, 3, 4]},
                                        0, "f")
    assert not found and sample.columns == {"bbox": [1, 2, 3, 4]} and sample.messages[-1]["role"] == "user"
    sample, _ = parse_prompt_record({"image": "x.png", "conversations": [*ASK, {"from": "gpt", "value": "3"}]}, 1, "f")
    assert sample.columns == {"solution": "3"} and [m["role"] for m in sample.messages] == ["user"]
    sample, _ = parse_prompt_record({"image": "x.png", "conversations": [*ASK, {"from": "gpt", "value": "3"}],
                                     "solution": "three"}, 2, "f")
    assert sample.columns == {"solution": "three"}  # a given solution wins over the gpt turn
    sample, _ = parse_prompt_record({"prompt": "Two plus two?", "solution": "4"}, 3, "f")  # 2U1's flat form
    assert sample.messages == [{"role": "user", "content": [{"type": "text", "text": "Two plus two?"}]}]


@pytest.mark.parametrize("key", ["completions", "prompts", "completion_ids"])
def test_reward_argument_names_are_refused_as_columns(key):
    sample, found = parse_prompt_record({"id": "a", "image": "x.png", "conversations": ASK, key: "x"}, 4, "p.json")
    assert sample is None and [p.field for p in found] == [key]
    assert "name of a reward function argument" in str(found[0])


def test_a_long_prompt_is_dropped_naming_max_prompt_length(processor, tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"id": "short", "prompt": "Hi?"}, {"id": "long", "prompt": "word " * 200}]))
    data = prepare_data(str(path), PROMPT, processor=processor, image_folder=None, media=DEMO_MEDIA,
                        max_seq_length=64, length_flag="--max_prompt_length")
    assert [s.id for s in data.samples] == ["short"] and [p.index for p in data.overlong] == [1]
    assert "--max_prompt_length 64" in str(data.overlong[0])
    with pytest.raises(DataError, match="exceed --max_prompt_length"):
        prepare_data(str(path), PROMPT, processor=processor, image_folder=None, media=DEMO_MEDIA,
                     max_seq_length=64, reject_overlong=True, length_flag="--max_prompt_length")
