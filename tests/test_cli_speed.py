"""The command line is read before the heavy imports: a mistyped flag is named at once with the nearest one, a hub
model id that cannot be downloaded is refused at once with what to do, and --help states each default once."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import threading
import time

import pytest

from vlft import utils
from vlft.cli import COMMANDS, FLAG_GROUPS, check_flag_names, known_flags, main, model_flags
from vlft.errors import VlftError

DATACLASS_COMMANDS = list(FLAG_GROUPS)


def run_main_in_subprocess(argv: list[str], env: dict | None = None) -> tuple[dict, str, float]:
    """vlft.cli.main(argv) in a fresh interpreter: (its exit code and whether torch / transformers got imported,
    stderr, seconds)."""
    import os

    code = ("import json, sys\nfrom vlft.cli import main\nrc = main(json.loads(sys.argv[1]))\n"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, "
            "'transformers': 'transformers' in sys.modules}))")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr, elapsed


# --- flags ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, typo, meant", [
    ("sft", "--lerning_rate", "--learning_rate"),
    ("dpo", "--bta", "--beta"),
    ("grpo", "--num_generatoins", "--num_generations"),
    ("check-data", "--data_pth", "--data_path"),
    ("predict", "--max_new_tokns", "--max_new_tokens"),
])
def test_a_mistyped_flag_is_named_with_the_nearest_before_torch_is_imported(command, typo, meant):
    result, err, _ = run_main_in_subprocess([command, typo, "1"])
    assert result == {"rc": 2, "torch": False, "transformers": False}
    assert f"vlft {command}: error: unknown flag {typo} (did you mean {meant}?)" in err
    assert "Traceback" not in err


def test_several_unknown_flags_are_named_together_and_far_ones_get_no_guess():
    with pytest.raises(VlftError) as info:
        check_flag_names("sft", ["--lerning_rate", "1", "--zzzz", "--model_id", "m", "-x"])
    message = str(info.value)
    assert message.startswith("unknown flags --lerning_rate (did you mean --learning_rate?), --zzzz, -x;")


@pytest.mark.parametrize("argv", [
    ["--learning-rate", "1"],  # HfArgumentParser's dashed spelling
    ["--learning_rate=1"],
    ["--no_double_quant"],  # HfArgumentParser's negation of a true bool
    ["--config", "--whatever.yaml"],  # the value of --config is a path, whatever it looks like
    ["--lora_namespan_exclude", "a", "-1", "--", "--not-a-flag"],
])
def test_valid_spellings_pass_the_early_check(argv):
    check_flag_names("sft", argv)


@pytest.mark.parametrize("command", DATACLASS_COMMANDS)
def test_the_early_flag_list_is_the_parsers(command):
    """known_flags reads the dataclass sources without importing them; it must list exactly what the full parser
    accepts (else a valid flag would be refused, or the table named the wrong groups)."""
    from transformers import HfArgumentParser

    groups = [getattr(importlib.import_module(source.split(":")[0]), source.split(":")[1])
              for source in FLAG_GROUPS[command]]
    parser = HfArgumentParser(groups)
    accepted = {o.lstrip("-").replace("-", "_") for a in parser._actions for o in a.option_strings if o.startswith("--")}
    early = known_flags(command)
    assert accepted - early == set()  # nothing valid is refused early
    assert early - accepted <= {"config"} | {name for name in early if name.startswith("_")}


def test_the_table_names_the_groups_each_command_parses(monkeypatch):
    """FLAG_GROUPS are the groups each command's main passes to the parser, and name every command that parses with
    vlft.config (the others use argparse)."""
    import importlib

    import vlft.config as config
    from vlft.stages import STAGES, TRAINING_STAGES

    for name in TRAINING_STAGES:  # each stage's run parses its config module's GROUPS
        groups = importlib.import_module(STAGES[name].config.split(":")[0]).GROUPS
        assert [f"{g.__module__}:{g.__name__}" for g in groups] == list(FLAG_GROUPS[name])

    class Seen(Exception):
        pass

    def capture(groups, argv, prog="vlft"):
        raise Seen([f"{g.__module__}:{g.__name__}" for g in groups])

    monkeypatch.setattr(config, "parse_command", capture)
    monkeypatch.setattr(config, "parse_args", capture)
    for name, (module, _) in COMMANDS.items():
        if name in TRAINING_STAGES:
            continue
        try:
            importlib.import_module(module).main(["--help"] if name not in FLAG_GROUPS else [])
        except Seen as seen:
            assert seen.args[0] == list(FLAG_GROUPS[name]), name
        except SystemExit:  # an argparse command printed its help
            assert name not in FLAG_GROUPS, name
        else:
            pytest.fail(f"{name} returned without parsing")


def test_an_unknown_flag_from_a_full_parse_gets_the_suggestion_too(tmp_path):
    from vlft.config import parse_args
    from vlft.train.sft.config import GROUPS as SFT_GROUPS

    with pytest.raises(VlftError, match=r"unknown flag --lerning_rate \(did you mean --learning_rate\?\)"):
        parse_args(SFT_GROUPS, ["--output_dir", str(tmp_path), "--lerning_rate", "1"])
    config = tmp_path / "run.yaml"
    config.write_text("lerning_rate: 1\n")
    with pytest.raises(VlftError, match=r"unknown key\(s\) lerning_rate \(did you mean learning_rate\?\)"):
        parse_args(SFT_GROUPS, ["--config", str(config)])


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert main(["chek-data"]) == 2
    assert "vlft: unknown command 'chek-data' (did you mean check-data?)" in capsys.readouterr().err


# --- --help -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sft", "grpo", "predict"])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
    by_flag = {block.split()[0]: " ".join(block.split()) for block in blocks}
    # a help text that names its default ("default: the data file's folder") gets no "(default: None)" after it
    assert by_flag["--image_folder"].endswith("(default: the data file's folder).")
    assert all(block.count("(default:") <= 1 for block in by_flag.values()), [
        flag for flag, block in by_flag.items() if block.count("(default:") > 1]
    # and a plain one still gets argparse's
    assert by_flag["--max_seq_length"].endswith("(default: 8192)")


# --- the hub ----------------------------------------------------------------------------------------------------


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Hub look-ups allowed (the test suite runs with HF_HUB_OFFLINE=1), an empty cache, and a fresh probe."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(utils, "_hub_reachable", None)
    return tmp_path / "hub"


def test_a_hub_that_never_answers_is_given_up_within_the_timeout(online, monkeypatch):
    """A connection (or name lookup) that hangs, as behind a firewall that drops packets."""
    hang = threading.Event()

    def never(*args, **kwargs):
        hang.wait(60)
        raise OSError("timed out")

    monkeypatch.setattr("socket.create_connection", never)
    monkeypatch.setattr(utils, "HUB_PROBE_TIMEOUT_S", 0.5)
    start = time.monotonic()
    try:
        assert utils.hub_reachable(timeout=0.5) is False
    finally:
        hang.set()
    assert time.monotonic() - start < 3


def test_the_probe_connects_to_the_endpoint(online, monkeypatch):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.delenv("http_proxy", raising=False)
        monkeypatch.delenv("HTTP_PROXY", raising=False)
        assert utils.hub_reachable() is True
    finally:
        server.close()
    monkeypatch.setattr(utils, "_hub_reachable", None)
    assert utils.hub_reachable() is False  # the port is closed now: refused at once


def test_a_hub_id_without_a_hub_fails_fast_with_what_to_do(monkeypatch, tmp_path):
    """The whole command, as a user runs it (a hub whose name does not resolve): nothing imported, one error line,
    within the probe's time."""
    env = {"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", "HF_ENDPOINT": "https://hub.invalid",
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    argv = ["sft", "--model_id", "Qwen/Qwen2-VL-2B-Instruct", "--data_path", "d.json", "--output_dir", "o"]
    result, err, elapsed = run_main_in_subprocess(argv, env)
    assert result == {"rc": 2, "torch": False, "transformers": False}
    assert elapsed < 30  # the probe gives up after 3 s; the rest is the interpreter's start on a busy machine
    assert "vlft sft: error: --model_id Qwen/Qwen2-VL-2B-Instruct: not a local directory and not in the Hugging Face " \
           "cache, and the hub (https://hub.invalid) does not answer within 3 s" in err
    assert "local checkpoint directory instead (--model_id /path/to/model" in err and "HF_HUB_OFFLINE=1" in err


@pytest.mark.parametrize("command, flag", [(command, flag) for command in COMMANDS for flag in model_flags(command)])
def test_every_model_flag_is_checked_before_the_import(online, monkeypatch, command, flag, capsys):
    monkeypatch.setattr(utils, "hub_reachable", lambda: False)
    # the check comes first: the command's module would not even import
    import vlft.cli as cli

    table = {**cli.commands(), command: ("vlft.no_such_module", "")}
    monkeypatch.setattr(cli, "commands", lambda: table)
    assert main([command, f"{flag}=org/model"]) == 2
    assert f"vlft {command}: error: {flag} org/model: not a local directory" in capsys.readouterr().err


def test_no_probe_for_a_directory_offline_mode_or_a_reachable_hub(online, monkeypatch, tmp_path):
    probes = []
    monkeypatch.setattr(utils, "hub_reachable", lambda: probes.append(1) or True)
    utils.check_model_source(str(tmp_path))  # a directory
    utils.check_model_source("./not/here/model")  # a path: the loader names the missing directory
    assert probes == []
    utils.check_model_source("org/model")  # reachable: nothing to say
    assert probes == [1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(utils, "hub_reachable", lambda: pytest.fail("probed under HF_HUB_OFFLINE"))
    utils.check_model_source("org/model")


def test_a_cached_model_without_a_hub_goes_offline_instead_of_retrying(online, monkeypatch, capsys):
    import os

    import huggingface_hub.constants

    snapshot = online / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (online / "models--org--cached" / "refs").mkdir()
    (online / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(utils, "hub_reachable", lambda: False)
    with pytest.raises(VlftError, match="org/other: not a local directory and not in the Hugging Face cache"):
        utils.check_model_source("org/other")
    assert "HF_HUB_OFFLINE" not in os.environ

    utils.check_model_source("org/cached")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert "cannot be reached; using the cached copy of org/cached" in capsys.readouterr().err


def test_the_loaders_check_a_hub_id_from_a_run_or_a_config_file(online, monkeypatch):
    """A model id that never was a flag (a run's base model, a --config key) is checked when it is loaded."""
    from vlft.models.loading import load_family, load_processor

    monkeypatch.setattr(utils, "hub_reachable", lambda: False)
    for load in (load_family, load_processor):
        with pytest.raises(VlftError, match="model org/model: not a local directory .* HF_HUB_OFFLINE=1"):
            load("org/model")


# --- third-party noise ------------------------------------------------------------------------------------------


def test_the_libraries_start_up_noise_is_silenced_and_deepspeeds_kept_for_deepspeed_runs():
    """Each line as its library emits it (logger name, message), after quiet_third_party as vlft's CLI calls it."""
    code = ("import sys\nfrom vlft.utils import quiet_third_party\nquiet_third_party(sys.argv[1:])\n"
            "import logging\nlogging.getLogger('bitsandbytes.backends.cpu.ops').warning("
            "'Failed to load CPU gemm_4bit_forward from kernels-community: x')\n"
            "from deepspeed.utils import logger\nlogger.warning('Setting accelerator to CPU. If you have GPU')\n"
            "logger.warning('another DeepSpeed warning')\n"
            "import warnings\nwarnings.warn('`gradient_checkpointing_enable` is deprecated and will be removed in v6. "
            "Use `activation_checkpointing_enable` instead.', FutureWarning)\n"
            "warnings.warn('`other_thing` is deprecated', FutureWarning)\n")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    out = quiet.stdout + quiet.stderr
    assert "gemm_4bit_forward" not in out and "Setting accelerator" not in out and "gradient_checkpointing" not in out
    assert "another DeepSpeed warning" in out and "`other_thing` is deprecated" in out  # only those are dropped
    loud = subprocess.run([sys.executable, "-c", code, "--deepspeed", "zero2.json"], capture_output=True, text=True,
                          timeout=300)
    assert "Setting accelerator to CPU" in loud.stdout + loud.stderr


# --- the argparse commands (merge, plot, plan, tiny-model) -------------------------------------------------------

ARGPARSE_COMMANDS = [name for name in COMMANDS if name not in FLAG_GROUPS and name not in ("sft", "dpo", "grpo")]


def run_cli_in_subprocess(argv: list[str]) -> tuple[int, dict, str, str]:
    """`vlft ARGV` in a fresh interpreter, SystemExit included: (exit status, which of torch / transformers / any
    transformers model module got imported, stdout, stderr)."""
    code = ("import json, sys\nfrom vlft.cli import main\n"
            "try:\n    rc = main(json.loads(sys.argv[1]))\nexcept SystemExit as exit:\n    rc = exit.code\n"
            "sys.stdout.flush()\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules, "
            "'model_code': sorted(m for m in sys.modules if m.startswith('transformers.models.'))}), file=sys.stderr)\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=120)
    *err, imported = proc.stderr.strip().splitlines() or [""]
    return proc.returncode, json.loads(imported), proc.stdout, "\n".join(err)


def test_the_table_lists_every_argparse_command():
    assert sorted(ARGPARSE_COMMANDS) == ["merge", "plan", "plot", "tiny-model"]


@pytest.mark.parametrize("command", ARGPARSE_COMMANDS)
def test_help_of_an_argparse_command_imports_neither_torch_nor_transformers(command):
    """Before: `vlft plan --help` and `vlft tiny-model --help` imported torch (the family table asked transformers
    for each family's class, which imports the model code), 9-22 s on a busy machine."""
    rc, imported, out, err = run_cli_in_subprocess([command, "--help"])
    assert rc == 0, err
    assert out.startswith(f"usage: vlft {command} ")
    assert imported == {"torch": False, "transformers": False, "model_code": []}


def test_the_family_table_imports_no_model_code_and_checks_classes_when_a_family_is_used():
    code = ("import json, sys\nfrom vlft.models.families import FAMILIES, family_available\n"
            "before = 'transformers' in sys.modules\n"
            "available = {name: family_available(f) for name, f in FAMILIES.items()}\n"
            "print(json.dumps([before, available, 'torch' in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith('transformers.models.'))]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, available, torch_imported, model_code = json.loads(proc.stdout)
    assert before is False and torch_imported is False and model_code == []
    assert sorted(available) == ["qwen2_5_vl", "qwen2_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe"]
    import transformers

    from vlft.models.families import FAMILIES, family_available

    # the oracle: what importing the class says (this transformers has every family)
    assert available == {name: hasattr(transformers, f.model_class) for name, f in FAMILIES.items()}
    assert all(family_available(f) for f in FAMILIES.values())


def test_a_family_this_transformers_lacks_is_refused_when_used_with_what_to_do(monkeypatch, tmp_path):
    import dataclasses

    import transformers

    from vlft.models import families
    from vlft.models.tiny import main as tiny_main

    missing = dataclasses.replace(families.FAMILIES["qwen3_5"], model_class="Qwen9VLForConditionalGeneration")
    monkeypatch.setitem(families.FAMILIES, "qwen3_5", missing)
    assert not families.family_available(missing) and not hasattr(transformers, missing.model_class)
    with pytest.raises(VlftError) as info:
        families.get_family("qwen3_5")
    message = str(info.value)
    assert message.startswith("Qwen3.5 (qwen3_5) needs transformers' Qwen9VLForConditionalGeneration, which the "
                              f"installed transformers {transformers.__version__} does not have")
    assert "pip install -U transformers" in message
    assert families.get_family("qwen2_vl") is families.FAMILIES["qwen2_vl"]  # the others still load
    with pytest.raises(VlftError, match="Qwen9VLForConditionalGeneration"):  # what `vlft tiny-model` runs
        tiny_main([str(tmp_path / "m"), "--family", "qwen3_5"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, argv, typo, meant", [
    ("merge", ["--adapter", "run", "--outptu", "merged"], "--outptu", "--output"),  # --output is required: the
    ("plot", ["run", "--outpt", "curves.png"], "--outpt", "--output"),           # typo is named, not "missing"
    ("plan", ["--famly", "qwen2_vl", "--size", "2B"], "--famly", "--family"),
    ("tiny-model", ["out", "--sed=3"], "--sed", "--seed"),
])
def test_a_mistyped_flag_of_an_argparse_command_is_named_with_the_nearest(command, argv, typo, meant, tmp_path):
    rc, imported, _, err = run_cli_in_subprocess([command] + argv)
    assert rc == 2
    assert err == (f"vlft {command}: error: unknown flag {typo} (did you mean {meant}?); run with --help for the list "
                   "of flags"), err  # the dataclass commands' line, and nothing else (no usage, no traceback)
    if command != "plan":  # plan knows vlft sft's flags too: it reads them from vlft.config (transformers)
        assert imported["torch"] is False


def test_flag_parser_errors_are_one_line_with_status_2(capsys):
    from vlft.utils import FlagParser

    parser = FlagParser(prog="vlft demo")
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=["qwen2_vl", "qwen3_vl"])
    parser.add_argument("--seed", type=int, default=0)
    assert vars(parser.parse_args(["d", "--family", "qwen3_vl", "--seed=4"])) == {
        "out_dir": "d", "family": "qwen3_vl", "seed": 4}
    with pytest.raises(SystemExit) as exit_:  # no abbreviations: a prefix is an unknown flag
        parser.parse_args(["d", "--fam", "qwen3_vl"])
    assert exit_.value.code == 2 and "unknown flag --fam (did you mean --family?)" in capsys.readouterr().err
    cases = {
        ("d", "--family", "llava"): "argument --family: invalid choice: 'llava' (choose from 'qwen2_vl', 'qwen3_vl') "
                                    "(run with --help for the list of flags)",
        ("d", "e"): "unexpected value(s) e (run with --help for the list of flags)",
        ("d", "--zzzz", "--sed", "1"): "unknown flags --zzzz, --sed (did you mean --seed?); run with --help for "
                                        "the list of flags",
        ("d", "-x"): "unknown flag -x; run with --help for the list of flags",
    }
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as info:
            parser.parse_args(list(argv))
        assert info.value.code == 2
        assert capsys.readouterr().err == f"vlft demo: error: {message}\n", argv


def test_abbreviations_and_peer_spellings_are_refused_with_the_vlft_name():
    """argparse's prefix matching read LLaMA-Factory's `--lora_target all` as --lora_target_experts and `--lora_r 4`
    as --lora_rank; flags count by their full names, and a peer tool's spelling gets vlft's."""
    from vlft.config import parse_args
    from vlft.train.sft.config import GROUPS as SFT_GROUPS

    with pytest.raises(VlftError) as info:
        check_flag_names("sft", ["--lora_r", "4", "--lora_target", "all", "--cutoff_len", "2048"])
    message = str(info.value)
    assert "--lora_r (did you mean --lora_rank?)" in message
    assert "--lora_target (vlft targets every linear layer" in message
    assert "--cutoff_len (LLaMA-Factory's name; here --max_seq_length)" in message
    with pytest.raises(VlftError, match="--lora_r"):  # the full parser too, past the early check
        parse_args(SFT_GROUPS, ["--output_dir", "o", "--lora_r", "4"])
