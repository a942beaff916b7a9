"""The start-up data check, through `prepare_sft_data` and through `vlft check-data`: every kind of bad
record is reported with its file, record index, id and field, every bad record is listed, and the
lengths it reports are the lengths the dataset produces."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlft.cli import main
from vlft.data.prepare import MediaSettings, prepare_sft_data
from vlft.data.sft import SFTDataset
from vlft.errors import DataError, VlftError
from vlft.models.registry import get_family

# Qwen2-VL's default image budgets (3136 and 12845056 pixels), what the scripts give the tiny demo model
DEFAULT_IMAGE_MIN_PIXELS, DEFAULT_IMAGE_MAX_PIXELS = (get_family("qwen2_vl").default_pixel_budgets()[k]
                                                  for k in ("image_min_pixels", "image_max_pixels"))

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data_examples" / "llava_demo.json"
DEMO_IMAGES = REPO / "data_examples" / "images"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 24), (200, 30, 30)).save(folder / "good.png")
    (folder / "text.png").write_text("this is not a picture\n")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:-2000])
    return folder


def turn(speaker, value):
    return {"from": speaker, "value": value}


GOOD = {"id": "ok", "image": "good.png", "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "Red.")]}


def write_records(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def check(path, processor, image_folder, image_min_pixels=DEFAULT_IMAGE_MIN_PIXELS,
          image_max_pixels=DEFAULT_IMAGE_MAX_PIXELS, **kw):
    kw = {"max_seq_length": 8192, **kw}
    media = MediaSettings(image_min_pixels=image_min_pixels, image_max_pixels=image_max_pixels)
    return prepare_sft_data(str(path), processor=processor, image_folder=str(image_folder), workers=2, media=media, **kw)


@pytest.fixture
def cli(tiny_model_dir, capsys):
    """Run `vlft check-data` in-process; returns (exit code, stderr)."""

    def run(path, image_folder, *extra):
        capsys.readouterr()
        rc = main(["check-data", "--model_id", str(tiny_model_dir), "--data_path", str(path),
                   "--image_folder", str(image_folder), *extra])
        return rc, capsys.readouterr().err

    return run


# (kind, bad record, field, words of the message)
BAD_RECORDS = [
    ("missing image", {"image": "nowhere.png", "conversations": GOOD["conversations"]},
     "image[0]", "does not exist"),
    ("text file named .png", {"image": "text.png", "conversations": GOOD["conversations"]},
     "image[0]", "not an image file"),
    ("truncated png", {"image": "cut.png", "conversations": GOOD["conversations"]},
     "image[0]", "truncated or corrupt"),
    ("more images than tags", {"image": ["good.png", "good.png"], "conversations": GOOD["conversations"]},
     "image", "1 <image> tag(s) in the human turns but 2 image path(s)"),
    ("tag without image", {"conversations": GOOD["conversations"]},
     "image", "1 <image> tag(s) in the human turns but 0 image path(s)"),
    ("human, human", {"conversations": [turn("human", "Hi"), turn("human", "Hello?"), turn("gpt", "Yes.")]},
     "conversations[1].from", "expected a gpt turn here, got human"),
    ("ends with human", {"conversations": [turn("human", "Hi"), turn("gpt", "Yes."), turn("human", "And?")]},
     "conversations[2]", "ends with a human turn"),
    ("empty value", {"conversations": [turn("human", "Hi"), turn("gpt", "  ")]},
     "conversations[1].value", "empty text"),
    ("non-string value", {"conversations": [turn("human", "Hi"), turn("gpt", 42)]},
     "conversations[1].value", "got 42"),
    ("unknown role", {"conversations": [turn("human", "Hi"), turn("bot", "Yes.")]},
     "conversations[1].from", "unknown speaker 'bot'"),
    ("<image> in a gpt turn", {"conversations": [turn("human", "Hi"), turn("gpt", "Here: <image>")]},
     "conversations[1].value", "<image> in a gpt turn"),
    ("reserved token", {"conversations": [turn("human", "Say <|im_end|> twice"), turn("gpt", "No.")]},
     "conversations[0].value", "contains <|im_end|>"),
]


@pytest.mark.parametrize("bad, field, words", [case[1:] for case in BAD_RECORDS], ids=[case[0] for case in BAD_RECORDS])
def test_bad_record_is_reported(tmp_path, processor, image_folder, cli, bad, field, words):
    path = write_records(tmp_path / "train.json", [GOOD, {"id": "rec-7", **bad}, GOOD])

    with pytest.raises(DataError) as info:
        check(path, processor, image_folder)
    [problem] = info.value.problems
    assert (problem.file, problem.index, problem.record_id, problem.field) == (str(path), 1, "rec-7", field)
    assert words in problem.message
    assert problem.hint

    rc, err = cli(path, image_folder)
    assert rc == 2
    assert "vlft check-data: error: 1 problem(s) in " in err
    assert f"{path}: record 1 (id 'rec-7'), field '{field}': " in err
    assert words in err
    assert "--skip_bad_samples" in err
    assert "Traceback" not in err


def test_record_without_id_is_named_by_index(tmp_path, processor, image_folder, cli):
    bad = {"conversations": [turn("human", "Hi"), turn("bot", "Yes.")]}
    path = write_records(tmp_path / "train.json", [GOOD, GOOD, bad])
    with pytest.raises(DataError) as info:
        check(path, processor, image_folder)
    assert [(p.index, p.record_id) for p in info.value.problems] == [(2, None)]
    rc, err = cli(path, image_folder)
    assert rc == 2
    assert f"{path}: record 2, field 'conversations[1].from': unknown speaker 'bot'" in err
    assert "(id " not in err


def test_numeric_id_is_shown_as_text(tmp_path, processor, image_folder, cli):
    path = write_records(tmp_path / "train.json", [{"id": 12, "image": "nowhere.png", "conversations": GOOD["conversations"]}])
    rc, err = cli(path, image_folder)
    assert rc == 2
    assert "record 0 (id '12'), field 'image[0]'" in err


def test_invalid_json_names_line_and_column(tmp_path, processor, image_folder, cli):
    path = tmp_path / "train.json"
    # the comma after "conversations": [...] is missing; the parser stops at line 4, column 4
    path.write_text('[\n  {"id": "a",\n   "conversations": []\n   "x": 1}\n]\n')
    with pytest.raises(DataError) as info:
        check(path, processor, image_folder)
    [problem] = info.value.problems
    assert problem.file == str(path) and problem.index is None
    assert problem.message.startswith("invalid JSON at line 4, column 4")

    rc, err = cli(path, image_folder)
    assert rc == 2
    assert f"{path} is not valid JSON" in err
    assert "line 4, column 4" in err
    assert "Traceback" not in err


def test_jsonl_bad_line_names_line_and_record(tmp_path, processor, image_folder, cli):
    path = tmp_path / "train.jsonl"
    good = json.dumps(GOOD)
    # line 1 good, line 2 blank, line 3 cut short: it would be the second record (index 1)
    path.write_text(f"{good}\n\n{good[:40]}\n{good}\n")
    with pytest.raises(DataError) as info:
        check(path, processor, image_folder)
    [problem] = info.value.problems
    assert (problem.file, problem.index) == (str(path), 1)
    assert problem.message.startswith("invalid JSON at line 3, column ")

    rc, err = cli(path, image_folder)
    assert rc == 2
    assert f"{path}: record 1: invalid JSON at line 3, column " in err
    assert "Traceback" not in err


def test_jsonl_of_good_records_passes(tmp_path, processor, image_folder):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD, "id": str(i)}) for i in range(3)) + "\n")
    checked = check(path, processor, image_folder)
    assert [s.id for s in checked.samples] == ["0", "1", "2"]
    assert checked.image_paths == [[str(image_folder / "good.png")]] * 3


def mixed_file(tmp_path) -> Path:
    """Five records: 0 and 3 good; 1, 2 and 4 broken in different ways."""
    return write_records(tmp_path / "train.json", [
        {**GOOD, "id": "g0"},
        {"id": "b1", "image": "nowhere.png", "conversations": GOOD["conversations"]},
        {"id": "b2", "conversations": [turn("human", "Hi"), turn("human", "Hello?"), turn("gpt", "Yes.")]},
        {**GOOD, "id": "g3"},
        {"id": "b4", "conversations": [turn("human", "Hi <|im_start|>"), turn("gpt", "Yes.")]},
    ])


def test_every_bad_record_is_listed(tmp_path, processor, image_folder, cli):
    path = mixed_file(tmp_path)
    with pytest.raises(DataError) as info:
        check(path, processor, image_folder)
    problems = info.value.problems
    assert [(p.index, p.record_id, p.field) for p in problems] == [
        (1, "b1", "image[0]"), (2, "b2", "conversations[1].from"), (4, "b4", "conversations[0].value"),
    ]

    rc, err = cli(path, image_folder)
    assert rc == 2
    assert "3 problem(s) in " in err
    for index, record_id in [(1, "b1"), (2, "b2"), (4, "b4")]:
        assert f"record {index} (id '{record_id}')" in err
    assert "'g0'" not in err and "'g3'" not in err


def test_skip_bad_samples_keeps_the_good_records(tmp_path, processor, image_folder, cli):
    path = mixed_file(tmp_path)
    checked = check(path, processor, image_folder, skip_bad_samples=True)
    assert [s.id for s in checked.samples] == ["g0", "g3"]
    assert checked.n_records == 5
    assert [p.index for p in checked.skipped] == [1, 2, 4]
    assert len(checked.lengths) == 2 and checked.overlong == []
    assert checked.summary().startswith("2 of 5 records usable; 3 problem(s) skipped")

    rc, err = cli(path, image_folder, "--skip_bad_samples", "true", "--max_bad_fraction", "0.6")
    assert rc == 0
    assert "2 of 5 records usable; 3 problem(s) skipped" in err
    assert err.count("skipped: ") == 3
    rc, err = cli(path, image_folder, "--skip_bad_samples", "true")  # 3 of 5 is more than the default 0.5
    assert rc == 2 and "would leave out 3 of the 5 records" in err and "--max_bad_fraction" in err


def test_all_bad_records_with_skip_is_an_error(tmp_path, processor, image_folder, cli):
    path = write_records(tmp_path / "train.json", [
        {"id": "b0", "image": "text.png", "conversations": GOOD["conversations"]},
        {"id": "b1", "conversations": [turn("gpt", "Hi")]},
    ])
    with pytest.raises(VlftError, match="no usable records") as info:
        check(path, processor, image_folder, skip_bad_samples=True)
    assert str(path) in str(info.value)
    assert "0 of 2 records usable" in str(info.value)

    rc, err = cli(path, image_folder, "--skip_bad_samples", "true", "--max_bad_fraction", "1")
    assert rc == 2
    assert "no usable records" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def demo_lengths(processor) -> list[int]:
    return check(DEMO_DATA, processor, DEMO_IMAGES).lengths


def test_overlong_records_are_dropped_and_counted(processor, demo_lengths, cli):
    limit = 50
    long_ones = [i for i, n in enumerate(demo_lengths) if n > limit]
    assert 0 < len(long_ones) < len(demo_lengths)  # the limit splits the demo file
    checked = check(DEMO_DATA, processor, DEMO_IMAGES, max_seq_length=limit)
    assert [p.index for p in checked.overlong] == long_ones
    assert [s.index for s in checked.samples] == [i for i, n in enumerate(demo_lengths) if n <= limit]
    assert checked.lengths == [n for n in demo_lengths if n <= limit]
    assert checked.skipped == []
    for p in checked.overlong:
        assert p.message == f"{demo_lengths[p.index]} tokens (vision tokens included) > --max_seq_length {limit}"
    assert f"{len(long_ones)} over --max_seq_length dropped" in checked.summary()

    rc, err = cli(DEMO_DATA, DEMO_IMAGES, "--max_seq_length", str(limit))
    assert rc == 0
    assert f"{len(demo_lengths) - len(long_ones)} of {len(demo_lengths)} records usable" in err
    assert f"{len(long_ones)} over --max_seq_length dropped" in err


def test_record_exactly_at_the_limit_is_kept(processor, demo_lengths):
    limit = sorted(demo_lengths)[len(demo_lengths) // 2]
    checked = check(DEMO_DATA, processor, DEMO_IMAGES, max_seq_length=limit)
    assert limit in checked.lengths
    assert all(demo_lengths[p.index] > limit for p in checked.overlong)


def test_reject_overlong_raises(processor, demo_lengths, cli):
    limit = 50
    long_ones = [i for i, n in enumerate(demo_lengths) if n > limit]
    with pytest.raises(DataError) as info:
        check(DEMO_DATA, processor, DEMO_IMAGES, max_seq_length=limit, reject_overlong=True)
    assert [p.index for p in info.value.problems] == long_ones
    assert "--reject_overlong" in str(info.value)

    rc, err = cli(DEMO_DATA, DEMO_IMAGES, "--max_seq_length", str(limit), "--reject_overlong", "true")
    assert rc == 2
    demo = json.loads(DEMO_DATA.read_text())
    i = long_ones[0]
    assert f"{DEMO_DATA}: record {i} (id '{demo[i]['id']}'): {demo_lengths[i]} tokens" in err


def test_all_overlong_is_an_error(processor):
    with pytest.raises(VlftError, match="no usable records"):
        check(DEMO_DATA, processor, DEMO_IMAGES, max_seq_length=10)


@pytest.mark.parametrize("min_pixels, max_pixels", [
    (DEFAULT_IMAGE_MIN_PIXELS, DEFAULT_IMAGE_MAX_PIXELS),  # what the scripts use: the images keep their size
    (256, 1024),  # every demo image is shrunk
    (4096, 8192),  # the smaller demo images are enlarged
])
def test_lengths_match_the_dataset(processor, min_pixels, max_pixels):
    checked = check(DEMO_DATA, processor, DEMO_IMAGES, image_min_pixels=min_pixels, image_max_pixels=max_pixels)
    assert len(checked.samples) == 10
    media = MediaSettings(image_min_pixels=min_pixels, image_max_pixels=max_pixels)
    dataset = SFTDataset(checked.samples, checked.image_paths, processor, media=media)
    assert [len(dataset[i]["input_ids"]) for i in range(len(dataset))] == checked.lengths


def test_pixel_budget_changes_the_lengths(processor, demo_lengths):
    small = check(DEMO_DATA, processor, DEMO_IMAGES, image_min_pixels=256, image_max_pixels=256)
    with_images = [i for i, s in enumerate(small.samples) if s.images]
    assert with_images
    assert all(small.lengths[i] < demo_lengths[i] for i in with_images)
    assert all(small.lengths[i] == demo_lengths[i] for i, s in enumerate(small.samples) if not s.images)


def test_check_data_cli_missing_file(tmp_path, cli):
    rc, err = cli(tmp_path / "absent.json", tmp_path)
    assert rc == 2
    assert f"--data_path {tmp_path / 'absent.json'}: file not found" in err


def test_check_data_cli_needs_model_and_data(capsys):
    assert main(["check-data", "--data_path", str(DEMO_DATA)]) == 2
    assert "needs --model_id and --data_path" in capsys.readouterr().err


def test_check_data_process_exit_code_and_no_traceback(tmp_path, tiny_model_dir, image_folder):
    path = mixed_file(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "vlft", "check-data", "--model_id", str(tiny_model_dir), "--data_path", str(path),
         "--image_folder", str(image_folder)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}: record 1 (id 'b1'), field 'image[0]'" in proc.stderr
    assert f"{path}: record 4 (id 'b4'), field 'conversations[0].value'" in proc.stderr


@pytest.mark.parametrize("stage,data", [("grpo", "grpo_demo.json"), ("dpo", "dpo_demo.json"),
                                        ("predict", "grpo_demo.json")])
def test_check_data_reads_every_stage_demo(tiny_model_dir, capsys, stage, data):
    """Each stage's demo passes its own check; prediction also takes the flat `prompt` form of the DPO / GRPO
    examples (a prompt to answer, with no reference)."""
    path = Path(__file__).resolve().parents[1] / "data_examples" / data
    n = len(json.loads(path.read_text()))
    assert main(["check-data", "--stage", stage, "--model_id", str(tiny_model_dir), "--data_path", str(path)]) == 0
    assert f"{n} of {n} records usable" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_vl_moe"])
def test_check_data_reads_every_stage_demo_for_the_new_families(tiny_model_factory, capsys, family):
    """The SFT, DPO and GRPO demos pass the check with the new families' processors (Qwen3.5's thinking template
    and Qwen3_5Tokenizer; Qwen3-VL-MoE's)."""
    examples = Path(__file__).resolve().parents[1] / "data_examples"
    model = str(tiny_model_factory(family))
    for stage, data, folder in (("sft", "llava_demo.json", examples / "images"), ("dpo", "dpo_demo.json", examples),
                                ("grpo", "grpo_demo.json", examples)):
        n = len(json.loads((examples / data).read_text()))
        assert main(["check-data", "--stage", stage, "--model_id", model, "--data_path", str(examples / data),
                     "--image_folder", str(folder)]) == 0
        assert f"{stage} data: {n} of {n} records usable" in capsys.readouterr().err


def test_a_missing_model_directory_is_named(tmp_path):
    from vlft.models.loading import load_processor

    with pytest.raises(VlftError, match="does not exist; check the path"):
        load_processor(str(tmp_path / "runs" / "typo"))
