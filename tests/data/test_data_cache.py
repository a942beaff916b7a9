"""The prepared-data cache (data/index.py, data/store.py): a cached launch gives what a fresh preparation gives;
every input the result depends on invalidates it; only the records a changed media file touches are prepared again;
a killed preparation leaves nothing trusted; several processes prepare once; processes split a file exactly."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA, REPO
from vlft.data import index as index_module
from vlft.data.prepare import CONVERSATION, CONVERSATION_OR_PROMPT, prepare_data
from vlft.data.reasoning import Thinking
from vlft.data.store import Column
from vlft.errors import DataError

PREPARING = "data: preparing"


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """The demo records (images copied, so tests may change them) plus a bad and an over-long record."""
    images = tmp_path / "images"
    shutil.copytree(DEMO_IMAGES, images)
    records = json.loads(DEMO_DATA.read_text())
    records.append({"id": "bad", "image": "missing.png",
                    "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]})
    records.append({"id": "long", "conversations": [{"from": "human", "value": "word " * 300},
                                                    {"from": "gpt", "value": "ok"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def prepare(folder: Path, processor, cache, **overrides):
    kwargs = dict(processor=processor, image_folder=str(folder / "images"), media=DEMO_MEDIA, max_seq_length=200,
                  skip_bad_samples=True, max_bad_fraction=1.0, cache_dir=cache)
    kwargs.update(overrides)
    fmt = kwargs.pop("record_format", CONVERSATION)
    return prepare_data(str(kwargs.pop("path", folder / "data.json")), fmt, **kwargs)


def snapshot(data) -> dict:
    """Everything a stage reads of prepared data, as plain values."""
    return {"samples": [dataclasses.asdict(s) for s in data.samples], "images": list(data.image_paths),
            "videos": list(data.video_sources), "lengths": list(data.sequence_lengths),
            "image_specs": [[dataclasses.astuple(s) for s in specs] for specs in data.image_specs],
            "video_specs": [[dataclasses.astuple(s) for s in specs] for specs in data.video_specs],
            "skipped": [str(p) for p in data.skipped], "overlong": [str(p) for p in data.overlong],
            "n_records": data.n_records, "flags": [int(f) for f in data.flags]}


def preparations(capsys) -> int:
    return capsys.readouterr().err.count(PREPARING)


def test_a_cached_launch_gives_what_a_fresh_preparation_gives(data_dir, processor, tmp_path, capsys):
    fresh = snapshot(prepare(data_dir, processor, None))
    assert fresh["skipped"] and fresh["overlong"] and len(fresh["samples"]) == 10  # the test sees every kind
    assert preparations(capsys) == 1
    first = prepare(data_dir, processor, tmp_path / "cache")
    assert preparations(capsys) == 1
    second = prepare(data_dir, processor, tmp_path / "cache")
    err = capsys.readouterr().err
    assert PREPARING not in err and "loaded from" in err
    assert snapshot(first) == fresh and snapshot(second) == fresh
    assert isinstance(second.samples, Column)  # per-record fields stay on disk, not as Python lists
    # the policy is applied on every call, not cached: a larger limit keeps the long record, without preparing
    wider = prepare(data_dir, processor, tmp_path / "cache", max_seq_length=10000)
    assert preparations(capsys) == 0
    assert len(wider.samples) == 11 and not wider.overlong
    with pytest.raises(DataError, match="missing.png"):  # and without --skip_bad_samples the bad record stops it
        prepare(data_dir, processor, tmp_path / "cache", skip_bad_samples=False)


def test_processes_split_a_file_exactly(data_dir, processor, tmp_path, monkeypatch, capsys):
    records = json.loads((data_dir / "data.json").read_text()) * 9
    (data_dir / "many.json").write_text(json.dumps(records))
    monkeypatch.setattr(index_module, "MIN_CHUNK", 8)
    one = prepare(data_dir, processor, None, path=data_dir / "many.json", num_proc=1)
    assert "in 1 process(es)" in capsys.readouterr().err
    two = prepare(data_dir, processor, tmp_path / "cache", path=data_dir / "many.json", num_proc=2)
    assert "in 2 process(es)" in capsys.readouterr().err
    assert snapshot(two) == snapshot(one) and len(one.samples) == 90


def test_progress_lines_say_rate_and_eta(data_dir, processor, monkeypatch, capsys):
    monkeypatch.setattr(index_module, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(index_module, "MIN_CHUNK", 3)
    prepare(data_dir, processor, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if "records prepared (" in line]
    assert lines and all("/s, ETA " in line for line in lines)
    assert lines[0].split("data: ")[1].split(": ")[1].startswith("3 / 12 records")


CHANGES = {
    "data file": lambda d, kw: (d / "data.json").write_text(
        json.dumps(json.loads((d / "data.json").read_text())[:-1])),
    "chat template": lambda d, kw: kw.update(processor=_with_template(kw["processor"])),
    "pixel budget": lambda d, kw: kw.update(media=dataclasses.replace(DEMO_MEDIA, image_max_pixels=3136 * 4)),
    "thinking flags": lambda d, kw: kw.update(thinking=Thinking(enable_thinking=False)),  # on a Qwen3.5 template
    "image folder": lambda d, kw: (shutil.copytree(d / "images", d / "other"), kw.update(image_folder=str(d / "other"))),
    "record format": lambda d, kw: kw.update(record_format=CONVERSATION_OR_PROMPT),
    "vlft version": lambda d, kw: kw.update(version="0.0.0-other"),
}


def _with_template(processor):
    import copy

    other = copy.copy(processor)
    other.chat_template = processor.chat_template.replace("You are a helpful assistant.", "You are terse.")
    return other


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_input_of_the_key_invalidates_the_cache(change, data_dir, processor, tmp_path, capsys, monkeypatch,
                                                     tiny_model_factory):
    if change == "thinking flags":  # a template with a thinking switch
        from vlft.models.loading import load_processor

        processor = load_processor(str(tiny_model_factory("qwen3_5")))
    cache = tmp_path / "cache"
    prepare(data_dir, processor, cache)
    assert preparations(capsys) == 1
    kwargs = {"processor": processor}
    CHANGES[change](data_dir, kwargs)
    if "version" in kwargs:
        monkeypatch.setattr("vlft.__version__", kwargs.pop("version"))
    changed = prepare(data_dir, **kwargs, cache=cache)
    assert preparations(capsys) == 1, f"a changed {change} must not load the old index"
    assert snapshot(changed) == snapshot(prepare(data_dir, **kwargs, cache=None))


def test_a_changed_media_file_prepares_only_the_records_that_read_it(data_dir, processor, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepare(data_dir, processor, cache)
    capsys.readouterr()
    # the missing image is added, one image grows: their records (3 of them) are prepared again, the rest reused
    Image.new("RGB", (64, 48), "red").save(data_dir / "images" / "missing.png")
    Image.new("RGB", (300, 200), "blue").save(data_dir / "images" / "green_circle.png")
    after = prepare(data_dir, processor, cache)
    err = capsys.readouterr().err
    assert "2 media file(s)" in err and "preparing 3 record(s)" in err and "9 taken from the previous index" in err
    assert snapshot(after) == snapshot(prepare(data_dir, processor, None))
    assert "bad" in [s.id for s in after.samples] and not after.skipped
    capsys.readouterr()
    prepare(data_dir, processor, cache)  # that generation is found again
    assert preparations(capsys) == 0


def test_an_edited_data_file_reuses_its_unchanged_records(data_dir, processor, tmp_path, capsys):
    cache = tmp_path / "cache"
    prepare(data_dir, processor, cache)
    records = json.loads((data_dir / "data.json").read_text())
    records[3]["conversations"][1]["value"] = "Edited answer."
    (data_dir / "data.json").write_text(json.dumps([records[-1], *records[:-1]]))  # one edited, all moved by one
    capsys.readouterr()
    edited = prepare(data_dir, processor, cache)
    err = capsys.readouterr().err
    assert "preparing 1 record(s)" in err and "11 taken from the previous index" in err
    fresh = prepare(data_dir, processor, None)
    assert snapshot(edited) == snapshot(fresh)
    assert [s.index for s in edited.samples] == [s.index for s in fresh.samples]


KILLED = textwrap.dedent("""
    import sys, time
    from vlft.data import prepare as p
    from vlft.data.index import prepared_store
    from vlft.models.loading import load_processor
    from tests.conftest import DEMO_MEDIA
    from vlft.data.prepare import CONVERSATION
    original = p.prepare_records
    def slow(job, indices):
        out = original(job, indices)
        print("WORKING", flush=True)
        time.sleep(60)
        return out
    p.prepare_records = slow
    prepared_store(sys.argv[1], CONVERSATION, processor=load_processor(sys.argv[2]), image_folder=sys.argv[3],
                   media=DEMO_MEDIA, cache_dir=sys.argv[4])
""")

PREPARE = textwrap.dedent("""
    import sys
    from vlft.data.prepare import CONVERSATION, prepare_data
    from vlft.models.loading import load_processor
    from tests.conftest import DEMO_MEDIA
    data = prepare_data(sys.argv[1], CONVERSATION, processor=load_processor(sys.argv[2]), image_folder=sys.argv[3],
                        media=DEMO_MEDIA, max_seq_length=200, skip_bad_samples=True, max_bad_fraction=1.0,
                        cache_dir=sys.argv[4])
    print("IDS", [s.id for s in data.samples], flush=True)
""")


def _python(script: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_killed_preparation_leaves_nothing_trusted(data_dir, processor, tiny_model_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    proc = _python(KILLED, data_dir / "data.json", tiny_model_dir, data_dir / "images", cache)
    deadline = time.time() + 120
    while time.time() < deadline and "WORKING" not in (proc.stdout.readline() or ""):
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stores = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "sources"]
    assert stores == []  # only its tmp folder and lock are left, and neither is an index
    fresh = snapshot(prepare(data_dir, processor, None))
    capsys.readouterr()
    again = prepare(data_dir, processor, cache)
    err = capsys.readouterr().err
    assert "which was preparing it" in err and PREPARING in err  # the dead holder is named, then replaced
    assert snapshot(again) == fresh


def test_two_processes_prepare_once(data_dir, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    procs = [_python(PREPARE, data_dir / "data.json", tiny_model_dir, data_dir / "images", cache) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum(err.count(PREPARING) for _, err in outputs) == 1
    ids = [line for out, _ in outputs for line in out.splitlines() if line.startswith("IDS")]
    assert len(ids) == 2 and ids[0] == ids[1]


def test_a_cache_folder_that_cannot_be_written_is_named_with_the_way_out(data_dir, processor, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(Exception) as err:
        prepare(data_dir, processor, blocked / "cache")
    assert type(err.value).__name__ == "VlftError"
    assert "--data_cache_dir" in str(err.value) and "--no_data_cache true" in str(err.value)


def test_the_flags_say_how_to_prepare(monkeypatch):
    from vlft.config import DataArguments

    monkeypatch.delenv("VLFT_DATA_CACHE")
    monkeypatch.setenv("VLFT_CACHE", "/somewhere")
    args = DataArguments(data_path=["a.json"], preprocessing_num_workers=3)  # LLaMA-Factory's spelling
    assert args.preparation() == {"num_proc": 3, "workers": 4, "cache_dir": Path("/somewhere/prepared")}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(index_module, "default_num_proc", lambda: 8)
    assert DataArguments(data_path=["a.json"], no_data_cache=True).preparation()["num_proc"] == 4
    assert DataArguments(data_path=["a.json"], data_cache_dir="/c").preparation() == {
        "num_proc": 8, "workers": 4, "cache_dir": "/c"}
    with pytest.raises(ValueError, match="contradicts"):
        DataArguments(data_path=["a.json"], dataset_num_proc=2, preprocessing_num_workers=3)
    with pytest.raises(ValueError, match="contradict each other"):
        DataArguments(data_path=["a.json"], no_data_cache=True, data_cache_dir="/c")


def test_a_read_only_cache_that_needs_a_new_generation_says_so(data_dir, processor, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    prepare(data_dir, processor, cache)
    Image.new("RGB", (300, 200), "blue").save(data_dir / "images" / "green_circle.png")

    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "touch", read_only)
    with pytest.raises(Exception) as err:
        prepare(data_dir, processor, cache)
    assert type(err.value).__name__ == "VlftError" and "cannot be written (Read-only file system)" in str(err.value)


def test_relative_paths_from_another_folder_are_another_index(data_dir, processor, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.chdir(data_dir)
    relative = prepare(data_dir, processor, cache, path="data.json", image_folder="images")
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # absolute paths now: no media "changed", the same records
    absolute = prepare(data_dir, processor, cache)
    err = capsys.readouterr().err
    assert "changed since" not in err
    assert [s.id for s in absolute.samples] == [s.id for s in relative.samples]
    assert all(Path(p).is_file() for paths in absolute.image_paths for p in paths)
