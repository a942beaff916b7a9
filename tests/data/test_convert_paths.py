"""`vlft convert`'s media paths (vlft/convert.py): media named relatively are written relative to the output's
folder, so data, media and output moved together as one folder still load; media named by an absolute path stay
absolute, so the output moved alone still loads."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA, REPO

from vlft.cli import main as cli_main
from vlft.data.prepare import prepare_sft_data
from vlft.errors import DataError

RECORDS = [r for r in json.loads(DEMO_DATA.read_text()) if "image" in r][:3]  # one record has two images
NAMES = sorted({n for r in RECORDS for n in (r["image"] if isinstance(r["image"], list) else [r["image"]])})


@pytest.fixture(autouse=True)
def media_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))


def project(root, media: str = "data/imgs"):
    """root/data/train.json naming its images as `imgs/<name>` (relative to the data file), the images in
    root/<media>, and an empty root/out/."""
    (root / "data").mkdir(parents=True)
    (root / "out").mkdir()
    (root / media).mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        shutil.copy(DEMO_IMAGES / name, root / media / name)
    records = [{**r, "image": [f"imgs/{n}" for n in (r["image"] if isinstance(r["image"], list) else [r["image"]])]}
               for r in RECORDS]
    (root / "data" / "train.json").write_text(json.dumps(records))
    return root


def written_images(out) -> list[str]:
    return [p for line in out.read_text().splitlines() for p in json.loads(line)["image"]]


def loads(data, processor) -> bool:
    """The JSONL goes through training's data check with no --image_folder (every image found and read)."""
    checked = prepare_sft_data(str(data), processor=processor, image_folder=None, media=DEMO_MEDIA,
                               max_seq_length=4096)
    return checked.n_records == len(RECORDS) and not checked.skipped


def test_relative_input_is_written_relative_and_the_moved_folder_loads(tmp_path, monkeypatch, processor):
    root = project(tmp_path / "project")
    monkeypatch.chdir(root)
    assert cli_main(["convert", "--data_path", "data/train.json", "--output", "out/train.jsonl"]) == 0
    assert written_images(root / "out" / "train.jsonl")[:2] == [f"../data/imgs/{RECORDS[0]['image']}",
                                                                f"../data/imgs/{RECORDS[1]['image']}"]
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(root, moved)
    assert loads(moved / "out" / "train.jsonl", processor)


def test_relative_image_folder_is_relative_too(tmp_path, monkeypatch, processor):
    root = project(tmp_path / "project", media="pictures/imgs")
    monkeypatch.chdir(root)
    assert cli_main(["convert", "--data_path", "data/train.json", "--output", "out/train.jsonl",
                     "--image_folder", "pictures"]) == 0
    assert all(p.startswith("../pictures/imgs/") for p in written_images(root / "out" / "train.jsonl"))
    monkeypatch.chdir(tmp_path)
    shutil.move(root, tmp_path / "moved")
    assert loads(tmp_path / "moved" / "out" / "train.jsonl", processor)


def test_absolute_input_stays_absolute_and_the_output_moves_alone(tmp_path, processor, capsys):
    root = project(tmp_path / "project")
    out = root / "out" / "train.jsonl"
    assert cli_main(["convert", "--data_path", str(root / "data" / "train.json"), "--output", str(out)]) == 0
    assert all(p.startswith(str(root / "data" / "imgs")) for p in written_images(out))
    assert "media path(s) written absolute" in capsys.readouterr().err
    elsewhere = tmp_path / "shared" / "train.jsonl"
    elsewhere.parent.mkdir()
    shutil.move(out, elsewhere)
    assert loads(elsewhere, processor)


def test_media_under_the_output_folder_are_relative_whatever_was_given(tmp_path, processor):
    root = project(tmp_path / "project", media="out/imgs")
    out = root / "out" / "train.jsonl"
    assert cli_main(["convert", "--data_path", str(root / "data" / "train.json"), "--output", str(out),
                     "--image_folder", str(root / "out")]) == 0
    assert all(p.startswith("imgs/") for p in written_images(out))
    shutil.move(root / "out", tmp_path / "out-moved")
    assert loads(tmp_path / "out-moved" / "train.jsonl", processor)
    shutil.rmtree(tmp_path / "out-moved" / "imgs")
    with pytest.raises(DataError):  # the check's other side: a JSONL whose images are gone does not load
        loads(tmp_path / "out-moved" / "train.jsonl", processor)


def test_relative_media_dir_for_embedded_images(tmp_path, monkeypatch, processor):
    """Embedded images extracted into a relative --media_dir outside the output's folder: written relative to the
    output (before, such a path was read against the data file's folder)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert cli_main(["convert", "--data_path", str(REPO / "data_examples" / "hf_demo.parquet"), "--output",
                     "out/train.jsonl", "--media_dir", "extracted"]) == 0
    paths = [p for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()
             for p in json.loads(line).get("image", [])]
    assert paths and all(p.startswith("../extracted/") for p in paths)
    assert all((tmp_path / "out" / p).is_file() for p in paths)
