"""Other data formats (data/convert.py): each, once converted, encodes to exactly the ids, labels, grids and pixels
of its hand-written LLaVA equivalent (the records of llava_demo.json with the same ids), through vlft's own path
(prepare_sft_data + SFTDataset); a run trains on them with the LLaVA run's loss; `vlft convert` round-trips; bad
input is reported naming the record and the field the user wrote."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA, REPO

from vlft.cli import main as cli_main
from vlft.data.convert import load_llava_records, to_llava
from vlft.data.prepare import prepare_sft_data
from vlft.data.sft import SFTDataset
from vlft.errors import DataError

EXAMPLES = REPO / "data_examples"
LLAVA = {r["id"]: r for r in json.loads(DEMO_DATA.read_text())}
KEYS = ("input_ids", "labels", "image_grid_thw", "pixel_values")


@pytest.fixture(autouse=True)
def media_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    return tmp_path / "cache" / "media"


def encoded(path, processor, image_folder=DEMO_IMAGES) -> dict:
    folder = None if image_folder is None else str(image_folder)
    prepared = prepare_sft_data(str(path), processor=processor, image_folder=folder, media=DEMO_MEDIA,
                                max_seq_length=4096)
    dataset = SFTDataset(prepared.samples, prepared.image_paths, processor, media=DEMO_MEDIA)
    return {s.id: dataset[i] for i, s in enumerate(prepared.samples)}


def assert_same_as_llava(items: dict, processor, tmp_path):
    path = tmp_path / "llava_equivalent.json"
    path.write_text(json.dumps([LLAVA[i] for i in items]))
    expected = encoded(path, processor)
    assert list(items) == list(expected)
    for record_id, item in items.items():
        want = expected[record_id]
        assert item.keys() == want.keys(), record_id
        for key in KEYS:
            if key in want:
                assert torch.equal(item[key], want[key]), (record_id, key)


@pytest.mark.parametrize("name", ["messages_demo.json", "messages_parts_demo.jsonl", "sharegpt_demo.json"])
def test_json_formats_encode_as_their_llava_equivalent(name, processor, tmp_path):
    items = encoded(EXAMPLES / name, processor)
    assert len(items) == len(load_llava_records(EXAMPLES / name).records)
    assert any("pixel_values" in item for item in items.values())
    assert_same_as_llava(items, processor, tmp_path)


def test_parquet_with_embedded_images(processor, tmp_path, media_cache):
    """data_examples/hf_demo.parquet: TRL's layout, `images` as datasets.Image values holding the files' bytes."""
    items = encoded(EXAMPLES / "hf_demo.parquet", processor)
    assert set(items) == {"single_image", "multi_image", "exif_rotated", "text_only"}
    assert len(list(media_cache.iterdir())) == 3  # red, green, arrow: once each, though red is used twice
    assert_same_as_llava(items, processor, tmp_path)


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_hf_file_with_image_paths(suffix, processor, tmp_path):
    records = [{"id": i, "images": LLAVA[i]["image"] if isinstance(LLAVA[i]["image"], list) else [LLAVA[i]["image"]],
                "messages": [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                              "content": t["value"]} for t in LLAVA[i]["conversations"]]}
               for i in ("single_image", "multi_image", "images_in_two_turns")]
    path, table = tmp_path / f"paths{suffix}", pa.Table.from_pylist(records)
    if suffix == ".parquet":
        pq.write_table(table, path)
    else:  # the IPC stream format, as datasets writes its .arrow files
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    assert_same_as_llava(encoded(path, processor), processor, tmp_path)


def test_save_to_disk_folder_with_image_feature(processor, tmp_path):
    """Decoded PIL images in a `datasets.Image` column, saved with save_to_disk: written once to the cache."""
    import datasets
    from PIL import Image

    def image(name):
        with Image.open(DEMO_IMAGES / name) as img:
            return img.copy()  # decoded, no file behind it: datasets stores its PNG bytes

    features = datasets.Features({"id": datasets.Value("string"), "images": datasets.Sequence(datasets.Image()),
                                  "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}]})
    ids = ["single_image", "multi_image", "text_only"]
    data = {"id": ids, "images": [[image("red_square.png")], [image("red_square.png"), image("green_circle.png")], []],
            "conversations": [LLAVA[i]["conversations"] for i in ids]}
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features)}).save_to_disk(str(folder))
    assert_same_as_llava(encoded(folder, processor), processor, tmp_path)


def test_sft_run_on_a_converted_format_has_the_llava_loss(tiny_model_dir, tmp_path):
    from vlft.train.sft.run import run

    def first_loss(data, name):
        summary, _ = run(["--model_id", str(tiny_model_dir), "--data_path", str(data), "--image_folder",
                          str(DEMO_IMAGES), "--max_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
                          "--per_device_train_batch_size", "2", "--save_strategy", "no", "--max_seq_length", "256",
                          "--output_dir", str(tmp_path / name)])
        return summary["first_loss"]

    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([LLAVA[r["id"]] for r in json.loads((EXAMPLES / "messages_demo.json").read_text())]))
    assert first_loss(EXAMPLES / "messages_demo.json", "messages") == pytest.approx(first_loss(llava, "llava"), abs=1e-6)


def test_convert_round_trip(processor, tmp_path, capsys):
    out = tmp_path / "out" / "train.jsonl"
    out.parent.mkdir()
    argv = ["convert", "--data_path", str(EXAMPLES / "hf_demo.parquet"), "--output", str(out)]
    assert cli_main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["single_image", "multi_image", "exif_rotated", "text_only"]
    assert all(not p.startswith("/") for r in lines for p in r.get("image", []))  # under the output's folder
    assert len(list((out.parent / "train_media").iterdir())) == 3
    stamp = out.stat().st_mtime_ns
    assert cli_main(argv) == 2 and "--overwrite" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    assert cli_main(argv + ["--overwrite", "true"]) == 0
    # the JSONL trains like the original: same ids, labels and pixels, with no --image_folder needed
    original = encoded(EXAMPLES / "hf_demo.parquet", processor)
    again = encoded(out, processor, image_folder=None)
    assert list(original) == list(again)
    for record_id, item in original.items():
        for key in KEYS:
            if key in item:
                assert torch.equal(item[key], again[record_id][key]), (record_id, key)


def test_convert_json_messages_resolves_image_folder(tmp_path):
    out = tmp_path / "m.jsonl"
    assert cli_main(["convert", "--data_path", str(EXAMPLES / "messages_demo.json"), "--output", str(out),
                     "--image_folder", str(DEMO_IMAGES)]) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert first["conversations"][0] == {"from": "human", "value": "<image>\nWhat is in the picture?"}
    assert first["image"] == [str(DEMO_IMAGES / "red_square.png")]


# --- bad input: every error names the record and the field the user wrote --------------------------------------

def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


BAD = {
    "roles_out_of_order": ({"messages": [user("Hi"), user("Hello?"), assistant("Yes.")]},
                           "messages[1].role", "expected an assistant message here, got user"),
    "unknown_role": ({"messages": [{"role": "tool", "content": "42"}, assistant("Yes.")]},
                     "messages[0].role", "unknown role 'tool'"),
    "system_not_first": ({"messages": [user("Hi"), {"role": "system", "content": "Be brief."}, assistant("Yes.")]},
                         "messages[1].role", "only allowed first"),
    "image_part_without_file": ({"messages": [user([{"type": "image"}, {"type": "text", "text": "What?"}]),
                                              assistant("A cat.")]},
                                "messages[0].content[0]", "has no file"),
    "more_image_parts_than_images": ({"images": ["a.png"], "messages": [
        user([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]), assistant("Same.")]},
        "messages[0].content[1]", "'images' has 1 entry"),
    "more_tags_than_images": ({"images": ["a.png"], "messages": [user("<image><image>Compare."), assistant("Same.")]},
                              "messages[0].content", "'images' has 1 entry"),
    "more_images_than_parts": ({"images": ["a.png", "b.png"], "messages": [
        user([{"type": "image"}, {"type": "text", "text": "What?"}]), assistant("A cat.")]},
        "images", "use 1 of them"),
    "unknown_type": ({"messages": [user([{"type": "audio", "audio": "a.wav"}]), assistant("Hm.")]},
                     "messages[0].content[0].type", "unknown part type 'audio'"),
    "http_url": ({"messages": [user([{"type": "image_url", "image_url": {"url": "https://x.org/cat.png"}},
                                     {"type": "text", "text": "What?"}]), assistant("A cat.")]},
                 "messages[0].content[0].image_url.url", "downloads nothing"),
    "http_url_in_images": ({"images": ["http://x.org/cat.png"], "messages": [user("<image>What?"), assistant("A cat.")]},
                           "images[0]", "is a URL"),
    "image_in_assistant": ({"images": ["a.png"], "messages": [user("What?"), assistant([{"type": "image"}])]},
                           "messages[1].content[0]", "only be given in user messages"),
    "tag_in_text_part": ({"images": ["a.png"], "messages": [user([{"type": "text", "text": "<image>What?"}]),
                                                            assistant("A cat.")]},
                         "messages[0].content[0].text", "<image> inside a text part"),
    "content_missing": ({"messages": [user(None), assistant("A cat.")]}, "messages[0].content", "got nothing"),
    "both_media_keys": ({"image": "a.png", "images": ["a.png"],
                         "conversations": [{"from": "user", "value": "<image>What?"}, {"from": "assistant", "value": "A."}]},
                        "images", "both 'image' and 'images'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_record_names_index_and_field(case):
    record, field, message = BAD[case]
    converted, problems = to_llava({"id": "r7", **record}, 7, "data.json")
    assert converted is None
    assert [p.field for p in problems][:1] == [field], problems
    assert message in problems[0].message
    text = str(problems[0])
    assert text.startswith("data.json: record 7 (id 'r7'), field '") and problems[0].hint


def test_later_problems_are_named_in_the_users_fields(processor, tmp_path):
    """Problems found after conversion (the stage's rules, media files) name the fields the user wrote."""
    records = [
        {"id": "ok", "messages": [user("Hi"), assistant("Hello.")]},
        {"id": "no_answer", "messages": [user("Hi")]},
        {"id": "missing_file", "images": ["red_square.png", "nope.png"],
         "messages": [user("<image><image>Compare."), assistant("Same.")]},
        {"id": "missing_inline", "messages": [user([{"type": "image", "image": "gone.png"}]), assistant("Hm.")]},
        {"id": "empty_answer", "messages": [user("Hi"), assistant([{"type": "text", "text": " "}])]},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(DataError) as info:
        encoded(path, processor)
    where = {(p.index, p.field) for p in info.value.problems}
    assert where == {(1, "messages[0]"), (2, "images[1]"), (3, "messages[0].content[0].image"),
                     (4, "messages[1].content")}, info.value.problems
    assert "record 2 (id 'missing_file'), field 'images[1]'" in str(info.value)


def test_a_file_mixing_formats_names_the_first_record_of_the_other(tmp_path):
    records = [{"messages": [user("Hi"), assistant("Hello.")]}] * 3
    records.insert(2, LLAVA["text_only"])
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as info:
        load_llava_records(path)
    (problem,) = info.value.problems
    assert (problem.index, problem.field, problem.record_id) == (2, "conversations", "text_only")
    assert "record 0" in problem.message and "OpenAI messages" in problem.message


def test_llava_records_pass_through_unchanged():
    record = LLAVA["multi_image"]
    assert to_llava(record, 0, "f.json") == (record, [])
    assert to_llava(record, 0, "f.json")[0] is record


def test_file_url_is_a_local_path(tmp_path):
    record = {"messages": [user([{"type": "image_url", "image_url": {"url": f"file://{DEMO_IMAGES}/red%20sq.png"}},
                                 {"type": "text", "text": "What?"}]), assistant("A.")]}
    converted, problems = to_llava(record, 0, "f.json")
    assert problems == [] and converted["image"] == [f"{DEMO_IMAGES}/red sq.png"]
    assert converted["conversations"][0]["value"] == "<image>What?"
