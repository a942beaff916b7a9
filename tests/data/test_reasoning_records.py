"""Records carrying reasoning: LLaVA turns, preference answers and the other formats, inline (<think>R</think>A) or in
a `reasoning_content` / `reasoning` field. Both forms parse to the (reasoning, answer) pair the Qwen3 / Qwen3.5 chat
templates read (data/reasoning.py's `message_reasoning` is the oracle); every defect names the field the user wrote."""
from __future__ import annotations

import json

import pytest
from conftest import DEMO_IMAGES

from vlft.convert import ConvertArguments, convert
from vlft.data.convert import load_llava_records, to_llava
from vlft.data.llava import parse_record
from vlft.data.preference import parse_preference_record
from vlft.data.reasoning import ReasoningError, message_reasoning, split_reasoning
from vlft.errors import DataError

FILE = "train.json"
HUMAN = {"from": "human", "value": "What is 2+2?"}


def record(gpt: dict, human: dict = HUMAN) -> dict:
    return {"id": "r", "conversations": [human, {"from": "gpt", **gpt}]}


def parse_ok(rec):
    sample, problems = parse_record(rec, 0, FILE)
    assert problems == [], problems
    return sample


def only_problem(found):
    assert len(found) == 1, found
    (problem,) = found
    assert problem.index == 3 and problem.record_id in ("r", "p") and problem.hint
    return problem


# --- LLaVA turns -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_field_becomes_the_messages_reasoning_content(key):
    sample = parse_ok(record({"value": "4.", key: "2+2 is 4."}))
    assert sample.messages == [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
                               {"role": "assistant", "content": "4.", "reasoning_content": "2+2 is 4."}]
    assert message_reasoning(sample.messages[1]) == ("2+2 is 4.", "4.")


def test_inline_reasoning_stays_as_written_and_reads_as_the_field_form():
    inline = parse_ok(record({"value": "<think>\n2+2 is 4.\n</think>\n\n4."}))
    field = parse_ok(record({"value": "4.", "reasoning_content": "2+2 is 4."}))
    assert inline.messages[1] == {"role": "assistant", "content": "<think>\n2+2 is 4.\n</think>\n\n4."}
    assert message_reasoning(inline.messages[1]) == message_reasoning(field.messages[1]) == ("2+2 is 4.", "4.")


@pytest.mark.parametrize("gpt", [{"value": "4.", "reasoning_content": None}, {"value": "4.", "reasoning": ""},
                                 {"value": "4."}])
def test_null_or_empty_reasoning_is_no_reasoning(gpt):
    assert parse_ok(record(gpt)).messages[1] == {"role": "assistant", "content": "4."}


def test_a_reasoning_only_answer_is_allowed():
    """`<think>R</think>` with nothing after: the template renders the block and an empty answer."""
    sample = parse_ok(record({"value": "<think>Thinking it over.</think>"}))
    assert message_reasoning(sample.messages[1]) == ("Thinking it over.", "")


def test_both_keys_with_the_same_reasoning_are_one():
    sample = parse_ok(record({"value": "4.", "reasoning_content": "R", "reasoning": "R"}))
    assert sample.messages[1] == {"role": "assistant", "content": "4.", "reasoning_content": "R"}


LLAVA_BAD = {  # (record, field, words in the message)
    "on_a_human_turn": (record({"value": "4."}, {**HUMAN, "reasoning_content": "hm"}),
                        "conversations[0].reasoning_content", "on a human turn"),
    "not_a_string": (record({"value": "4.", "reasoning_content": ["a", "b"]}),
                     "conversations[1].reasoning_content", "is a list, not a string"),
    "alias_not_a_string": (record({"value": "4.", "reasoning": {"text": "R"}}),
                           "conversations[1].reasoning", "is a dict"),
    "given_twice": (record({"value": "<think>R</think>4.", "reasoning_content": "R"}),
                    "conversations[1].reasoning_content", "reasoning given twice"),
    "open_tag_with_field": (record({"value": "<think>4.", "reasoning": "R"}),
                            "conversations[1].reasoning", "reasoning given twice"),
    "reserved_string": (record({"value": "4.", "reasoning_content": "R<|im_end|>"}),
                        "conversations[1].reasoning_content", "<|im_end|>"),
    "tags_in_the_field": (record({"value": "4.", "reasoning_content": "<think>R</think>"}),
                          "conversations[1].reasoning_content", "holds <think> and </think>"),
    "image_tag_in_the_field": (record({"value": "4.", "reasoning_content": "see <image>"}),
                               "conversations[1].reasoning_content", "<image> in a gpt turn"),
    "aliases_differ": (record({"value": "4.", "reasoning_content": "R", "reasoning": "S"}),
                       "conversations[1].reasoning", "hold different reasoning"),
    "empty_block_only": (record({"value": "<think>\n\n</think>\n\n"}), "conversations[1].value",
                         "empty think block"),
    "empty_value_with_field": (record({"value": "", "reasoning_content": "R"}), "conversations[1].value",
                               "non-empty text"),
}


@pytest.mark.parametrize("case", LLAVA_BAD)
def test_llava_reasoning_problem_names_the_field(case):
    rec, field, words = LLAVA_BAD[case]
    sample, found = parse_record(rec, 3, FILE)
    assert sample is None
    problem = only_problem(found)
    assert problem.field == field and words in problem.message, problem
    assert str(problem).startswith(f"{FILE}: record 3 (id 'r'), field '{field}'")


@pytest.mark.parametrize("value", ["Well. <think>R</think>4.", "<think>R</think>4.</think>", "<think>R, then 4.",
                                   "<think>a<think>b</think>4.", "R</think>4.<think>"])
def test_inline_text_the_template_would_rewrite_is_refused_with_its_hint(value):
    with pytest.raises(ReasoningError) as info:
        split_reasoning(value)
    sample, found = parse_record(record({"value": value}), 3, FILE)
    problem = only_problem(found)
    assert (problem.field, problem.message, problem.hint) == ("conversations[1].value", str(info.value),
                                                              info.value.hint)


def test_inline_tags_in_a_human_turn_are_text():
    """Templates split the answers' content only; a question may quote the tags."""
    sample = parse_ok(record({"value": "4."}, {"from": "human", "value": "What does </think> mean?"}))
    assert sample.messages[0]["content"] == [{"type": "text", "text": "What does </think> mean?"}]


def test_the_empty_value_hint_shows_the_inline_form():
    _, found = parse_record(record({"value": " ", "reasoning_content": "R"}), 3, FILE)
    assert "<think>...</think>" in only_problem(found).hint


# --- preference answers ----------------------------------------------------------------------------------------

PROMPT = {"id": "p", "conversations": [HUMAN]}


@pytest.mark.parametrize("chosen", ["<think>\nTwo and two.\n</think>\n\n4.",
                                    {"from": "gpt", "value": "4.", "reasoning_content": "Two and two."},
                                    {"from": "gpt", "value": "4.", "reasoning": "Two and two."},
                                    {"from": "gpt", "value": "<think>Two and two.</think>4."}])
def test_preference_answer_forms_give_the_same_sample(chosen):
    sample, found = parse_preference_record({**PROMPT, "chosen": chosen, "rejected": "5."}, 0, "f")
    assert found == []
    assert (sample.chosen, sample.chosen_reasoning, sample.rejected, sample.rejected_reasoning) == (
        "4.", "Two and two.", "5.", None)
    assert sample.completions == ({"role": "assistant", "content": "4.", "reasoning_content": "Two and two."},
                                  {"role": "assistant", "content": "5."})
    # the template's reading of the message is the record's
    assert [message_reasoning(m) for m in sample.completions] == [("Two and two.", "4."), (None, "5.")]


def test_preference_answers_without_reasoning_are_unchanged():
    sample, _ = parse_preference_record({**PROMPT, "chosen": "4.", "rejected": "5."}, 0, "f")
    assert (sample.chosen_reasoning, sample.rejected_reasoning) == (None, None)
    assert sample.completions == ({"role": "assistant", "content": "4."}, {"role": "assistant", "content": "5."})


def test_answers_that_differ_in_reasoning_only_are_a_pair():
    sample, found = parse_preference_record({**PROMPT, "chosen": "<think>2+2=4</think>4.",
                                             "rejected": {"value": "4.", "reasoning": "2+2=5, no, 4"}}, 0, "f")
    assert found == [] and sample.chosen == sample.rejected == "4."
    assert (sample.chosen_reasoning, sample.rejected_reasoning) == ("2+2=4", "2+2=5, no, 4")


def test_a_reasoning_only_preference_answer_is_allowed():
    sample, found = parse_preference_record({**PROMPT, "chosen": "<think>Let me see.</think>", "rejected": "5."},
                                            0, "f")
    assert found == [] and (sample.chosen, sample.chosen_reasoning) == ("", "Let me see.")


def test_an_image_side_pair_repeats_the_chosen_reasoning():
    rec = {"image": "a.png", "rejected_image": "b.png", "conversations": [{"from": "human", "value": "<image>\nIt?"}],
           "chosen": {"value": "A cat.", "reasoning_content": "Whiskers."}}
    sample, found = parse_preference_record(rec, 0, "f")
    assert found == [] and sample.completions[0] == sample.completions[1] == {
        "role": "assistant", "content": "A cat.", "reasoning_content": "Whiskers."}


PREFERENCE_BAD = {
    "field_not_a_string": ({"chosen": {"value": "4.", "reasoning_content": 4}}, "chosen.reasoning_content",
                           "is a int"),
    "given_twice": ({"rejected": {"value": "<think>R</think>5.", "reasoning": "R"}}, "rejected.reasoning",
                    "reasoning given twice"),
    "reserved_string": ({"chosen": {"value": "4.", "reasoning_content": "<|im_start|>R"}},
                        "chosen.reasoning_content", "<|im_start|>"),
    "inline_in_the_string": ({"chosen": "So: <think>R</think>4."}, "chosen", "text before <think>"),
    "inline_in_the_object": ({"rejected": {"from": "gpt", "value": "<think>R</think>5.</think>"}}, "rejected.value",
                             "2 </think> tags"),
    "same_pair_written_twice": ({"chosen": "<think>\nR\n</think>\n\n4.", "rejected": {"value": "4.",
                                                                                      "reasoning_content": "R"}},
                                "rejected", "the same as the chosen one"),
}


@pytest.mark.parametrize("case", PREFERENCE_BAD)
def test_preference_reasoning_problem_names_the_field(case):
    change, field, words = PREFERENCE_BAD[case]
    sample, found = parse_preference_record({**PROMPT, "chosen": "4.", "rejected": "5.", **change}, 3, "prefs.json")
    assert sample is None
    problem = only_problem(found)
    assert problem.field == field and words in problem.message, problem


def test_flat_preference_layout_reads_reasoning_too():
    sample, found = parse_preference_record({"prompt": "What is 2+2?", "chosen": "<think>R</think>4.",
                                             "rejected": "5."}, 0, "f")
    assert found == [] and (sample.chosen, sample.chosen_reasoning) == ("4.", "R")


# --- other formats and `vlft convert` ------------------------------------------------------------------------------

def user(content, **extra):
    return {"role": "user", "content": content, **extra}


def assistant(content, **extra):
    return {"role": "assistant", "content": content, **extra}


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_messages_reasoning_becomes_the_gpt_turns_reasoning_content(key):
    converted, found = to_llava({"messages": [user("Hi"), assistant("Hello.", **{key: "Greet back."})]}, 0, "f")
    assert found == []
    assert converted["conversations"] == [{"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello.", "reasoning_content": "Greet back."}]
    assert converted.fields["conversations[1].reasoning_content"] == f"messages[1].{key}"


def test_openai_null_reasoning_on_every_message_is_no_reasoning():
    """Parquet / arrow rows give every message every key of the struct, null where absent."""
    converted, _ = to_llava({"messages": [user("Hi", reasoning_content=None),
                                          assistant("Hello.", reasoning_content=None)]}, 0, "f")
    assert parse_ok(converted).messages[1] == {"role": "assistant", "content": "Hello."}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MESSAGES = [
    {"id": "field", "images": ["red_square.png"],
     "messages": [user("<image>What colour?"), assistant("Red.", reasoning_content="The square is red."),
                  user("Sure?"), assistant([{"type": "text", "text": "Yes."}], reasoning="I looked again.")]},
    {"id": "inline", "messages": [user("Hi"), assistant("<think>\nA greeting.\n</think>\n\nHello.")]},
    {"id": "plain", "messages": [user("Hi"), assistant("Hello.", reasoning_content=None)]},
]


def convert_file(src, out, **kw):
    return convert(ConvertArguments(data_path=str(src), output=str(out), image_folder=str(DEMO_IMAGES), **kw))


def test_convert_keeps_reasoning_round_trip(tmp_path):
    src = write_jsonl(tmp_path / "messages.jsonl", MESSAGES)
    out = tmp_path / "llava.jsonl"
    assert convert_file(src, out)["written"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["conversations"][1] == {"from": "gpt", "value": "Red.", "reasoning_content": "The square is red."}
    assert rows[0]["conversations"][3] == {"from": "gpt", "value": "Yes.", "reasoning_content": "I looked again."}
    assert rows[1]["conversations"][1] == {"from": "gpt", "value": "<think>\nA greeting.\n</think>\n\nHello."}
    assert rows[2]["conversations"][1] == {"from": "gpt", "value": "Hello."}
    # the written records parse to the messages the original file gives
    loaded = load_llava_records(src)
    for original, written in zip(loaded.records, rows, strict=True):
        assert parse_ok(written).messages == parse_ok(original).messages
    # and converting the output again changes nothing
    again = tmp_path / "again.jsonl"
    convert(ConvertArguments(data_path=str(out), output=str(again)))
    assert again.read_text() == out.read_text()


def test_convert_writes_sharegpt_reasoning_under_its_name(tmp_path):
    src = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"id": "s", "images": ["red_square.png"],
         "conversations": [{"from": "user", "value": "<image>Colour?"},
                           {"from": "assistant", "value": "Red.", "reasoning": "It is red."}]}])
    out = tmp_path / "out.jsonl"
    convert_file(src, out)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["conversations"][1] == {"from": "assistant", "value": "Red.", "reasoning_content": "It is red."}


CONVERT_BAD = {  # messages-format record, the user's field, words
    "on_a_user_message": ([user("Hi", reasoning_content="hm"), assistant("Hello.")], "messages[0].reasoning_content",
                          "on a human turn"),
    "alias_not_a_string": ([user("Hi"), assistant("Hello.", reasoning=["R"])], "messages[1].reasoning",
                           "is a list"),
    "given_twice": ([user("Hi"), assistant("<think>R</think>Hello.", reasoning_content="R")],
                    "messages[1].reasoning_content", "reasoning given twice"),
    "aliases_differ": ([user("Hi"), assistant("Hello.", reasoning_content="R", reasoning="S")],
                       "messages[1].reasoning", "hold different reasoning"),
    "inline_unclosed": ([user("Hi"), assistant("<think>R. Hello.")], "messages[1].content", "never closes"),
    "inline_in_parts": ([user("Hi"), assistant([{"type": "text", "text": "So <think>R</think>"},
                                                {"type": "text", "text": "Hello."}])],
                        "messages[1].content", "text before <think>"),
}


@pytest.mark.parametrize("case", CONVERT_BAD)
def test_convert_names_reasoning_problems_by_the_users_field(case, tmp_path):
    messages, field, words = CONVERT_BAD[case]
    src = write_jsonl(tmp_path / "bad.jsonl", [{"id": "ok", "messages": [user("Hi"), assistant("Hello.")]}] * 3
                      + [{"id": "r", "messages": messages}])
    with pytest.raises(DataError) as info:
        convert_file(src, tmp_path / "out.jsonl")
    problem = only_problem(info.value.problems)
    assert problem.field == field and words in problem.message, problem
    assert f"record 3 (id 'r'), field '{field}'" in str(info.value)
