"""Several --data_path files with record counts and fractions (data/mixture.py): parsing, ms-swift's selection rule,
each file checked and reported on its own, the log lines, and SFT training on two files."""
from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from conftest import DEMO_DATA, DEMO_IMAGES, DEMO_MEDIA

from vlft.data.mixture import (
    PARALLEL_FIELDS,
    PROBLEM_FIELDS,
    DataSource,
    MixedData,
    MixtureError,
    data_files,
    parse_data_paths,
    prepare_mixture,
    record_keys,
    select_records,
    single_data_path,
    source_rng,
)
from vlft.data.prepare import CONVERSATION, PreparedData
from vlft.errors import DataError, VlftError


def write(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def chat(i: int, prefix: str = "r") -> dict:
    return {"id": f"{prefix}{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                                    {"from": "gpt", "value": f"answer {i}"}]}


# --- parsing ---------------------------------------------------------------------------------------------------


def test_entries_as_a_list_a_comma_string_or_a_space_string(tmp_path):
    a, b, c = (write(tmp_path / n, [chat(0)]) for n in ("a.json", "b.jsonl", "c.json"))
    expected = [DataSource(a, None, None, a), DataSource(b, 1000, None, f"{b}#1000"),
                DataSource(c, None, 0.5, f"{c}#0.5")]
    assert parse_data_paths([a, f"{b}#1000", f"{c}#0.5"]) == expected
    assert parse_data_paths(f"{a},{b}#1000,{c}#0.5") == expected  # LLaMA-Factory's `dataset: a,b`
    assert parse_data_paths([f"{a} {b}#1000", f"{c}#0.5"]) == expected  # a script's DATA="a b#1000"
    assert data_files([a, f"{b}#1000"]) == [a, b]


def test_a_hash_or_space_that_is_part_of_an_existing_name_is_the_name(tmp_path):
    hashed = write(tmp_path / "set#2.json", [chat(0)])
    spaced = write(tmp_path / "my data.json", [chat(0)])
    assert parse_data_paths([hashed]) == [DataSource(hashed, None, None, hashed)]
    assert parse_data_paths([f"{hashed}#3"]) == [DataSource(hashed, 3, None, f"{hashed}#3")]
    assert parse_data_paths(spaced) == [DataSource(spaced, None, None, spaced)]


@pytest.mark.parametrize("suffix, words", [
    ("0", "#0 selects no record"),
    ("1.0", "is no fraction between 0 and 1"),
    ("1.5", "is no fraction between 0 and 1"),
    ("-3", "is no fraction between 0 and 1"),
    ("abc", "#abc is neither a record count (#1000) nor a fraction"),
    ("nan", "is neither a record count"),
])
def test_a_bad_suffix_is_named(tmp_path, suffix, words):
    a = write(tmp_path / "a.json", [chat(0)])
    with pytest.raises(VlftError) as info:
        parse_data_paths([f"{a}#{suffix}"])
    assert f"--data_path {a}#{suffix}: " in str(info.value) and words in str(info.value)


def test_missing_files_are_named_together(tmp_path):
    a = write(tmp_path / "a.json", [chat(0)])
    with pytest.raises(VlftError, match=rf"^--data_path {tmp_path / 'x.json'}: file not found$"):
        parse_data_paths([a, str(tmp_path / "x.json")])
    with pytest.raises(VlftError) as info:
        parse_data_paths(f"{a},{tmp_path / 'x.json'}#10 {tmp_path / 'y.json'}")
    message = str(info.value)
    assert message.startswith("--data_path: 2 files not found: ")
    assert str(tmp_path / "x.json") + " (read from" in message and str(tmp_path / "y.json") in message
    with pytest.raises(VlftError, match="names no file"):
        parse_data_paths(" , ")


def test_predict_and_preview_take_one_whole_file(tmp_path):
    a, b = write(tmp_path / "a.json", [chat(0)]), write(tmp_path / "b.json", [chat(0)])
    assert single_data_path([a], command="vlft predict", why="w") == a
    with pytest.raises(VlftError, match=r"vlft predict takes one file in --data_path \(w\); got 2: .*Run it once"):
        single_data_path([a, b], command="vlft predict", why="w")
    with pytest.raises(VlftError, match=r"takes the whole file \(w\): drop the #5 of --data_path .*a.json#5"):
        single_data_path([f"{a}#5"], command="vlft predict", why="w")


# --- selection -------------------------------------------------------------------------------------------------


def test_a_count_selects_exactly_that_many_distinct_records_reproducibly():
    source = DataSource("f", count=30)
    first = select_records(100, source, source_rng(42, 0))
    assert len(first) == 30 and len(set(first)) == 30 and first == sorted(first) and max(first) < 100
    assert select_records(100, source, source_rng(42, 0)) == first  # same --seed: the same records
    assert select_records(100, source, source_rng(7, 0)) != first  # another --seed: others
    assert select_records(100, source, source_rng(42, 1)) != first  # another position: its own stream


@pytest.mark.parametrize("fraction, usable, expected", [(0.5, 10, 5), (0.25, 10, 3), (0.3, 10, 3), (0.5, 5, 3),
                                                        (0.01, 10, 1), (0.999, 10, 10)])
def test_a_fraction_selects_its_rounded_share_and_at_least_one(fraction, usable, expected):
    picked = select_records(usable, DataSource("f", fraction=fraction), source_rng(0, 0))
    assert len(picked) == expected and len(set(picked)) == expected


def test_a_count_above_the_file_repeats_it_whole_then_draws_the_rest():
    """ms-swift's `sample_dataset`: N // usable whole copies, then N % usable drawn without replacement."""
    picked = select_records(4, DataSource("f", count=10), source_rng(3, 0))
    assert picked[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    rest = picked[8:]
    assert len(rest) == 2 and len(set(rest)) == 2
    assert sorted(Counter(picked).values()) == [2, 2, 3, 3]
    assert select_records(4, DataSource("f", count=8), source_rng(3, 0)) == [0, 1, 2, 3] * 2
    assert select_records(4, DataSource("f"), source_rng(3, 0)) == [0, 1, 2, 3]


def test_the_draw_is_uniform_over_the_records():
    """Every record is equally likely to be drawn: 2000 draws of 3 of 6 records, each record near 1000 times."""
    counts = Counter(i for seed in range(2000) for i in select_records(6, DataSource("f", count=3), source_rng(seed, 0)))
    assert set(counts) == set(range(6)) and all(abs(n - 1000) < 120 for n in counts.values())


# --- prepare_mixture with a stand-in for prepare_data: the concatenation and the log -------------------------


@dataclass(frozen=True)
class FakeSample:
    index: int
    id: str


def fake_prepare(path, record_format, **kwargs) -> PreparedData:
    """PreparedData of a JSON list file: every record usable, its length 100 + its index, no media."""
    records = json.loads(open(path).read())
    n = len(records)
    return PreparedData([FakeSample(i, r["id"]) for i, r in enumerate(records)], [[f"{r['id']}.png"] for r in records],
                        [(100 + i,) for i in range(n)], n, video_sources=[[] for _ in records],
                        image_specs=[[] for _ in records], video_specs=[[] for _ in records],
                        rejected_media=[None] * n)


def test_every_list_field_of_prepared_data_is_selected_or_a_problem_list():
    # per-record fields are lists or (from a store) sequences; `indices` is a record's index in its own file, which a
    # mix of files replaces by `origins`
    lists = {f.name for f in dataclasses.fields(PreparedData) if "list" in str(f.type) or "Sequence" in str(f.type)}
    assert lists - {"indices"} == set(PARALLEL_FIELDS) | set(PROBLEM_FIELDS)


def test_one_file_without_a_suffix_is_prepared_as_before(tmp_path, capsys):
    a = write(tmp_path / "a.json", [chat(i) for i in range(3)])
    calls = []

    def prepare(path, record_format, **kwargs):
        calls.append((path, record_format, kwargs))
        return "prepared"

    assert prepare_mixture([a], CONVERSATION, seed=1, prepare=prepare, max_seq_length=9) == "prepared"
    assert calls == [(a, CONVERSATION, {"max_seq_length": 9})]
    assert "data mix" not in capsys.readouterr().err


def test_files_are_concatenated_in_order_with_their_selection_and_logged(tmp_path, capsys):
    a = write(tmp_path / "a.json", [chat(i, "a") for i in range(4)])
    b = write(tmp_path / "b.json", [chat(i, "b") for i in range(20)])
    c = write(tmp_path / "c.json", [chat(i, "c") for i in range(3)])
    data = prepare_mixture([a, f"{b}#0.25", f"{c}#7"], CONVERSATION, seed=5, prepare=fake_prepare)
    assert isinstance(data, MixedData)
    ids = [s.id for s in data.samples]
    b_picked = select_records(20, DataSource(b, fraction=0.25), source_rng(5, 1))
    c_picked = select_records(3, DataSource(c, count=7), source_rng(5, 2))
    assert ids == ["a0", "a1", "a2", "a3"] + [f"b{i}" for i in b_picked] + [f"c{i}" for i in c_picked]
    assert len(b_picked) == 5 and len(c_picked) == 7
    # every parallel field follows the samples
    assert data.image_paths == [[f"{i}.png"] for i in ids]
    assert data.sequence_lengths == [(100 + s.index,) for s in data.samples]
    assert data.lengths == [100 + s.index for s in data.samples]
    assert len(data.video_sources) == len(data.image_specs) == len(data.rejected_media) == 16
    assert data.origins == [(0, i) for i in range(4)] + [(1, i) for i in b_picked] + [(2, i) for i in c_picked]
    assert record_keys(data) == [[p, ("a.json", "b.json", "c.json")[p], i] for p, i in data.origins]
    assert (data.n_records, data.usable) == (27, 27)
    assert data.summary().startswith("16 records selected from 3 file(s) (27 of 27 records usable); tokens per record")

    err = capsys.readouterr().err
    assert f"[vlft] data {a}: 4 of 4 records usable; tokens per record min 100 / median 102 / max 103; all selected" in err
    assert f"[vlft] data {b}#0.25: 20 of 20 records usable;" in err and "; 5 selected (#0.25 of 20, drawn with --seed 5)" in err
    assert f"[vlft] data {c}#7: 3 of 3 records usable;" in err
    assert "; 7 selected (#7: the file whole 2 times + 1 drawn with --seed 5)" in err
    assert f"[vlft] data mix: 16 records: {a} 4 (25.0%), {b} 5 (31.2%), {c} 7 (43.8%)" in err


def test_the_selection_follows_the_seed(tmp_path):
    a = write(tmp_path / "a.json", [chat(i, "a") for i in range(50)])
    b = write(tmp_path / "b.json", [chat(i, "b") for i in range(50)])

    def ids(seed):
        return [s.id for s in prepare_mixture([f"{a}#10", f"{b}#0.2"], CONVERSATION, seed=seed,
                                              prepare=fake_prepare).samples]

    assert ids(1) == ids(1) and len(ids(1)) == 20
    assert ids(1) != ids(2)
    assert sum(i.startswith("a") for i in ids(2)) == 10


def test_a_file_given_twice_is_prepared_and_counted_once(tmp_path):
    a = write(tmp_path / "a.json", [chat(i) for i in range(5)])
    calls = []

    def prepare(path, record_format, **kwargs):
        calls.append(path)
        return fake_prepare(path, record_format)

    data = prepare_mixture([a, f"{a}#2"], CONVERSATION, seed=0, prepare=prepare)
    assert calls == [a] and len(data.samples) == 7 and data.n_records == 5


# --- the real start-up check: each file on its own ---------------------------------------------------------------


@pytest.fixture()
def checks(processor):
    return dict(processor=processor, image_folder=None, media=DEMO_MEDIA, max_seq_length=4096)


def no_answer(i: int) -> dict:
    return {"id": f"bad{i}", "conversations": [{"from": "human", "value": "a question with no answer"}]}


def test_each_files_problems_are_reported_naming_that_file(tmp_path, checks):
    good = write(tmp_path / "good.json", [chat(i) for i in range(3)])
    bad_a = write(tmp_path / "bad_a.json", [chat(0), no_answer(1)])
    bad_b = tmp_path / "bad_b.jsonl"
    bad_b.write_text("{not json\n" + json.dumps(chat(1)) + "\n")
    with pytest.raises(MixtureError) as info:
        prepare_mixture([bad_a, good, f"{bad_b}#5"], CONVERSATION, seed=0, **checks)
    message = str(info.value)
    assert message.startswith("2 of the 3 --data_path files cannot be used; each is reported on its own:")
    assert f"[{bad_a}]\n1 problem(s) in {bad_a}:\n  - {bad_a}: record 1 (id 'bad1')" in message
    assert f"[{bad_b}#5]\n1 problem(s) in {bad_b}:\n  - {bad_b}: record 0" in message
    assert good not in message
    assert {p.file for p in info.value.problems} == {bad_a, str(bad_b)}
    # one failing file: its own report, unchanged
    with pytest.raises(DataError) as one:
        prepare_mixture([good, bad_a], CONVERSATION, seed=0, **checks)
    assert not isinstance(one.value, MixtureError) and str(one.value).startswith(f"1 problem(s) in {bad_a}:")


def test_skip_bad_samples_and_its_limit_count_each_file_on_its_own(tmp_path, checks, capsys):
    good = write(tmp_path / "good.json", [chat(i) for i in range(8)])
    mostly_bad = write(tmp_path / "mostly_bad.json", [chat(0), no_answer(1), no_answer(2)])
    # 2 of the 11 records are bad (18%), but 2 of mostly_bad's 3 (67%): its own --max_bad_fraction stops it
    with pytest.raises(DataError, match=rf"would leave out 2 of the 3 records of {mostly_bad} \(67%\)"):
        prepare_mixture([good, mostly_bad], CONVERSATION, seed=0, skip_bad_samples=True, max_bad_fraction=0.5,
                        **checks)
    data = prepare_mixture([good, f"{mostly_bad}#3"], CONVERSATION, seed=0, skip_bad_samples=True, **checks)
    assert [s.id for s in data.samples] == [f"r{i}" for i in range(8)] + ["r0"] * 3
    assert len(data.skipped) == 2 and all(p.file == mostly_bad for p in data.skipped)
    err = capsys.readouterr().err
    assert f"data {mostly_bad}#3: 1 of 3 records usable; 2 problem(s) skipped;" in err
    assert "3 selected (#3: the file whole 3 times)" in err
    assert f"data mix: 11 records: {good} 8 (72.7%), {mostly_bad} 3 (27.3%)" in err
    assert data.summary().startswith("11 records selected from 2 file(s) (9 of 11 records usable; 2 problem(s) skipped)")


def test_media_paths_resolve_per_file(tmp_path, checks):
    """Without --image_folder each file's relative paths resolve against its own folder."""
    import shutil

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        shutil.copy(DEMO_IMAGES / "red_square.png", tmp_path / name / "pic.png")
    record = {"image": "pic.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                    {"from": "gpt", "value": "Red."}]}
    one = write(tmp_path / "one" / "d.json", [record])
    two = write(tmp_path / "two" / "d.json", [record])
    data = prepare_mixture([one, two], CONVERSATION, seed=0, **checks)
    assert data.image_paths == [[str(tmp_path / "one" / "pic.png")], [str(tmp_path / "two" / "pic.png")]]


def test_resume_and_reference_cache_identities_include_each_files_selection(tmp_path):
    from vlft.train.core.checkpoints import data_digest, file_digest

    a, b = write(tmp_path / "a.json", [chat(0)]), write(tmp_path / "b.json", [chat(1)])
    assert data_digest([a, f"{b}#10"]) == {"a.json": file_digest(a), "b.json#10": file_digest(b)}
    assert data_digest(f"{a},{b}#10") == data_digest([a, f"{b}#10"])
    assert data_digest([a]) == data_digest(a) == {"a.json": file_digest(a)}  # a one-file run resumes as before
    assert data_digest([a, f"{b}#11"]) != data_digest([a, f"{b}#10"])


# --- SFT on two files ---------------------------------------------------------------------------------------------


def test_sft_trains_on_two_files_with_a_count(tiny_model_dir, tmp_path, capsys):
    from vlft.train.sft.run import run

    images = [r for r in json.loads(DEMO_DATA.read_text()) if "image" in r]
    a = write(tmp_path / "pictures.json", images)
    b = write(tmp_path / "text.json", [chat(i, "t") for i in range(20)])
    out = tmp_path / "run"
    summary, trainer = run(["--model_id", str(tiny_model_dir), "--output_dir", str(out), "--data_path", a, f"{b}#6",
                            "--image_folder", str(DEMO_IMAGES), "--per_device_train_batch_size", "2",
                            "--num_train_epochs", "1", "--learning_rate", "1e-3", "--save_strategy", "no",
                            "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3"])
    trained = [s.id for s in trainer.train_dataset.samples]
    drawn = [f"t{i}" for i in select_records(20, DataSource(b, count=6), source_rng(3, 1))]
    assert trained == [r["id"] for r in images] + drawn
    assert summary["steps"] == (len(images) + 6) // 2
    err = capsys.readouterr().err
    share = f"{len(images) / (len(images) + 6):.1%}"
    assert f"data mix: {len(images) + 6} records: {a} {len(images)} ({share}), {b} 6 (" in err
    assert f"data: {len(images) + 6} records selected from 2 file(s) ({len(images) + 20} of {len(images) + 20}" in err
    args = json.loads((out / "vlft_args.json").read_text())
    assert args["data_path"] == [a, f"{b}#6"]
    card = (out / "README.md").read_text()
    assert f"`{a}`, `{b}#6`" in card and f"--data_path {a}" in card


def test_a_random_module_state_does_not_change_the_draw(tmp_path):
    a = write(tmp_path / "a.json", [chat(i) for i in range(30)])
    random.seed(1)
    first = [s.index for s in prepare_mixture([f"{a}#5"], CONVERSATION, seed=9, prepare=fake_prepare).samples]
    random.seed(2)
    assert [s.index for s in prepare_mixture([f"{a}#5"], CONVERSATION, seed=9, prepare=fake_prepare).samples] == first


def test_a_scripts_data_setting_may_name_several_files(tmp_path):
    """DATA="a.json b.json#3" reaches vlft as one --data_path value; it reads as the two files."""
    from test_scripts import launched_argv

    from vlft.config import parse_args
    from vlft.train.sft.config import GROUPS as SFT_GROUPS

    a, b = write(tmp_path / "a.json", [chat(0)]), write(tmp_path / "b.json", [chat(1)])
    calls = launched_argv(tmp_path, "finetune_lora.sh", DATA=f"{a} {b}#3", IMAGE_FOLDER=str(DEMO_IMAGES))
    data_args = parse_args(SFT_GROUPS, calls["sft"])[1]
    assert parse_data_paths(data_args.data_path) == [DataSource(a, None, None, a), DataSource(b, 3, None, f"{b}#3")]


# --- check-data and the DPO reference cache -------------------------------------------------------------------


def test_check_data_reports_each_file_and_the_mix(tiny_model_dir, tmp_path, capsys):
    from vlft.cli import main

    a = write(tmp_path / "a.json", [chat(i, "a") for i in range(4)])
    b = write(tmp_path / "b.json", [chat(i, "b") for i in range(10)])
    assert main(["check-data", "--model_id", str(tiny_model_dir), "--data_path", a, f"{b}#0.5"]) == 0
    err = capsys.readouterr().err
    assert f"data {a}: 4 of 4 records usable;" in err and f"data {b}#0.5: 10 of 10 records usable;" in err
    assert f"data mix: 9 records: {a} 4 (44.4%), {b} 5 (55.6%)" in err
    assert "sft data: 9 records selected from 2 file(s) (14 of 14 records usable)" in err
    bad = write(tmp_path / "bad.json", [no_answer(0), chat(1)])
    assert main(["check-data", "--model_id", str(tiny_model_dir), "--data_path", f"{a},{bad}", "--stage", "sft"]) == 2
    err = capsys.readouterr().err
    assert f"1 problem(s) in {bad}:" in err and f"{bad}: record 0 (id 'bad0')" in err and "Traceback" not in err


def test_the_dpo_reference_cache_key_names_each_pairs_file(tmp_path):
    """Two mixes whose pairs have the same record indices in different files get different keys."""
    from types import SimpleNamespace

    from vlft.data.reasoning import Thinking
    from vlft.train.dpo.run import reference_cache_key

    a = write(tmp_path / "a.json", [chat(i, "a") for i in range(4)])
    b = write(tmp_path / "b.json", [chat(i, "b") for i in range(4)])

    def key(value, seed):
        data = prepare_mixture(value, CONVERSATION, seed=seed, prepare=fake_prepare)
        return reference_cache_key(
            data_path=value, data=data, media_sha256="m", model_id="hub/model", media="settings", thinking=Thinking(),
            chat_template="t", model_args=SimpleNamespace(attn_implementation="sdpa"),
            tune_args=SimpleNamespace(bits=16), train_args=SimpleNamespace(bf16=False, fp16=False,
                                                                           truncation_mode="keep_end", ld_alpha=None),
            max_length=512)

    assert key([f"{a}#2", f"{b}#2"], 0) == key([f"{a}#2", f"{b}#2"], 0)
    seeds = [s for s in range(50) if select_records(4, DataSource(a, 2), source_rng(s, 0))
             == select_records(4, DataSource(b, 2), source_rng(0, 1))
             and select_records(4, DataSource(b, 2), source_rng(s, 1))
             == select_records(4, DataSource(a, 2), source_rng(0, 0))]
    assert seeds  # a seed that swaps which indices each file gives: the same indices, in other files
    assert key([f"{a}#2", f"{b}#2"], seeds[0]) != key([f"{a}#2", f"{b}#2"], 0)
    assert key([a, b], 0) != key([b, a], 0)
