"""A top-level `system` string (LLaMA-Factory's ShareGPT layout) is the record's system prompt in every format and
stage: it encodes to exactly the ids and labels of the same record with the system prompt written as its first turn,
the template's default system prompt is gone, and GRPO does not pass it to the rewards as a column. A record giving
it twice, or a system value that is not a non-empty string, is refused by field. Data preparation names, once, the
top-level keys the stage does not read (a misspelt `sytem`), and GRPO's reward columns."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DEMO_IMAGES, DEMO_MEDIA

import vlft.data.prepare as prepare_module
from vlft.data.dpo import PreferenceFormat
from vlft.data.encoding import ChatEncoder, EncodingError
from vlft.data.grpo import PROMPT
from vlft.data.llava import parse_record
from vlft.data.preference import parse_preference_record
from vlft.data.prepare import CONVERSATION, CONVERSATION_OR_PROMPT, PREFERENCE, _encoding_field, prepare_data
from vlft.errors import DataError

SYSTEM = "You answer as a pirate would."
DEFAULT = "You are a helpful assistant."  # Qwen2-VL's template default, what an ignored key trained instead
HUMAN = {"from": "human", "value": "<image>\nWhat is in the picture?"}
GPT = {"from": "gpt", "value": "Arr, a red square."}


def llava_turn(speaker: str, text: str) -> dict:
    return {"from": speaker, "value": text}


@pytest.fixture(autouse=True)
def media_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def logged(monkeypatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(prepare_module, "log", lines.append)
    return lines


def write(tmp_path, name: str, records: list) -> str:
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text(json.dumps(records))
    return str(path)


def prepare(path: str, record_format=CONVERSATION, **kwargs):
    return prepare_data(path, record_format, processor=kwargs.pop("processor"), image_folder=str(DEMO_IMAGES),
                        media=DEMO_MEDIA, max_seq_length=4096, **kwargs)


def conversation(prepared, processor) -> list[tuple[list[int], list[int]]]:
    encoder = ChatEncoder(processor)
    out = []
    for i, sample in enumerate(prepared.samples):
        enc = encoder.encode_conversation(sample.messages, prepared.image_specs[i], prepared.video_specs[i])
        out.append((enc.input_ids, enc.labels))
    return out


def assert_system_prompt(ids: list[int], processor, system: str = SYSTEM) -> None:
    text = processor.tokenizer.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>"), text[:120]
    assert text.count("<|im_start|>system") == 1 and (system == DEFAULT or DEFAULT not in text)


# The same record in each layout: with the `system` key, and (the oracle) with the system prompt as its first turn.
LAYOUTS = {
    "llava": (
        {"id": "a", "system": SYSTEM, "image": "red_square.png", "conversations": [HUMAN, GPT]},
        {"id": "a", "image": "red_square.png", "conversations": [llava_turn("system", SYSTEM), HUMAN, GPT]}),
    "sharegpt": (  # LLaMA-Factory's ShareGPT mode: `images` list, user/assistant speakers
        {"id": "a", "system": SYSTEM, "images": ["red_square.png"],
         "conversations": [llava_turn("user", HUMAN["value"]), llava_turn("assistant", GPT["value"])]},
        {"id": "a", "images": ["red_square.png"],
         "conversations": [llava_turn("system", SYSTEM), llava_turn("user", HUMAN["value"]),
                           llava_turn("assistant", GPT["value"])]}),
    "messages": (
        {"id": "a", "system": SYSTEM, "images": ["red_square.png"],
         "messages": [{"role": "user", "content": "<image>What is in the picture?"},
                      {"role": "assistant", "content": GPT["value"]}]},
        {"id": "a", "images": ["red_square.png"],
         "messages": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": "<image>What is in the picture?"},
                      {"role": "assistant", "content": GPT["value"]}]}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sft_system_key_encodes_as_a_system_turn(layout, processor, tmp_path):
    keyed, turned = LAYOUTS[layout]
    got = conversation(prepare(write(tmp_path, "keyed.json", [keyed]), processor=processor), processor)
    want = conversation(prepare(write(tmp_path, "turned.json", [turned]), processor=processor), processor)
    assert got == want  # ids and labels, token for token
    assert_system_prompt(got[0][0], processor)


def test_parquet_system_column_and_null_rows(processor, tmp_path):
    """A parquet `system` column: a row's string is its system prompt; a row without one (null) keeps the default."""
    keyed = LAYOUTS["sharegpt"][0]
    rows = [keyed, {**keyed, "id": "b", "system": None}]
    prepared = prepare(write(tmp_path, "data.parquet", rows), processor=processor)
    (ids_a, _), (ids_b, _) = conversation(prepared, processor)
    assert_system_prompt(ids_a, processor)
    assert_system_prompt(ids_b, processor, system=DEFAULT)


DPO_LAYOUTS = {
    "llava": {"id": "p", "system": SYSTEM, "image": "red_square.png", "conversations": [HUMAN],
              "chosen": "Arr, a red square.", "rejected": "A blue circle."},
    "flat": {"id": "p", "system": SYSTEM, "image": "red_square.png", "prompt": HUMAN["value"],
             "chosen": "Arr, a red square.", "rejected": "A blue circle."},
}


@pytest.mark.parametrize("layout", list(DPO_LAYOUTS))
@pytest.mark.parametrize("stage_format", ["dpo_stage", "check_data"])
def test_dpo_system_key_reaches_the_prompt(layout, stage_format, processor, tmp_path):
    # the DPO stage's own format (data/dpo.py) and `vlft check-data --stage dpo`'s
    fmt = PreferenceFormat(4096).record_format() if stage_format == "dpo_stage" else PREFERENCE
    oracle = {"id": "p", "image": "red_square.png", "conversations": [llava_turn("system", SYSTEM), HUMAN],
              "chosen": "Arr, a red square.", "rejected": "A blue circle."}
    encoder = ChatEncoder(processor)
    pairs = []
    for name, record in (("keyed.json", DPO_LAYOUTS[layout]), ("turned.json", oracle)):
        prepared = prepare(write(tmp_path, name, [record]), fmt, processor=processor)
        sample = prepared.samples[0]
        pairs.append(encoder.encode_preference(sample.messages, sample.completions, prepared.image_specs[0]))
    got, want = pairs
    assert got.prompt_ids == want.prompt_ids and got.completion_ids == want.completion_ids
    assert_system_prompt(got.prompt_ids, processor)


def test_grpo_system_key_is_the_prompt_not_a_reward_column(processor, tmp_path):
    records = [{"id": "g", "system": SYSTEM, "image": "red_square.png", "conversations": [HUMAN], "solution": "3"},
               {"id": "f", "system": SYSTEM, "prompt": "Two plus two?", "solution": "4"}]  # 2U1's flat form
    prepared = prepare(write(tmp_path, "prompts.json", records), PROMPT, processor=processor)
    assert [s.columns for s in prepared.samples] == [{"solution": "3"}, {"solution": "4"}]
    encoder = ChatEncoder(processor)
    for i, sample in enumerate(prepared.samples):
        ids = encoder.encode_prompt(sample.messages, prepared.image_specs[i]).input_ids
        assert_system_prompt(ids, processor)
        assert processor.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_predict_system_key_reaches_the_prompt(processor, tmp_path):
    path = write(tmp_path, "ask.json", [{"id": "q", "system": SYSTEM, "prompt": "Two plus two?"}])
    prepared = prepare(path, CONVERSATION_OR_PROMPT, processor=processor)
    ids = ChatEncoder(processor).encode_prompt(prepared.samples[0].messages).input_ids
    assert_system_prompt(ids, processor)


BOTH = {
    "llava": {"id": "both", "conversations": [llava_turn("system", "Be brief."), HUMAN, GPT], "image": "red_square.png",
              "system": SYSTEM},
    "messages": {"id": "both", "system": SYSTEM, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}]},
}


@pytest.mark.parametrize("layout", list(BOTH))
def test_system_given_twice_is_refused_naming_record_and_field(layout, processor, tmp_path):
    good = {k: v for k, v in BOTH[layout].items() if k != "system"} | {"id": "ok"}  # a file holds one format
    path = write(tmp_path, "data.json", [good, BOTH[layout]])
    with pytest.raises(DataError) as err:
        prepare(path, processor=processor)
    (problem,) = err.value.problems
    assert (problem.index, problem.record_id, problem.field) == (1, "both", "system")
    assert "given twice" in problem.message and "drop the 'system' key, or the system turn" in problem.hint
    assert "record 1 (id 'both'), field 'system'" in str(err.value)


@pytest.mark.parametrize("value, message", [(3, "'system' is a int"), (["a"], "'system' is a list"),
                                            ("", "empty"), ("  \n", "empty")])
def test_system_value_must_be_a_non_empty_string(value, message):
    record = {"id": "x", "system": value, "conversations": [llava_turn("human", "Hi"), llava_turn("gpt", "Hello.")]}
    for parse in (parse_record, parse_preference_record):
        sample, (problem,) = parse({**record, "chosen": "a", "rejected": "b"} if parse is parse_preference_record
                                   else record, 4, "d.json")
        assert sample is None and problem.field == "system" and message in problem.message
        assert '"system": "You are ...", or leave the key out' in problem.hint


def test_system_text_is_checked_like_a_system_turn():
    record = {"system": "Look: <image>", "conversations": [llava_turn("human", "Hi"), llava_turn("gpt", "Hello.")]}
    _, (problem,) = parse_record(record, 0, "d.json")
    assert problem.field == "system" and "<image> in a system turn" in problem.message


def test_turn_fields_count_from_the_conversation_not_the_system_message():
    """With the system prompt from the key, messages[k] is conversations[k - 1]: problems name the field written."""
    record = {"system": SYSTEM, "conversations": [llava_turn("human", "Hi"), llava_turn("gpt", "Hello.")],
              "chosen": "a", "rejected": "b"}
    _, (problem,) = parse_preference_record(record, 0, "d.json")
    assert problem.field == "conversations[1]" and "ends with a gpt turn" in problem.message
    sample, _ = parse_record(record, 0, "d.json")
    assert sample.turn_offset == 1 and sample.messages[1]["role"] == "user"
    assert _encoding_field(EncodingError("x", turn=2), sample) == "conversations[1].value"
    assert _encoding_field(EncodingError("x", turn=0), sample) == "system"


def test_unused_keys_are_listed_once_with_counts(processor, tmp_path, logged):
    base = {"image": "red_square.png", "conversations": [HUMAN, GPT]}
    records = [{**base, "id": str(i), "sytem": SYSTEM} for i in range(3)]
    records += [{**base, "id": "s", "source": "web"}, {**base, "id": "n", "note": None}]  # null: nothing dropped
    prepared = prepare(write(tmp_path, "data.json", records), processor=processor)
    lines = [line for line in logged if "unused keys" in line]
    assert lines == [f"{tmp_path / 'data.json'}: unused keys (ignored): 'sytem' in 3 records (did you mean "
                     "'system'?), 'source' in 1 record"]
    assert_system_prompt(conversation(prepared, processor)[0][0], processor, system=DEFAULT)  # the misspelt key


def test_no_line_when_every_key_is_used(processor, tmp_path, logged):
    records = [LAYOUTS["llava"][0], {**LAYOUTS["llava"][0], "id": "b", "video": None}]
    prepare(write(tmp_path, "data.json", records), processor=processor)
    assert not [line for line in logged if "keys" in line or "columns" in line]


def test_dpo_keys_are_used_and_extra_ones_listed(processor, tmp_path, logged):
    records = [{**DPO_LAYOUTS["llava"], "rejected_image": "green_circle.png", "score": 0.5},
               {**DPO_LAYOUTS["flat"], "id": "q"}]
    prepare(write(tmp_path, "pairs.json", records), PreferenceFormat(4096).record_format(), processor=processor)
    (line,) = [line for line in logged if "unused keys" in line]
    assert line.endswith("unused keys (ignored): 'score' in 1 record")


def test_grpo_names_reward_columns_not_unused_keys(processor, tmp_path, logged):
    records = [{"id": "g", "system": SYSTEM, "image": "red_square.png", "conversations": [HUMAN], "solution": "3",
                "bbox": [0, 0, 4, 4]},
               {"id": "h", "image": "red_square.png", "conversations": [HUMAN], "solution": "1"}]
    prepare(write(tmp_path, "prompts.json", records), PROMPT, processor=processor)
    assert [line.split(": ", 1)[1] for line in logged if "columns" in line or "unused" in line] == [
        "reward columns (passed to the reward functions): 'solution' in 2 records, 'bbox' in 1 record"]
