"""Errors that fit their flags (issue 14): what a message tells the user to do depends on the flags the run was
given (passed down explicitly), never suggests a flag that is already set or a value the run already uses, names
the length flag that set the limit, and names only flags some vlft command accepts."""
from __future__ import annotations

import argparse
import ast
import fnmatch
import importlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DEMO_MEDIA
from PIL import Image

from vlft.cli import COMMANDS, main
from vlft.data.prepare import prepare_data, prepare_sft_data
from vlft.errors import DataError, VlftError

REPO = Path(__file__).resolve().parents[1]
SKIP_SUGGESTED = "pass --skip_bad_samples"


def turn(speaker, value):
    return {"from": speaker, "value": value}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 24), (200, 30, 30)).save(folder / "good.png")
    return folder


GOOD = {"id": "good", "image": "good.png", "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "Red.")]}
LONG = {"id": "long", "conversations": [turn("human", "word " * 200), turn("gpt", "Yes.")]}
MISSING = {"id": "gone", "image": "nowhere.png", "conversations": GOOD["conversations"]}


def write(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records))
    return path


def check(path, images, **kw):
    return prepare_sft_data(str(path), processor=kw.pop("processor"), image_folder=str(images), media=DEMO_MEDIA,
                            workers=1, **{"max_seq_length": 100, **kw})


@pytest.fixture
def cli(tiny_model_dir, capsys):
    """`vlft <command> ...` in-process; returns (exit code, stderr)."""

    def run(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        return rc, capsys.readouterr().err

    return run


def check_data(cli, tiny_model_dir, path, images, *extra):
    return cli("check-data", "--model_id", tiny_model_dir, "--data_path", path, "--image_folder", images, *extra)


# ---- the example of the issue: --reject_overlong, --skip_bad_samples and the hints between them ----

def test_reject_overlong_with_skip_bad_samples_names_the_record_and_not_the_set_flag(
        tmp_path, processor, images, cli, tiny_model_dir):
    path = write(tmp_path / "train.json", [GOOD, MISSING, LONG])
    with pytest.raises(DataError) as info:
        check(path, images, processor=processor, reject_overlong=True, skip_bad_samples=True)
    assert [(p.index, p.record_id) for p in info.value.problems] == [(2, "long")]  # the skipped one is not listed
    text = str(info.value)
    assert f"{path}: record 2 (id 'long'): " in text and "> --max_seq_length 100" in text
    assert SKIP_SUGGESTED not in text
    assert ("The over-long records stop the run because --reject_overlong is set: raise --max_seq_length (or lower "
            "the pixel budgets or frame counts), or drop --reject_overlong to leave them out (counted and listed). "
            "--skip_bad_samples does not skip them.") in text

    rc, err = check_data(cli, tiny_model_dir, path, images, "--max_seq_length", 100, "--reject_overlong", "true",
                         "--skip_bad_samples", "true")
    assert rc == 2
    assert f"1 record(s) in {path} exceed --max_seq_length 100 (--reject_overlong is set):" in err
    assert "record 2 (id 'long')" in err and SKIP_SUGGESTED not in err


def test_reject_overlong_alone_on_overlong_records_does_not_suggest_skipping(tmp_path, processor, images):
    path = write(tmp_path / "train.json", [GOOD, LONG])
    with pytest.raises(DataError) as info:
        check(path, images, processor=processor, reject_overlong=True)
    text = str(info.value)
    assert "record 1 (id 'long')" in text and "drop --reject_overlong" in text
    assert "--skip_bad_samples" not in text  # it would not skip an over-long record, so it is not offered


def test_reject_overlong_alone_with_both_kinds_gives_each_its_own_way_out(tmp_path, processor, images):
    path = write(tmp_path / "train.json", [GOOD, MISSING, LONG])
    with pytest.raises(DataError) as info:
        check(path, images, processor=processor, reject_overlong=True)
    assert [(p.index, p.record_id) for p in info.value.problems] == [(1, "gone"), (2, "long")]  # one error, both
    text = str(info.value)
    assert text.startswith(f"1 problem(s) and 1 record(s) over --max_seq_length 100 (--reject_overlong is set) in {path}:")
    assert ("Fix the invalid records above, or pass --skip_bad_samples true to go on without them (they are counted "
            "and listed).") in text
    assert "drop --reject_overlong to leave them out" in text
    assert "--skip_bad_samples does not skip them" not in text  # it is not set: nothing to correct


def test_skip_bad_samples_alone_skips_and_counts_the_bad_record(tmp_path, processor, images, cli, tiny_model_dir):
    path = write(tmp_path / "train.json", [GOOD, MISSING, LONG])
    data = check(path, images, processor=processor, skip_bad_samples=True)
    assert [s.id for s in data.samples] == ["good"]
    assert [p.record_id for p in data.skipped] == ["gone"] and [p.record_id for p in data.overlong] == ["long"]
    assert data.summary().startswith("1 of 3 records usable; 1 problem(s) skipped; 1 over --max_seq_length dropped")

    rc, err = check_data(cli, tiny_model_dir, path, images, "--max_seq_length", 100, "--skip_bad_samples", "true")
    assert rc == 0
    assert "1 of 3 records usable; 1 problem(s) skipped; 1 over --max_seq_length dropped" in err


def test_without_skip_bad_samples_the_message_suggests_it(tmp_path, processor, images, cli, tiny_model_dir):
    path = write(tmp_path / "train.json", [GOOD, MISSING, LONG])
    with pytest.raises(DataError) as info:
        check(path, images, processor=processor)
    assert [p.record_id for p in info.value.problems] == ["gone"]  # over-long records are dropped, not errors
    assert str(info.value).endswith("Fix the invalid records above, or pass --skip_bad_samples true to go on without "
                                    "them (they are counted and listed).")
    rc, err = check_data(cli, tiny_model_dir, path, images, "--max_seq_length", 100)
    assert rc == 2 and "pass --skip_bad_samples true" in err and "--reject_overlong" not in err


# ---- the other contradictions ----

def test_an_unreadable_file_is_not_offered_skip_bad_samples(tmp_path, processor, images):
    """Before: every DataError ended 'or pass --skip_bad_samples true', also a JSON syntax error, which it cannot skip."""
    path = tmp_path / "train.json"  # a JSON list with a syntax error (a bad JSONL line is a bad record: skippable)
    path.write_text("[" + json.dumps(GOOD) + ",]")
    with pytest.raises(DataError) as info:
        check(path, images, processor=processor, skip_bad_samples=True)
    text = str(info.value)
    assert SKIP_SUGGESTED not in text
    assert text.endswith("Fix the file: --skip_bad_samples skips invalid records, not a file that cannot be read.")


def test_grpo_summary_names_max_prompt_length(tmp_path, processor):
    """Before: '1 over --max_seq_length dropped' for prompts dropped by --max_prompt_length."""
    from vlft.data.grpo import PROMPT

    path = write(tmp_path / "prompts.json", [{"id": "short", "prompt": "Hi?"}, {"id": "long", "prompt": "word " * 200}])
    data = prepare_data(str(path), PROMPT, processor=processor, image_folder=None, media=DEMO_MEDIA,
                        max_seq_length=64, length_flag="--max_prompt_length")
    assert "1 over --max_prompt_length dropped" in data.summary() and "--max_seq_length" not in data.summary()


def test_trl_max_length_is_named_as_given(tmp_path, processor, images, cli, tiny_model_dir):
    """Before: a limit set with --max_length (TRL's name) was reported as --max_seq_length."""
    from vlft.config import DataArguments, validate

    path = write(tmp_path / "train.json", [GOOD, LONG])
    rc, err = check_data(cli, tiny_model_dir, path, images, "--max_length", 100)
    assert rc == 0 and "1 over --max_length dropped" in err and "--max_seq_length" not in err
    rc, err = check_data(cli, tiny_model_dir, path, images, "--max_length", 100, "--reject_overlong", "true")
    assert rc == 2 and "exceed --max_length 100" in err and "raise --max_length" in err
    assert "--max_seq_length" not in err
    with pytest.raises(VlftError, match="--max_length 4 is too small"):
        validate(DataArguments(data_path="x.json", max_length=4))


def test_missing_media_hints_fit_the_paths_and_image_folder(tmp_path, processor, images):
    """Before: every missing file was told to fix --image_folder, also an absolute path it does not change, and
    a run without --image_folder was asked 'is --image_folder right?'."""
    absolute = {"id": "abs", "image": str(tmp_path / "elsewhere.png"), "conversations": GOOD["conversations"]}
    path = write(tmp_path / "train.json", [absolute, {**MISSING, "id": "rel"}])
    with pytest.raises(DataError) as info:
        prepare_sft_data(str(path), processor=processor, image_folder=None, media=DEMO_MEDIA, max_seq_length=100)
    abs_problem, rel_problem = info.value.problems
    assert "--image_folder" not in abs_problem.hint.replace("--image_folder does not change it", "")
    assert rel_problem.hint == ("fix the path in the record, or pass --image_folder: without it relative image paths "
                                f"resolve against the data file's folder, {tmp_path}")
    assert not str(info.value).startswith("none of")  # one path is absolute: the folder is not the whole story

    path = write(tmp_path / "rel.json", [{**MISSING, "id": "rel"}])
    with pytest.raises(DataError) as info:
        prepare_sft_data(str(path), processor=processor, image_folder=None, media=DEMO_MEDIA, max_seq_length=100)
    assert str(info.value).startswith(f"none of the 1 media files was found under {tmp_path}, the data file's folder, "
                                      "which relative paths resolve against when --image_folder is not given: pass "
                                      "--image_folder")
    with pytest.raises(DataError) as info:
        check(path, images, processor=processor)
    assert str(info.value).startswith(f"none of the 1 media files was found under --image_folder {images}: is it the "
                                      "right folder?")


def grpo_argv(tmp_path, *extra):
    return ["grpo", "--model_id", "m", "--data_path", "d.json", "--output_dir", tmp_path / "out", *extra]


def test_grpo_a_small_max_prompt_length_is_named_not_suggested(tmp_path, cli):
    """Before: '--max_seq_length 8192 leaves no room ...; raise it or set --max_prompt_length' to a run that had set
    --max_prompt_length 4."""
    rc, err = cli(*grpo_argv(tmp_path, "--max_prompt_length", 4))
    assert rc == 2
    assert "--max_prompt_length 4 leaves no room for a prompt (at least 8 tokens); raise it" in err
    assert "set --max_prompt_length" not in err and "--max_seq_length" not in err
    rc, err = cli(*grpo_argv(tmp_path, "--max_seq_length", 100, "--max_completion_length", 96))
    assert rc == 2
    assert ("--max_seq_length 100 leaves no room for prompts next to --max_completion_length 96 (without "
            "--max_prompt_length, prompts get the difference, 4); raise --max_seq_length, lower --max_completion_length, "
            "or set --max_prompt_length") in err


ZERO3_LORA = ("--lora_enable", "true", "--freeze_merger", "true", "--freeze_vision_tower", "true",
              "--unfreeze_topk_llm", "1")


def test_dpo_zero3_hint_freezes_what_trains_not_what_is_frozen(tmp_path, cli, monkeypatch):
    """Before: 'Or freeze them (--freeze_merger true ...)' to a run with --freeze_merger true, where
    --unfreeze_topk_llm was what trained next to LoRA."""
    import vlft.train.core.setup

    monkeypatch.setattr(vlft.train.core.setup, "zero_stage", lambda args: 3)  # read by train/preference/setup.py
    rc, err = cli("dpo", "--model_id", "m", "--data_path", "d.json", "--output_dir", tmp_path / "out", *ZERO3_LORA)
    assert rc == 2
    assert "(--unfreeze_topk_llm 1) needs --precompute_ref_log_probs true" in err
    assert err.rstrip().endswith("Or freeze them (--unfreeze_topk_llm 0)")
    assert "--freeze_merger true" not in err


def test_grpo_zero3_hint_freezes_what_trains(tmp_path, cli, monkeypatch):
    import vlft.train.grpo.run

    monkeypatch.setattr(vlft.train.grpo.run, "zero_stage", lambda args: 3)
    rc, err = cli(*grpo_argv(tmp_path, "--beta", 0.04, *ZERO3_LORA))
    assert rc == 2
    assert "freeze them (--unfreeze_topk_llm 0), or use --beta 0" in err
    assert "--freeze_merger true" not in err and "--precompute_ref_log_probs" not in err


def test_grpo_reference_check_does_not_offer_a_dpo_flag():
    """make_reference's own check named --precompute_ref_log_probs, which `vlft grpo` does not have."""
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    from vlft.train.preference.reference import make_reference

    model = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), LoraConfig(target_modules=["0"], r=2))
    model.base_model.model[1].weight.requires_grad_(True)  # trained fully next to the adapter
    prepared = SimpleNamespace(model=model)
    with pytest.raises(VlftError) as info:
        make_reference(prepared, load_copy=None, precompute=False, zero_stage=3, can_precompute=False)
    assert "--precompute_ref_log_probs" not in str(info.value) and "use --beta 0" in str(info.value)
    with pytest.raises(VlftError, match="needs --precompute_ref_log_probs true"):
        make_reference(prepared, load_copy=None, precompute=False, zero_stage=3)


@pytest.mark.parametrize("part, flags, expected", [
    ("llm", dict(unfreeze_topk_llm=1, freeze_llm=False),
     "--freeze_llm false trains all of it (set --freeze_llm true, or drop --unfreeze_topk_llm)"),
    ("vision", dict(unfreeze_topk_vision=1, freeze_vision_tower=False),
     "--freeze_vision_tower false trains all of it (set --freeze_vision_tower true, or drop --unfreeze_topk_vision)"),
])
def test_unfreeze_topk_next_to_an_explicit_unfreeze(part, flags, expected):
    """Before: 'add --freeze_llm true or --lora_enable' to a run with --freeze_llm false, where --lora_enable is
    itself refused ('--lora_enable ... but --freeze_llm false'); likewise for the vision tower."""
    from vlft.config import TuneArguments, _tune_errors

    errors = " | ".join(_tune_errors(TuneArguments(**flags)))
    assert expected in errors
    assert "--lora_enable" not in errors and "--vision_lora" not in errors
    # without the explicit flag the old advice stands
    plain = " | ".join(_tune_errors(TuneArguments(**{k: v for k, v in flags.items() if k.startswith("unfreeze")})))
    assert ("add --freeze_llm true or --lora_enable" if part == "llm" else
            "add --freeze_vision_tower true or --vision_lora") in plain


def test_grpo_num_iterations_message_shows_the_value(tmp_path):
    """Before: '--num_iterations > 1 is not available' for --num_iterations 0."""
    from vlft.train.grpo.config import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), num_iterations=0, use_cpu=True)
    assert any(p.startswith("--num_iterations 0: ") and "use 1" in p for p in args.problems())


def test_model_load_errors_name_no_flag_of_another_command(tmp_path, cli, monkeypatch):
    """Before: 'could not load the processor from --model_id ...' also from `vlft predict` (its flag is --model)
    and `vlft merge`; and an unsupported family was told to 'Pass ... to --model_id'."""
    from vlft.models.registry import get_family

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.json").write_text(json.dumps([GOOD]))
    rc, err = cli("predict", "--model", "nobody/no-such-model", "--data_path", "d.json", "--output", "p.jsonl")
    # predict reads the model's config first (models/loading.py describe_trained), then its processor
    assert rc == 2 and "could not load the config from 'nobody/no-such-model'" in err and "--model_id" not in err
    with pytest.raises(VlftError) as info:
        get_family("llava")
    assert "--model_id" not in str(info.value)


def test_lora_without_targets_names_the_flag_that_removed_them(tiny_model_dir):
    """Before: '--lora_enable found no linear layers ... after --lora_namespan_exclude []' when --unfreeze_topk_llm
    (all layers train fully) left none, and no exclusion was given."""
    from vlft.models.loading import load_model
    from vlft.models.lora import lora_targets

    model, family = load_model(str(tiny_model_dir))
    with pytest.raises(VlftError) as info:
        lora_targets(model, family, llm=True, vision=False, skip_layers={"llm": set(range(1000))})
    assert "--lora_namespan_exclude" not in str(info.value) and "--unfreeze_topk_llm" in str(info.value)
    with pytest.raises(VlftError, match="after --lora_namespan_exclude model; exclude less"):
        lora_targets(model, family, llm=True, vision=False, exclude=["model"])


def test_tiny_model_exist_ok_is_not_suggested_when_set(tmp_path):
    """Before: '... (or pass --exist_ok to reuse it)' to a call with --exist_ok on a directory holding no model."""
    from vlft.models.tiny import save_tiny_model

    (tmp_path / "half").mkdir()
    with pytest.raises(VlftError) as info:
        save_tiny_model(tmp_path / "half", exist_ok=True)
    assert "--exist_ok" not in str(info.value) and "holds no model (no config.json) to reuse" in str(info.value)
    with pytest.raises(VlftError, match="pass --exist_ok"):
        save_tiny_model(tmp_path / "half")


# ---- every flag a message names exists ----

FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*\*?)(?![\w-])")


def message_flags() -> dict[str, list[str]]:
    """flag name -> where it is named, over every string literal of vlft/ (messages, hints, help texts, docs)."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "vlft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in FLAG.findall(node.value):
                    found.setdefault(name, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


class _Parsed(Exception):
    pass


def command_flags(monkeypatch) -> dict[str, set[str]]:
    """command -> the flags its parser accepts, read from the parser each `vlft <command>` builds (stopped before
    it parses anything)."""
    seen: list[set[str]] = []

    def record(parser, *args, **kwargs):
        seen.append({o[2:] for o in parser._option_string_actions if o.startswith("--")})
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", record)
    flags = {}
    for command, (module, _) in COMMANDS.items():
        seen.clear()
        with pytest.raises(_Parsed):
            importlib.import_module(module).main([])
        flags[command] = set().union(*seen)
    return flags


def test_every_flag_named_in_a_message_exists(monkeypatch):
    flags = command_flags(monkeypatch)
    assert {"skip_bad_samples", "max_prompt_length", "precompute_ref_log_probs", "adapter", "exist_ok"} <= set().union(
        *flags.values())  # the parsers were read
    accepted = set().union(*flags.values()) | {"config"}  # --config FILE is read by config.parse_command itself
    found = message_flags()
    assert len(found) > 50
    dead = {name: where for name, where in found.items()
            if not (fnmatch.filter(accepted, name) if name.endswith("*") else name in accepted)}
    assert not dead, f"messages name flags no vlft command accepts: {dead}"
