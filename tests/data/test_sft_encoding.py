"""Token ids and labels of every demo record, checked against independent oracles:
the processor's own call on the template text (ids, pixels, grids) and the decoded labelled spans
(exactly the assistant texts, each followed by <|im_end|>)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA

from vlft.constants import IGNORE_INDEX, IM_END
from vlft.data.encoding import ChatEncoder, VisionSpec
from vlft.data.llava import parse_record
from vlft.data.media import fit_image, load_image
from vlft.data.prepare import prepare_sft_data
from vlft.data.sft import SFTDataset

MIN_PIXELS, MAX_PIXELS = 3136, 12845056
RECORDS = json.loads(DEMO_DATA.read_text())


@pytest.fixture(scope="module")
def demo(processor):
    checked = prepare_sft_data(str(DEMO_DATA), processor=processor, image_folder=str(DEMO_IMAGES),
                             media=DEMO_MEDIA, max_seq_length=4096)
    dataset = SFTDataset(checked.samples, checked.image_paths, processor, media=DEMO_MEDIA)
    return checked, dataset


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for tok in labels.tolist():
        if tok == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
        else:
            current.append(tok)
    if current:
        runs.append(current)
    return runs


def test_every_demo_record_is_usable(demo):
    checked, dataset = demo
    assert len(dataset) == len(RECORDS)
    assert [s.id for s in checked.samples] == [r["id"] for r in RECORDS]
    assert checked.lengths == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=[r["id"] for r in RECORDS])
def test_labels_are_exactly_the_assistant_turns(demo, processor, i):
    _, dataset = demo
    item = dataset[i]
    ids, labels = item["input_ids"], item["labels"]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    answers = [t["value"] + IM_END for t in RECORDS[i]["conversations"] if t["from"] == "gpt"]
    decoded = [processor.tokenizer.decode(run) for run in labelled_runs(labels)]
    assert decoded == answers
    # vision tokens never carry a label
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not trained[ids == image_pad].any()


@pytest.mark.parametrize("i", range(len(RECORDS)), ids=[r["id"] for r in RECORDS])
def test_ids_and_pixels_match_the_processor(demo, processor, i):
    """Our single-render encoding gives what the processor gives for the template's text."""
    checked, dataset = demo
    item = dataset[i]
    sample = checked.samples[i]
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    images = [fit_image(load_image(p), factor=16, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
              for p in checked.image_paths[i]]
    ref = processor(text=[text], images=images or None, do_resize=False, return_tensors="pt")
    assert torch.equal(item["input_ids"], ref["input_ids"][0])
    if images:
        assert torch.equal(item["image_grid_thw"], ref["image_grid_thw"])
        assert torch.equal(item["pixel_values"], ref["pixel_values"])  # bit for bit
        image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        expected = int((item["image_grid_thw"].prod(-1) // 4).sum())
        assert int((item["input_ids"] == image_pad).sum()) == expected
    else:
        assert "pixel_values" not in item


def test_system_turn_overrides_default_prompt(processor):
    enc = ChatEncoder(processor)
    default = "You are a helpful assistant."
    plain, _ = parse_record(RECORDS[8], 8, "demo")  # text_only
    custom, _ = parse_record(RECORDS[9], 9, "demo")  # text_only_multi_turn_system
    plain_text = processor.tokenizer.decode(enc.encode(plain.messages, []).input_ids)
    custom_text = processor.tokenizer.decode(enc.encode(custom.messages, []).input_ids)
    assert plain_text.count(default) == 1
    assert "Answer in one sentence." in custom_text and custom_text.count("<|im_start|>system") == 1


def test_image_pads_expand_per_image(processor):
    enc = ChatEncoder(processor)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
        {"role": "assistant", "content": "Two."},
    ]
    out = enc.encode(messages, [VisionSpec((1, 2, 6)), VisionSpec((1, 4, 5))])  # 12 / 4 and 20 / 4 tokens
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    ids = out.input_ids
    spans, k = [], 0
    while k < len(ids):
        if ids[k] == start:
            n = 0
            while ids[k + 1 + n] == pad:
                n += 1
            spans.append(n)
        k += 1
    assert spans == [3, 5]
    assert len(out.labels) == len(ids)


def test_whitespace_inside_answers_is_kept(processor):
    enc = ChatEncoder(processor)
    answer = "Line one.\n\n  Line two  "
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": answer}]
    out = enc.encode(messages, [])
    runs = labelled_runs(torch.tensor(out.labels))
    assert [processor.tokenizer.decode(r) for r in runs] == [answer + IM_END]


PROMPT = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
          {"role": "assistant", "content": "A square."},
          {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_prompt_for_generation_ends_with_the_assistant_header(family, tiny_model_factory):
    from vlft.models.loading import load_processor

    processor = load_processor(str(tiny_model_factory(family)))
    out = ChatEncoder(processor).encode_prompt(PROMPT, [VisionSpec((1, 2, 2))])
    tok = processor.tokenizer
    text = tok.decode(out.input_ids)
    # the template's own generation prompt (a 1x2x2 grid expands to one merged image token, as in the template)
    assert text == processor.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert set(out.labels) == {-100}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_preference_pairs_split_into_prompt_and_masked_completions(family, tiny_model_factory):
    from vlft.models.loading import load_processor

    processor = load_processor(str(tiny_model_factory(family)))
    enc, tok = ChatEncoder(processor), processor.tokenizer
    image = [VisionSpec((1, 4, 6))]
    chosen, rejected = "It is red.", "Blue, I think, and\n  round."
    pair = enc.encode_preference(PROMPT, [chosen, rejected], image)
    assert pair.prompt_ids == enc.encode_prompt(PROMPT, image).input_ids
    for text, ids, mask in zip((chosen, rejected), pair.completion_ids, pair.completion_masks):
        full = PROMPT + [{"role": "assistant", "content": text}]
        sft = enc.encode_conversation(full, image)
        # the same tokens SFT trains on, and the completion mask is exactly SFT's labels after the prompt
        assert pair.prompt_ids + ids == sft.input_ids
        n = len(pair.prompt_ids)
        assert mask == [int(lab != -100) for lab in sft.labels[n:]]
        learned = [t for t, m in zip(ids, mask) if m]
        assert tok.decode(learned) == text + "<|im_end|>"  # the answer and its end-of-turn, nothing else
        assert tok.decode(pair.prompt_ids + ids) == processor.apply_chat_template(full, tokenize=False).replace(
            "<|image_pad|>", "<|image_pad|>" * 6)
    with pytest.raises(ValueError):
        enc.encode_preference(PROMPT, [], image)


def with_double_newline_token(processor):
    """`processor` with "\n\n" as one token, as in the real Qwen vocabularies (the tiny BPE has no such merge): the
    merge goes first, its token takes the first id after the BPE vocabulary and the added tokens move up by one."""
    import copy

    from tokenizers import Tokenizer

    processor = copy.deepcopy(processor)
    tok = processor.tokenizer
    state = json.loads(tok.backend_tokenizer.to_str())
    newline = "\u010a"  # byte-level "\n"
    new_id = min(t["id"] for t in state["added_tokens"])
    for added in state["added_tokens"]:
        added["id"] += 1
    state["model"]["vocab"][newline * 2] = new_id
    state["model"]["merges"].insert(0, [newline, newline])
    merged = type(tok)(tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token=tok.eos_token,
                       pad_token=tok.pad_token, unk_token=None, chat_template=tok.chat_template)
    assert merged("a\n\nb")["input_ids"] == merged("a")["input_ids"] + [new_id] + merged("b")["input_ids"]
    assert merged.decode([new_id]) == "\n\n"
    processor.tokenizer = merged
    return processor


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("template", ["qwen3_5_think", "qwen3_6", "qwen3_8", "qwen3_5_nothink", "qwen3_vl"])
def test_generation_prompt_is_what_a_trained_answer_follows(template, enable_thinking, tiny_model_factory):
    """vlft's prompt for generation (predict, GRPO, DPO's prompt) is the template's own generation prompt for the
    thinking mode asked (--enable_thinking; unset: the template's default), and a trained answer of that mode
    follows it token for token, with the real tokenizer's "\\n\\n" token: thinking on, `...<think>\\n` then the
    reasoning; thinking off, `...<think>\\n\\n</think>\\n\\n` then the answer. DPO's prompt ids are the same."""
    from vlft.data.reasoning import Thinking
    from vlft.errors import VlftError
    from vlft.models.loading import load_processor
    from vlft.models.tiny import load_chat_template

    processor = with_double_newline_token(load_processor(str(tiny_model_factory("qwen3_5"))))
    processor.chat_template = load_chat_template("qwen3_5", template)
    thinking = Thinking(enable_thinking=enable_thinking)
    if template == "qwen3_vl" and enable_thinking is not None:
        with pytest.raises(VlftError, match="--enable_thinking: .* no thinking switch"):
            ChatEncoder(processor, thinking)
        return
    enc, tok = ChatEncoder(processor, thinking), processor.tokenizer
    image = [VisionSpec((1, 2, 2))]  # one merged token: the template's single <|image_pad|> stays as it is
    kwargs = thinking.template_kwargs()
    own = processor.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True, **kwargs)
    prompt = enc.encode_prompt(PROMPT, image)
    assert tok.decode(prompt.input_ids) == own  # oracle: the template's own generation prompt
    assert enc.thinks == own.endswith("<think>\n")
    reasoning = {"reasoning_content": "Look at it."} if enc.thinks else {}
    answer = {"role": "assistant", "content": "It is red.", **reasoning}
    sft = enc.encode_conversation(PROMPT + [answer], image)
    n = len(prompt.input_ids)
    assert sft.input_ids[:n] == prompt.input_ids  # the same ids, "\n\n" tokens included
    generated = "Look at it.\n</think>\n\nIt is red." if enc.thinks else "It is red."
    assert tok.decode(sft.input_ids[n:]) == generated + IM_END + "\n"
    first = n - 2 if enc.thinks else n  # the reasoning is learned from its <think> tag, which the prompt holds
    learned = [i for i, lab in enumerate(sft.labels) if lab != IGNORE_INDEX and i >= n - 4]  # PROMPT has history
    assert learned == list(range(first, len(sft.input_ids) - 1))  # then "\n", unlearned
    pair = enc.encode_preference(PROMPT, [answer, "Blue."], image)
    assert pair.prompt_ids == prompt.input_ids
    assert tok.decode(pair.completion_ids[0]) == generated + IM_END + "\n"
    blue = "\n</think>\n\nBlue." if enc.thinks else "Blue."  # thinking on: the policy closes an empty block itself
    assert tok.decode(pair.completion_ids[1]) == blue + IM_END + "\n"
    assert [m[-1] for m in pair.completion_masks] == [0, 0] and all(sum(m) == len(m) - 1 for m in pair.completion_masks)
