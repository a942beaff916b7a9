"""ChatEncoder.lengths (one batch tokenisation for many records, data preparation's path) gives, record by record,
the length `encode` gives, and its EncodingErrors in place."""
from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_DATA, REPO
from vlft.data.encoding import ChatEncoder, EncodingError, VisionSpec
from vlft.data.llava import parse_record
from vlft.data.reasoning import Thinking
from vlft.models.loading import load_processor


def conversations(path):
    samples = []
    for i, record in enumerate(json.loads(path.read_text())):
        sample, problems = parse_record(record, i, str(path), require_answer=False)
        if sample is not None:
            samples.append(sample)
    return samples


def specs(sample):
    images = [VisionSpec((1, 4 + 2 * k, 6)) for k in range(len(sample.images))]
    videos = [VisionSpec((2, 4, 4), (0, 1, 2, 3), 2.0, 2.0) for _ in sample.videos]
    return images, videos


@pytest.mark.parametrize("family, data, thinking", [
    ("qwen2_vl", DEMO_DATA, None),
    ("qwen2_vl", REPO / "data_examples" / "llava_video_demo.json", None),
    ("qwen3_vl", REPO / "data_examples" / "llava_video_demo.json", None),
    ("qwen3_5", REPO / "data_examples" / "thinking_demo.json", None),
    ("qwen3_5", REPO / "data_examples" / "thinking_demo.json", Thinking(enable_thinking=False)),
])
@pytest.mark.parametrize("generation", [False, True])
def test_batch_lengths_equal_one_encode_per_record(family, data, thinking, generation, tiny_model_factory):
    encoder = ChatEncoder(load_processor(str(tiny_model_factory(family))), thinking)
    samples = conversations(data)
    if generation:  # prompts: the conversation up to its last user turn
        samples = [s for s in samples if s.messages[-1]["role"] == "assistant"]
        items = [(s.messages[:-1], *specs(s)) for s in samples]
    else:
        items = [(s.messages, *specs(s)) for s in samples]
    batch = encoder.lengths(items, add_generation_prompt=generation)
    one = []
    for messages, images, videos in items:
        try:
            one.append(len(encoder.encode(messages, images, videos, add_generation_prompt=generation).input_ids))
        except EncodingError as e:
            one.append(type(e))
    assert [type(n) if isinstance(n, EncodingError) else n for n in batch] == one
    assert len(batch) >= 4 and all(isinstance(n, int) and n > 0 for n in batch)


def test_a_record_the_template_rewrites_is_an_error_in_its_place(tiny_model_factory):
    encoder = ChatEncoder(load_processor(str(tiny_model_factory("qwen3_5"))))
    user = {"role": "user", "content": [{"type": "text", "text": "q"}]}
    good = [user, {"role": "assistant", "content": "fine"}]
    bad = [user, {"role": "assistant", "content": "Sure. <think>x</think>7"}]  # Qwen3.5 would move the text
    with pytest.raises(EncodingError, match="text before <think>"):
        encoder.encode(bad)
    out = encoder.lengths([(good, [], []), (bad, [], []), (good, [], [])])
    assert out[0] == out[2] == len(encoder.encode(good).input_ids)
    assert isinstance(out[1], EncodingError) and out[1].turn == 1
