"""Reasoning (thinking) answers encoded with the model's own template, checked against TRL's training templates.

Oracle: TRL's Qwen3.5 `*_training` templates mark what to learn with `{% generation %}`; transformers turns that into
`assistant_masks` (`apply_chat_template(..., return_assistant_tokens_mask=True)`), independently of vlft's markers.
On the tiny Qwen3.5 with each Qwen3.5 template TRL ships, vlft's learned tokens equal that mask, except where vlft
differs by design, each asserted here:
  1. the newline after <|im_end|> is not learned (never generated: generation stops at <|im_end|>);
  2. an empty think block before a plain answer is context unless --train_empty_think (ms-swift's ignore_empty_think);
  3. the inference templates (think / nothink) drop the reasoning of turns before the last user message, so those
     turns are rendered, and learned, as the answer alone; the training variants keep every block.
"""
from __future__ import annotations

import pytest

from vlft.constants import IGNORE_INDEX, IM_END
from vlft.data.encoding import ANSWER, REASONING, ChatEncoder, VisionSpec
from vlft.data.reasoning import Thinking

TEMPLATES = ["qwen3_5_think", "qwen3_5_nothink", "qwen3_5_think_training", "qwen3_5_nothink_training"]
IMAGE = {"type": "image"}
VIDEO = {"type": "video"}


def user(text, *media):
    return {"role": "user", "content": [*media, {"type": "text", "text": text}]}


def answer(text, reasoning=None, inline=False):
    if reasoning is None:
        return {"role": "assistant", "content": text}
    if inline:
        return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{text}"}
    return {"role": "assistant", "content": text, "reasoning_content": reasoning}


# name -> (messages, images, videos); reasoning given as the field, the inline twin is built by `inline`
RECORDS = {
    "reasoning": ([user("What is 3+4?"), answer("7", "Three and four make seven.")], 0, 0),
    "plain": ([user("Name a colour."), answer("Red.")], 0, 0),
    "history": ([user("What is 3+4?"), answer("7", "Add them."), user("And 5+5?"), answer("10", "Ten.")], 0, 0),
    "history_plain_last": ([user("What is 3+4?"), answer("7", "Add them."), user("Thanks!"), answer("Welcome.")], 0, 0),
    "image": ([{"role": "system", "content": "Be brief."}, user("What shape?", IMAGE),
               answer("A square.", "Four equal sides.")], 1, 0),
    "video": ([user("What happens?", VIDEO), answer("It moves.", "The frames differ.")], 0, 1),
}


def inline(messages):
    out = []
    for m in messages:
        if "reasoning_content" in m:
            m = answer(m["content"], m["reasoning_content"], inline=True)
        out.append(m)
    return out


@pytest.fixture(scope="module")
def qwen3_5(tiny_model_factory):
    from vlft.models.loading import load_processor

    return load_processor(str(tiny_model_factory("qwen3_5")))


def processor_with(processor, template):
    import copy

    from vlft.models.tiny import load_chat_template

    processor = copy.copy(processor)
    processor.chat_template = load_chat_template("qwen3_5", template)
    return processor


def specs(n_images, n_videos):
    # one image token (grid 1x2x2 merged 2x2); a two-frame video of 2x4 patches: Qwen3.5's processor writes a
    # timestamp and vision marks around its tokens, which the oracle gets through the same expansion
    return [VisionSpec((1, 2, 2))] * n_images, [VisionSpec((1, 2, 4), indices=(0, 1), source_fps=2.0, fps=2.0)] * n_videos


def trl_oracle(processor, enc, messages, images, videos, training_template):
    """ids and mask of TRL's training template (its {% generation %} spans), each placeholder expanded by the
    processor's own replacement (enc.expansion) and masked."""
    out = processor.tokenizer.apply_chat_template(messages, chat_template=training_template, tokenize=True,
                                                  return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    pads = {enc.image_pad_id: ("image", images), enc.video_pad_id: ("video", videos)}
    seen = dict.fromkeys(pads, 0)
    out_ids, out_mask = [], []
    for tok, m in zip(ids, mask):
        if tok in pads:
            kind, given = pads[tok]
            piece = enc.expansion(kind, given, seen[tok])
            seen[tok] += 1
            out_ids += piece
            out_mask += [0] * len(piece)
        else:
            out_ids.append(tok)
            out_mask.append(m)
    return out_ids, out_mask


def learned_runs(tok, labels):
    runs, current = [], []
    for lab in [*labels, IGNORE_INDEX]:
        if lab == IGNORE_INDEX:
            if current:
                runs.append(tok.decode(current))
            current = []
        else:
            current.append(lab)
    return runs


def expected_runs(messages, template, train_empty_think):
    """What vlft learns of each assistant turn, written out: the think block from <think> (a turn with reasoning
    rendered with its block; an empty block only with train_empty_think), the answer, <|im_end|>."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    runs = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        has_block = template.endswith("_training") or i > last_user  # difference 3
        reasoning = m.get("reasoning_content")
        if has_block and reasoning:
            runs.append(f"<think>\n{reasoning}\n</think>\n\n{m['content']}{IM_END}")
        elif has_block and train_empty_think:
            runs.append(f"<think>\n\n</think>\n\n{m['content']}{IM_END}")
        else:
            runs.append(f"{m['content']}{IM_END}")
    return runs


@pytest.mark.parametrize("train_empty_think", [False, True])
@pytest.mark.parametrize("template", TEMPLATES)
def test_learned_tokens_equal_trl_generation_mask(template, train_empty_think, qwen3_5):
    processor = processor_with(qwen3_5, template)
    tok = processor.tokenizer
    enc = ChatEncoder(processor, Thinking(train_empty_think=train_empty_think))
    oracle_template = processor_with(qwen3_5, template.removesuffix("_training") + "_training").chat_template
    im_end = tok.convert_tokens_to_ids(IM_END)
    for name, (messages, n_images, n_videos) in RECORDS.items():
        images, videos = specs(n_images, n_videos)
        got = enc.encode(messages, images, videos)
        assert learned_runs(tok, got.labels) == expected_runs(messages, template, train_empty_think), name
        trl_ids, trl_mask = trl_oracle(processor, enc, messages, images, videos, oracle_template)
        history_reasoning = [i for i, m in enumerate(messages)
                             if m.get("reasoning_content") and i < max(k for k, x in enumerate(messages)
                                                                        if x["role"] == "user")]
        if not template.endswith("_training") and history_reasoning:
            # difference 3: the inference template leaves the earlier turns' think blocks out of the text itself
            assert got.input_ids != trl_ids and len(got.input_ids) < len(trl_ids), name
            assert enc.render(messages).dropped == tuple(history_reasoning), name
            continue
        assert got.input_ids == trl_ids, name
        vlft_mask = [int(lab != IGNORE_INDEX) for lab in got.labels]
        # difference 1: the newline after each <|im_end|> of a learned turn
        after_end = {i + 1 for i, t in enumerate(trl_ids[:-1]) if t == im_end and trl_mask[i]}
        # difference 2: the empty blocks of plain answers
        empty = set()
        if not train_empty_think:
            text_positions = _empty_block_positions(tok, trl_ids)
            empty = {i for i in text_positions if trl_mask[i]}
        differs = {i for i, (a, b) in enumerate(zip(vlft_mask, trl_mask)) if a != b}
        assert differs == after_end | empty, (name, sorted(differs), sorted(after_end | empty))
        assert all(trl_mask[i] and not vlft_mask[i] for i in differs), name


def _empty_block_positions(tok, ids):
    """Token positions of every `<think>\\n\\n</think>\\n\\n` (an empty block) in ids."""
    think, close = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    out = set()
    for i, t in enumerate(ids):
        if t != think:
            continue
        j = ids.index(close, i)
        if tok.decode(ids[i + 1:j]).strip() == "":
            k = j + 1
            while k < len(ids) and tok.decode([ids[k]]).strip() == "":
                k += 1
            out.update(range(i, k))
    return out


@pytest.mark.parametrize("template", [*TEMPLATES, "qwen3_6", "qwen3_8"])
def test_inline_and_reasoning_content_give_identical_ids_and_labels(template, qwen3_5):
    """The same answer with its reasoning inline (`<think>R</think>A`) and in `reasoning_content`: the same ids and
    labels, on every thinking template TRL ships for Qwen3.5 (qwen3_8 reads only the field: vlft splits the inline
    form itself)."""
    enc = ChatEncoder(processor_with(qwen3_5, template))
    for name, (messages, n_images, n_videos) in RECORDS.items():
        images, videos = specs(n_images, n_videos)
        a, b = enc.encode(messages, images, videos), enc.encode(inline(messages), images, videos)
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels), name
        if any(m.get("reasoning_content") for m in messages[-1:]):
            assert REASONING in enc.encode(messages, images, videos, parts=True).parts, name


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_templates_without_reasoning_train_it_as_plain_text(family, tiny_model_factory):
    """A template that knows no reasoning: the inline block is learned as the text it is; the field is written in
    Qwen3's layout, so a record in that layout gives the same ids either way; parts still mark the block."""
    from vlft.models.loading import load_processor

    processor = load_processor(str(tiny_model_factory(family)))
    enc, tok = ChatEncoder(processor), processor.tokenizer
    assert not enc.reasoning.knows_reasoning
    messages = RECORDS["reasoning"][0]
    a, b = enc.encode(messages, parts=True), enc.encode(inline(messages), parts=True)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert learned_runs(tok, a.labels) == [f"<think>\nThree and four make seven.\n</think>\n\n7{IM_END}"]
    kinds = [tok.decode([i]) for i, p in zip(a.input_ids, a.parts) if p == REASONING]
    assert "".join(kinds) == "<think>\nThree and four make seven.\n</think>\n\n"
    assert "".join(tok.decode([i]) for i, p in zip(a.input_ids, a.parts) if p == ANSWER) == "7" + IM_END


def test_parts_mark_reasoning_and_answer(qwen3_5):
    """parts: the think block (learned or an unlearned empty one) is REASONING, the answer and <|im_end|> ANSWER."""
    enc = ChatEncoder(qwen3_5)
    tok = qwen3_5.tokenizer
    for messages, block, learned in ((RECORDS["reasoning"][0], "<think>\nThree and four make seven.\n</think>\n\n", True),
                                     (RECORDS["plain"][0], "<think>\n\n</think>\n\n", False)):
        got = enc.encode(messages, parts=True)
        reasoning = [i for i, p in enumerate(got.parts) if p == REASONING]
        assert tok.decode([got.input_ids[i] for i in reasoning]) == block
        assert all((got.labels[i] != IGNORE_INDEX) == learned for i in reasoning)
        answer_text = messages[-1]["content"] + IM_END
        assert tok.decode([t for t, p in zip(got.input_ids, got.parts) if p == ANSWER]) == answer_text


@pytest.mark.parametrize("bad, field", [
    ("Sure. <think>x</think>7", "text before <think>"),
    ("<think>x</think>7</think>", "2 </think>"),
    ("<think>unclosed 7", "never closes"),
])
def test_answers_the_template_would_rewrite_are_refused_with_the_turn(bad, field, qwen3_5):
    from vlft.data.encoding import EncodingError

    enc = ChatEncoder(qwen3_5)
    messages = [user("q"), answer("fine"), user("q2"), {"role": "assistant", "content": bad}]
    with pytest.raises(EncodingError, match=field) as err:
        enc.encode(messages)
    assert err.value.turn == 3 and err.value.hint


def test_flags_a_template_cannot_honour_are_refused(qwen3_5, tiny_model_factory):
    from vlft.errors import VlftError
    from vlft.models.loading import load_processor

    with pytest.raises(VlftError, match="--preserve_thinking: .*drops the reasoning.*qwen3_6"):
        ChatEncoder(qwen3_5, Thinking(preserve_thinking=True))
    plain = load_processor(str(tiny_model_factory("qwen2_5_vl")))
    with pytest.raises(VlftError, match="--train_empty_think: .*no empty think block"):
        ChatEncoder(plain, Thinking(train_empty_think=True))
    with pytest.raises(VlftError, match="--enable_thinking: .*thinking model"):
        ChatEncoder(plain, Thinking(enable_thinking=False))


def test_preserve_thinking_keeps_and_learns_history_reasoning(qwen3_5):
    """Qwen3.6's template with preserve_thinking: earlier turns keep their think block, and vlft learns it."""
    enc = ChatEncoder(processor_with(qwen3_5, "qwen3_6"), Thinking(preserve_thinking=True))
    messages = RECORDS["history"][0]
    assert enc.render(messages).dropped == ()
    assert learned_runs(qwen3_5.tokenizer, enc.encode(messages).labels) == [
        f"<think>\nAdd them.\n</think>\n\n7{IM_END}", f"<think>\nTen.\n</think>\n\n10{IM_END}"]
    default = ChatEncoder(processor_with(qwen3_5, "qwen3_6"))
    assert default.render(messages).dropped == (1,)


def _preference_file(tmp_path, records):
    import json

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    return str(path)


PAIRS = [
    {"id": "inline", "prompt": "What is 3+4?", "chosen": "<think>\nAdd them.\n</think>\n\n7",
     "rejected": "<think>\nGuess.\n</think>\n\n8"},
    {"id": "field", "prompt": "What is 3+4?",
     "chosen": {"from": "gpt", "value": "7", "reasoning_content": "Add them."}, "rejected": "8"},
]


def test_dpo_pairs_carry_reasoning_after_a_thinking_prompt(qwen3_5, tmp_path):
    """DPO with a thinking template (thinking on by default): the prompt ends `<think>\\n`; a chosen answer's
    reasoning, written inline or in reasoning_content, is part of its completion and of its mask, the same ids either
    way; a plain rejected answer's completion closes an empty block, as the policy would generate it."""
    from conftest import DEMO_MEDIA

    from vlft.data.dpo import PreferenceDataset, PreferenceFormat
    from vlft.data.prepare import prepare_data

    tok = qwen3_5.tokenizer
    data = prepare_data(_preference_file(tmp_path, PAIRS), PreferenceFormat(4096, "keep_start").record_format(),
                        processor=qwen3_5, image_folder=None, media=DEMO_MEDIA, max_seq_length=4096)
    ds = PreferenceDataset(data.samples, data.image_paths, qwen3_5, media=DEMO_MEDIA, max_length=4096)
    inline_item, field_item = ds[0], ds[1]
    assert tok.decode(inline_item["prompt_ids"]).endswith("<|im_start|>assistant\n<think>\n")
    for item in (inline_item, field_item):
        assert tok.decode(item["chosen_ids"]) == "Add them.\n</think>\n\n7<|im_end|>\n"
        assert item["chosen_mask"].tolist() == [1] * (len(item["chosen_ids"]) - 1) + [0]
    assert inline_item["chosen_ids"].tolist() == field_item["chosen_ids"].tolist()
    assert tok.decode(inline_item["rejected_ids"]) == "Guess.\n</think>\n\n8<|im_end|>\n"
    assert tok.decode(field_item["rejected_ids"]) == "\n</think>\n\n8<|im_end|>\n"


def test_dpo_reasoning_with_thinking_off_is_named_at_start_up(qwen3_5, tmp_path):
    """--enable_thinking false closes the think block in the prompt, so an answer with reasoning cannot follow it:
    the record and the answer are named before any model loads."""
    from conftest import DEMO_MEDIA

    from vlft.data.dpo import PreferenceFormat
    from vlft.data.prepare import prepare_data
    from vlft.errors import DataError

    with pytest.raises(DataError) as err:
        prepare_data(_preference_file(tmp_path, PAIRS), PreferenceFormat(4096, "keep_start").record_format(),
                     processor=qwen3_5, image_folder=None, media=DEMO_MEDIA, max_seq_length=4096,
                     thinking=Thinking(enable_thinking=False))
    text = str(err.value)
    assert "record 0 (id 'inline'), field 'chosen'" in text and "record 1 (id 'field'), field 'chosen'" in text
    assert "--enable_thinking true" in text and "pairs.json" in text


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_train_empty_think_is_sft_only(stage, tiny_model_factory, tmp_path):
    """--train_empty_think decides which tokens SFT learns; DPO and GRPO refuse it before anything loads."""
    from conftest import REPO

    from vlft.errors import VlftError

    run = __import__(f"vlft.train.{stage}.run", fromlist=["run"]).run
    data = REPO / "data_examples" / f"{stage}_demo.json"
    with pytest.raises(VlftError, match=f"--train_empty_think decides which tokens SFT learns; in vlft {stage}"):
        run(["--model_id", str(tiny_model_factory("qwen3_5")), "--data_path", str(data), "--train_empty_think", "true",
             "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    assert not (tmp_path / "o").exists()
