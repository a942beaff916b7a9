"""What we ship in scripts/: every flag exists, every script's full argument list parses and passes the
cross-field checks, and every script trains the demo end to end (the DPO and GRPO ones also through
merge_lora.sh)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlft.cli import main
from vlft.config import parse_args, validate
from vlft.run_dir import ARGS_FILE
from vlft.train.dpo.config import GROUPS as DPO_GROUPS
from vlft.train.grpo.config import GROUPS as GRPO_GROUPS
from vlft.train.sft.config import GROUPS as SFT_GROUPS

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SFT_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.sh") if "vlft_launch sft" in p.read_text())
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)")
SFT_FIELDS = {f.name for g in SFT_GROUPS for f in dataclasses.fields(g) if f.init}
DPO_FIELDS = {f.name for g in DPO_GROUPS for f in dataclasses.fields(g) if f.init}
GRPO_FIELDS = {f.name for g in GRPO_GROUPS for f in dataclasses.fields(g) if f.init}
TINY = "tiny-qwen2_vl"

WORKERS = min(4, len(os.sched_getaffinity(0)))  # the scripts' loader workers: 4, or the cores there are (nproc)


def test_the_sft_scripts_are_found():
    assert SFT_SCRIPTS == ["finetune.sh", "finetune_lora.sh", "finetune_lora_vision.sh", "finetune_video.sh"]


@pytest.mark.parametrize("script", SFT_SCRIPTS)
def test_every_flag_in_a_script_is_an_sft_argument(script):
    text = (SCRIPTS / script).read_text()
    if "training_flags" in text:  # the flags every finetune script shares live in _common.sh
        common = (SCRIPTS / "_common.sh").read_text()
        text += common[common.index("training_flags() {"):]
    flags = set(FLAG.findall(text))
    assert len(flags) > 20  # the regex does see the launch line
    assert sorted(flags - SFT_FIELDS) == []


def test_common_flags_belong_to_what_they_call(capsys):
    """_common.sh calls tiny-model, the DeepSpeed launcher and torchrun, and adds flags to sft: each flag
    exists where it goes."""
    from torch.distributed.run import get_args_parser

    from vlft.models import tiny

    with pytest.raises(SystemExit) as info:
        tiny.main(["--help"])
    assert info.value.code == 0
    tiny_flags = set(FLAG.findall(capsys.readouterr().out))
    torchrun_flags = {o.lstrip("-").replace("-", "_") for a in get_args_parser()._actions for o in a.option_strings}
    text = (SCRIPTS / "_common.sh").read_text().replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]

    def flags_where(needle: str, cut: str | None = None) -> set[str]:
        found = set()
        for ln in lines:
            if needle in ln:
                found |= set(FLAG.findall(ln.split(cut)[0] if cut else ln))
        assert found, needle
        return found

    assert flags_where("vlft tiny-model") <= tiny_flags
    launcher = flags_where("deepspeed.launcher.runner", cut="--module vlft") | flags_where("nodes+=(") | \
        flags_where("local nodes=(")
    assert launcher <= _deepspeed_flags(), sorted(launcher - _deepspeed_flags())
    assert flags_where("torch.distributed.run", cut="-m vlft") <= torchrun_flags
    assert flags_where("extra+=(") <= SFT_FIELDS  # what vlft_launch adds to sft's own flags


def _deepspeed_flags() -> set[str]:
    import argparse
    from unittest import mock

    from deepspeed.launcher import runner

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        captured["flags"] = {o.lstrip("-") for a in self._actions for o in a.option_strings}
        return real(self, ["x"], namespace)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        runner.parse_args([])
    return captured["flags"]


def script_env(tmp: Path, **settings: str) -> dict:
    """The environment with every variable the scripts read removed, then `settings` added."""
    names = {name for p in SCRIPTS.glob("*.sh") for name in re.findall(r"\$\{(\w+):-", p.read_text())}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLFT_CACHE": str(tmp / "cache"),
                "OUTPUT_DIR": str(tmp / "out"), **settings})
    return env


def launched_argv(tmp: Path, script: str, *extra: str, **settings: str) -> dict[str, list[str]]:
    """Run a script with PYTHON pointed at a shim that records its arguments instead of running vlft;
    returns {vlft command: its arguments}."""
    shim = tmp / "python-shim"
    # `python -c CODE` (the scripts' checks of what is installed: tensorboard) runs in the real Python
    shim.write_text('#!/bin/sh\nif [ "$1" = -c ]; then exec "$REAL_PYTHON" "$@"; fi\n'
                    'cmd="$3"; shift 3\nprintf \'%s\\0\' "$@" > "$ARGV_DIR/$cmd.argv"\n')
    shim.chmod(0o755)
    env = script_env(tmp, PYTHON=str(shim), ARGV_DIR=str(tmp), REAL_PYTHON=sys.executable, **settings)
    proc = subprocess.run(["bash", str(SCRIPTS / script), *extra], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {p.stem: p.read_text().split("\0")[:-1] for p in tmp.glob("*.argv")}


# script -> (demo values, values with a real MODEL) for a few flags
EXPECTED = {
    "finetune.sh": (
        dict(num_train_epochs=20, learning_rate=1e-3, per_device_train_batch_size=2, gradient_accumulation_steps=1,
             dataloader_num_workers=0, lora_enable=False, freeze_vision_tower=False),
        dict(num_train_epochs=1, learning_rate=1e-5, per_device_train_batch_size=4, gradient_accumulation_steps=16,
             dataloader_num_workers=WORKERS, lora_enable=False, freeze_vision_tower=False, vision_lr=2e-6),
    ),
    "finetune_lora.sh": (
        dict(num_train_epochs=30, learning_rate=5e-3, per_device_train_batch_size=2, gradient_accumulation_steps=1,
             dataloader_num_workers=0, lora_enable=True, lora_rank=16, lora_alpha=32, freeze_vision_tower=True),
        dict(num_train_epochs=1, learning_rate=1e-4, per_device_train_batch_size=4, gradient_accumulation_steps=16,
             dataloader_num_workers=WORKERS, lora_enable=True, lora_rank=64, lora_alpha=64, freeze_vision_tower=True),
    ),
    "finetune_video.sh": (
        dict(num_train_epochs=20, learning_rate=1e-3, lora_enable=False, vision_lr=None, video_min_pixels=1024,
             video_max_pixels=4096, fps=None, nframes=None),
        dict(num_train_epochs=1, learning_rate=1e-5, lora_enable=False, vision_lr=2e-6, video_min_pixels=100352,
             video_max_pixels=602112, video_max_total_pixels=6422528, max_seq_length=16384),
    ),
    "finetune_lora_vision.sh": (
        dict(num_train_epochs=30, learning_rate=5e-3, lora_enable=True, vision_lora=True, lora_rank=16,
             freeze_vision_tower=None, freeze_merger=False, vision_lr=None, bits=16),
        dict(num_train_epochs=1, learning_rate=2e-4, lora_enable=True, vision_lora=True, lora_rank=64,
             freeze_vision_tower=None, freeze_merger=False, vision_lr=None, bits=16),
    ),
}


def flat(groups) -> dict:
    return {f.name: getattr(g, f.name) for g in groups for f in dataclasses.fields(g) if f.init}


@pytest.mark.parametrize("script", SFT_SCRIPTS)
@pytest.mark.parametrize("demo", [True, False], ids=["demo", "real-model"])
def test_script_arguments_parse(tmp_path, script, demo):
    settings = {} if demo else {"MODEL": "Qwen/Qwen2-VL-2B-Instruct"}
    calls = launched_argv(tmp_path, script, **settings)
    groups = parse_args(SFT_GROUPS, calls["sft"])
    validate(*groups)
    values = flat(groups)

    model_id = str(tmp_path / "cache" / TINY) if demo else "Qwen/Qwen2-VL-2B-Instruct"
    assert values["model_id"] == model_id
    video = script == "finetune_video.sh"
    assert values["data_path"] == [str(REPO / "data_examples" / ("llava_video_demo.json" if video else "llava_demo.json"))]
    assert values["image_folder"] == str(REPO / "data_examples" / ("" if video else "images")).rstrip("/")
    assert values["output_dir"] == str(tmp_path / "out")
    assert values["lr_scheduler_type"] == "cosine" and values["warmup_ratio"] == 0.03
    expected = EXPECTED[script][0 if demo else 1]
    assert {k: values[k] for k in expected} == expected
    # image budgets are left to the model family's default (its own units), resolved once the model is known
    assert (values["image_min_pixels"], values["image_max_pixels"]) == (None, None)
    assert sorted(calls) == (["sft", "tiny-model"] if demo else ["sft"])


def test_demo_builds_the_tiny_model_with_flags_tiny_model_accepts(tmp_path, tiny_model_dir, capsys):
    calls = launched_argv(tmp_path, "finetune_lora.sh")
    out_dir, *flags = calls["tiny-model"]
    assert out_dir == str(tmp_path / "cache" / TINY)
    assert flags == ["--family", "qwen2_vl", "--exist_ok"]
    # the same flags on a directory that already holds the model: accepted, nothing rebuilt
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert main(["tiny-model", str(tiny_model_dir), *flags]) == 0
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_settings_and_extra_flags_reach_vlft(tmp_path):
    calls = launched_argv(tmp_path, "finetune_lora.sh", "--save_steps", "7", "--seed", "3",
                          LORA_RANK="8", MAX_SEQ_LENGTH="1024", IMAGE_FOLDER=str(tmp_path), IMAGE_MAX_PIXELS="1003520")
    values = flat(parse_args(SFT_GROUPS, calls["sft"]))
    assert (values["lora_rank"], values["max_seq_length"], values["image_folder"]) == (8, 1024, str(tmp_path))
    assert (values["image_min_pixels"], values["image_max_pixels"]) == (None, 1003520)
    assert (values["save_steps"], values["seed"]) == (7, 3)  # the extra flags come last, so they win


def _stage_of(script: str) -> str:
    """The stage a finetune script launches (`vlft_launch <stage>`)."""
    return re.search(r"vlft_launch (\w+)", (SCRIPTS / script).read_text()).group(1)


FINETUNE_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("finetune*.sh"))


@pytest.mark.parametrize("script", FINETUNE_SCRIPTS)
@pytest.mark.parametrize("demo", [True, False], ids=["demo", "real-model"])
def test_every_finetune_script_launches_a_stage_with_flags_it_parses(tmp_path, script, demo):
    """Each scripts/finetune*.sh launches a stage of vlft/stages.py whose parser takes every flag it passes (on
    the demo and with a real MODEL), and the arguments pass validate()."""
    import importlib

    from vlft.stages import STAGES

    stage = STAGES[_stage_of(script)]
    groups = importlib.import_module(stage.config.split(":")[0]).GROUPS
    calls = launched_argv(tmp_path, script, **({} if demo else {"MODEL": "Qwen/Qwen2-VL-2B-Instruct"}))
    parsed = parse_args(groups, calls[stage.name])
    validate(*parsed)
    assert flat(parsed)["output_dir"] == str(tmp_path / "out")


@pytest.mark.parametrize("script", FINETUNE_SCRIPTS)
def test_resume_setting_reaches_vlft(tmp_path, script):
    command = _stage_of(script)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    resumed = launched_argv(tmp_path / "a", script, RESUME="latest")[command]
    assert resumed[resumed.index("--resume_from_checkpoint") + 1] == "latest"
    assert "--resume_from_checkpoint" not in launched_argv(tmp_path / "b", script)[command]  # unset: no flag


def test_resume_latest_without_output_dir_continues_the_newest_run(tmp_path):
    """A requeued job with RESUME=latest and no OUTPUT_DIR continues the newest run folder of its script (the
    scripts make a new timestamped one per call, so `latest` alone would otherwise start over in an empty one)."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "scripts")
    runs = repo / "output" / "finetune_lora"
    for name in ("20261101-120000", "20261130-080000", "20261102-000000"):
        (runs / name).mkdir(parents=True)
    (runs / "latest").symlink_to(runs / "20261101-120000")  # the newest *finished* run: not the one to continue

    def output_dir(work, **settings):
        work.mkdir()
        shim = work / "python-shim"
        shim.write_text('#!/bin/sh\nif [ "$1" = -c ]; then exec "$REAL_PYTHON" "$@"; fi\n'
                        'cmd="$3"; shift 3\nprintf \'%s\\0\' "$@" > "$ARGV_DIR/$cmd.argv"\n')
        shim.chmod(0o755)
        env = script_env(work, PYTHON=str(shim), ARGV_DIR=str(work), REAL_PYTHON=sys.executable, OUTPUT_DIR="",
                         **settings)
        proc = subprocess.run(["bash", str(repo / "scripts" / "finetune_lora.sh")], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        argv = (work / "sft.argv").read_text().split("\0")[:-1]
        return argv[argv.index("--output_dir") + 1], proc.stderr

    resumed, err = output_dir(tmp_path / "a", RESUME="latest")
    assert resumed == str(runs / "20261130-080000") and "continuing the newest run" in err
    fresh, _ = output_dir(tmp_path / "b")  # no RESUME: a new folder, as always
    assert Path(fresh).parent == runs and Path(fresh).name not in {"20261101-120000", "20261130-080000",
                                                                   "20261102-000000"}


@pytest.mark.parametrize("script", ["finetune_lora.sh", "finetune_dpo.sh"])
def test_report_to_defaults_to_tensorboard_when_installed(tmp_path, script):
    """REPORT_TO unset: tensorboard where this Python imports it, none where it does not (the demo must run on a
    machine without it); REPORT_TO=wandb reaches vlft as it is."""
    command = "dpo" if "dpo" in script else "sft"

    def report_to(name: str, **settings: str) -> str:
        (tmp_path / name).mkdir()
        argv = launched_argv(tmp_path / name, script, **settings)[command]
        return argv[len(argv) - 1 - argv[::-1].index("--report_to") + 1]

    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    assert report_to("default") == ("tensorboard" if has_tensorboard else "none")
    hidden = tmp_path / "no-tensorboard"  # a module named tensorboard that fails to import, first on the path
    hidden.mkdir()
    (hidden / "tensorboard.py").write_text("raise ImportError('not installed here')\n")
    assert report_to("without", PYTHONPATH=str(hidden)) == "none"
    assert report_to("wandb", REPORT_TO="wandb") == "wandb"
    assert report_to("none", REPORT_TO="none") == "none"


def test_eval_settings_reach_vlft(tmp_path):
    held_out = tmp_path / "held_out.json"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    calls = launched_argv(tmp_path / "a", "finetune_lora.sh", EVAL_DATA=str(held_out), EVAL_STEPS="25")
    values = flat(parse_args(SFT_GROUPS, calls["sft"]))
    assert values["eval_data_path"] == str(held_out)
    assert (values["eval_strategy"], values["eval_steps"]) == ("steps", 25)
    assert values["per_device_eval_batch_size"] == values["per_device_train_batch_size"] == 2
    unset = launched_argv(tmp_path / "b", "finetune_lora.sh")["sft"]  # unset: no evaluation flag at all
    assert not {"--eval_data_path", "--eval_strategy", "--eval_steps"} & set(unset)


# --- real runs on the tiny model ---


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vlft-cache")


def run_script(script: str, out_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    env = script_env(out_dir.parent, PYTHON=sys.executable, EPOCHS="1", OUTPUT_DIR=str(out_dir), VLFT_CACHE=str(cache))
    return subprocess.run(["bash", str(SCRIPTS / script), "--disable_tqdm", "true"], env=env,
                          capture_output=True, text=True, timeout=300)


DONE = re.compile(r"\[vlft\] done: (\d+) steps in [\d.]+s; loss (\d+\.\d+) -> (\d+\.\d+);")


def assert_trained(proc: subprocess.CompletedProcess, out: Path, weights: list[str], lora: bool) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in [*weights, ARGS_FILE, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        assert (out / name).is_file(), name
    match = DONE.search(proc.stderr)
    assert match, proc.stderr[-3000:]
    assert int(match.group(1)) == 5  # 10 demo records, batch size 2, one epoch
    assert 0 < float(match.group(2)) < 20 and 0 < float(match.group(3)) < 20
    args = json.loads((out / ARGS_FILE).read_text())
    assert args["lora_enable"] is lora
    assert args["num_train_epochs"] == 1 and args["output_dir"] == str(out)
    # the record holds the pixel budgets used: the tiny Qwen2-VL family's defaults, not "unset"
    assert (args["image_min_pixels"], args["image_max_pixels"]) == (4 * 28 * 28, 16384 * 28 * 28)
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("lora") / "out"
    return run_script("finetune_lora.sh", out, cache), out


def test_finetune_lora_script_trains(lora_run):
    proc, out = lora_run
    assert_trained(proc, out, ["adapter_model.safetensors", "adapter_config.json"], lora=True)
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16


def test_finetune_lora_vision_script_trains(tmp_path, cache):
    out = tmp_path / "out"
    proc = run_script("finetune_lora_vision.sh", out, cache)
    assert_trained(proc, out, ["adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors"],
                   lora=True)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())  # PEFT shortens target_modules in the config, so look at the saved tensors
    assert any(".visual.blocks." in k and "lora_A" in k for k in keys)
    assert any(".language_model.layers." in k and "lora_A" in k for k in keys)
    assert not any("patch_embed" in k or "merger" in k for k in keys)


def test_finetune_video_script_trains(tmp_path, cache):
    out = tmp_path / "out"
    proc = run_script("finetune_video.sh", out, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and "8 of 8 records usable" in proc.stderr
    assert DONE.search(proc.stderr) and "Traceback" not in proc.stderr


def test_video_script_fps_and_nframes_conflict_is_named(tmp_path):
    calls = launched_argv(tmp_path, "finetune_video.sh", FPS="1", NFRAMES="8")
    from vlft.errors import VlftError

    with pytest.raises(VlftError, match="--fps 1.0 and --nframes 8"):
        parse_args(SFT_GROUPS, calls["sft"])


def test_finetune_script_trains(tmp_path, cache):
    out = tmp_path / "out"
    proc = run_script("finetune.sh", out, cache)
    assert_trained(proc, out, ["model.safetensors", "config.json"], lora=False)
    assert not (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_vl"


def test_second_run_into_the_same_dir_changes_nothing(lora_run, cache):
    first, out = lora_run
    assert first.returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path("adapter_model.safetensors") in before

    proc = run_script("finetune_lora.sh", out, cache)
    assert proc.returncode == 2
    assert f"vlft sft: error: --output_dir {out} already holds files" in proc.stderr
    assert "--overwrite_output_dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_saved_arguments_are_usable_as_config(lora_run):
    """`resolved_args` promises that vlft_args.json can be passed back as --config."""
    _, out = lora_run
    saved = json.loads((out / ARGS_FILE).read_text())
    values = flat(parse_args(SFT_GROUPS, ["--config", str(out / ARGS_FILE)]))
    for name in ["model_id", "data_path", "output_dir", "lora_enable", "lora_rank", "learning_rate", "num_train_epochs"]:
        assert values[name] == saved[name], name


@pytest.mark.parametrize("env,args,expected", [
    ({"NUM_GPUS": "1"}, "64 4", "16"),
    ({"NUM_GPUS": "8"}, "64 4", "2"),
    ({"NUM_GPUS": "8", "NNODES": "2"}, "128 4", "2"),
    ({"NUM_GPUS": "8", "NNODES": "2"}, "32 4", None),  # 32 < 4 x 16
    ({"NUM_GPUS": "3"}, "64 4", None),  # 64 is not a multiple of 12
])
def test_gradient_accumulation_follows_the_global_batch(env, args, expected):
    proc = subprocess.run(["bash", "-c", f'source "{SCRIPTS}/_common.sh"; grad_accum {args}'],
                          env={**os.environ, **env}, capture_output=True, text=True)
    if expected is None:
        assert proc.returncode != 0 and "GLOBAL_BATCH_SIZE" in proc.stderr
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == expected


def test_multi_gpu_settings_reach_the_launchers(tmp_path):
    """NUM_GPUS/NNODES/NODE_RANK/MASTER_*/ZERO_CONFIG become the DeepSpeed launcher's or torchrun's flags."""
    shim = tmp_path / "python-shim"
    shim.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGV_FILE"\n')
    shim.chmod(0o755)

    def launched(**settings) -> list[str]:
        env = {**os.environ, "PYTHON": str(shim), "ARGV_FILE": str(tmp_path / "argv"), **settings}
        subprocess.run(["bash", "-c", f'source "{SCRIPTS}/_common.sh"; vlft_launch sft --x 1'], env=env, check=True,
                       capture_output=True)
        return (tmp_path / "argv").read_text().split()

    two_nodes = launched(NUM_GPUS="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29555",
                         ZERO_CONFIG=str(REPO / "zero_configs" / "zero3.json"))
    assert two_nodes[:2] == ["-m", "deepspeed.launcher.runner"]
    joined = " ".join(two_nodes)
    for piece in ("--num_gpus 8", "--num_nodes 2", "--master_addr 10.0.0.1", "--master_port 29555", "--no_ssh",
                  "--node_rank 1", "--module vlft sft --x 1", f"--deepspeed {REPO / 'zero_configs' / 'zero3.json'}"):
        assert piece in joined, piece
    ddp = " ".join(launched(NUM_GPUS="4"))
    assert ddp.startswith("-m torch.distributed.run --nproc_per_node 4 --nnodes 1") and "-m vlft sft --x 1" in ddp
    assert "--deepspeed" not in ddp
    assert " ".join(launched(NUM_GPUS="1")).startswith("-m vlft sft --x 1")


def test_merge_script_merges_the_newest_demo_run(tmp_path, cache):
    """bash scripts/merge_lora.sh merges a LoRA run into a loadable model; with no ADAPTER/OUTPUT it takes
    output/finetune_lora/latest (which finetune_lora.sh points at its newest run) and names the output after it."""
    run_dir = tmp_path / "runs" / "finetune_lora" / "20260101-000000"
    proc = run_script("finetune_lora.sh", run_dir, cache)  # the script itself updates the sibling `latest` link
    assert proc.returncode == 0 and (run_dir.parent / "latest").resolve() == run_dir.resolve()
    out = tmp_path / "merged"
    env = script_env(tmp_path, PYTHON=sys.executable, VLFT_CACHE=str(cache), ADAPTER=str(run_dir.parent / "latest"),
                     OUTPUT=str(out))
    proc = subprocess.run(["bash", str(SCRIPTS / "merge_lora.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    shim = tmp_path / "python-shim"
    shim.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGV_FILE"\n')
    shim.chmod(0o755)
    env = script_env(tmp_path, PYTHON=str(shim), ARGV_FILE=str(tmp_path / "argv"))
    env.pop("ADAPTER", None)
    env.pop("OUTPUT", None)
    latest = REPO / "output" / "finetune_lora" / "latest"
    proc = subprocess.run(["bash", str(SCRIPTS / "merge_lora.sh")], env=env, capture_output=True, text=True)
    if latest.exists():
        argv = (tmp_path / "argv").read_text().split()
        assert argv[argv.index("--adapter") + 1] == str(latest)
        expected = REPO / "output" / "merged" / f"finetune_lora-{latest.resolve().name}"
        assert argv[argv.index("--output") + 1] == str(expected)
    else:
        assert proc.returncode == 2 and "bash scripts/finetune_lora.sh" in proc.stderr


# --- the DPO script ---


def script_flags(text: str) -> set[str]:
    """The flags a script passes: literal --flags, `list_flag NAME ...`, and those of the _common.sh helpers it
    calls (lora_flags, training_flags)."""
    common = (SCRIPTS / "_common.sh").read_text()
    common = common[common.index("list_flag() {"):]
    return set(FLAG.findall(text + common)) | set(re.findall(r"list_flag (\w+)", text))


def test_every_flag_in_the_dpo_script_is_a_dpo_argument():
    text = (SCRIPTS / "finetune_dpo.sh").read_text()
    assert "vlft_launch dpo" in text and "training_flags" in text
    flags = script_flags(text)
    assert len(flags) > 30 and {"loss_weights", "lora_rank", "beta"} <= flags
    assert sorted(flags - DPO_FIELDS) == []


@pytest.mark.parametrize("demo", [True, False], ids=["demo", "real-model"])
def test_dpo_script_arguments_parse(tmp_path, demo):
    pairs = tmp_path / "pairs.json"
    pairs.write_text("[]")
    settings = {} if demo else {"MODEL": "/ckpt/merged-sft", "DATA": str(pairs), "IMAGE_FOLDER": str(tmp_path)}
    calls = launched_argv(tmp_path, "finetune_dpo.sh", **settings)
    assert sorted(calls) == (["dpo", "tiny-model"] if demo else ["dpo"])
    groups = parse_args(DPO_GROUPS, calls["dpo"])
    validate(*groups)
    values = flat(groups)
    if demo:
        assert values["model_id"] == str(tmp_path / "cache" / TINY)
        assert values["data_path"] == [str(REPO / "data_examples" / "dpo_demo.json")]
        assert values["image_folder"] == str(REPO / "data_examples")
        expected = dict(num_train_epochs=6, learning_rate=5e-3, lora_rank=16, lora_alpha=32,
                        per_device_train_batch_size=2, gradient_accumulation_steps=1, dataloader_num_workers=0)
    else:
        assert (values["model_id"], values["data_path"], values["image_folder"]) == (
            "/ckpt/merged-sft", [str(pairs)], str(tmp_path))
        expected = dict(num_train_epochs=1, learning_rate=5e-6, lora_rank=64, lora_alpha=64,
                        per_device_train_batch_size=2, gradient_accumulation_steps=16, dataloader_num_workers=WORKERS)
    expected.update(lora_enable=True, lora_dropout=0.0, freeze_vision_tower=True, freeze_merger=False, beta=0.1,
                    loss_type=["sigmoid"], precompute_ref_log_probs=False, truncation_mode="keep_start",
                    packing=False, output_dir=str(tmp_path / "out"))
    assert {k: values[k] for k in expected} == expected


def test_dpo_demo_trains_and_merges_into_a_loadable_model(tmp_path, cache):
    """`bash scripts/finetune_dpo.sh` with only OUTPUT_DIR: the offline demo (6 pairs: images, two images, a video,
    history, text, an image-side pair) trains LoRA + merger; merge_lora.sh folds it into a model plain transformers
    loads and runs."""
    out = tmp_path / "runs" / "dpo"
    env = script_env(tmp_path, PYTHON=sys.executable, VLFT_CACHE=str(cache), OUTPUT_DIR=str(out))
    proc = subprocess.run(["bash", str(SCRIPTS / "finetune_dpo.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "6 of 6 records usable" in proc.stderr
    for name in ["adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors", ARGS_FILE,
                 "tokenizer.json", "chat_template.jinja"]:
        assert (out / name).is_file(), name
    assert (out.parent / "latest").resolve() == out.resolve()
    match = DONE.search(proc.stderr)
    assert match, proc.stderr[-3000:]
    assert int(match.group(1)) == 18  # 6 pairs, 2 per step on one process: 3 steps per epoch, 6 epochs
    assert float(match.group(2)) == pytest.approx(0.6931, abs=1e-4)  # step 1: policy = reference, loss = ln 2
    assert float(match.group(3)) < 0.2  # the demo visibly learns to rank its pairs
    args = json.loads((out / ARGS_FILE).read_text())
    assert args["lora_enable"] is True and args["beta"] == 0.1 and args["freeze_merger"] is False

    base, new = merge_with_script_and_generate(tmp_path, cache, out, "red_square.png", "What shape is this?")
    # what trained is in the merged weights (LoRA folded into the LLM, the merger replaced), the rest is the base
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert any("merger" in k for k in changed) and any(k.endswith("q_proj.weight") for k in changed)
    assert not any(".blocks." in k or "embed" in k for k in changed)


# --- the GRPO script ---

def test_every_flag_in_the_grpo_script_is_a_grpo_argument():
    text = (SCRIPTS / "finetune_grpo.sh").read_text()
    assert "vlft_launch grpo" in text and "training_flags" in text
    flags = script_flags(text)
    assert {"num_generations", "max_completion_length", "reward_funcs", "reward_weights", "beta", "lora_rank"} <= flags
    assert sorted(flags - GRPO_FIELDS) == []


@pytest.mark.parametrize("demo", [True, False], ids=["demo", "real-model"])
def test_grpo_script_arguments_parse(tmp_path, demo):
    prompts = tmp_path / "prompts.json"
    prompts.write_text("[]")
    settings = {} if demo else {"MODEL": "/ckpt/merged-sft", "DATA": str(prompts), "IMAGE_FOLDER": str(tmp_path),
                                "REWARD_FUNCS": "format my_rewards.py:box_reward", "REWARD_WEIGHTS": "0.5 1.0"}
    calls = launched_argv(tmp_path, "finetune_grpo.sh", **settings)
    assert sorted(calls) == (["grpo", "tiny-model"] if demo else ["grpo"])
    groups = parse_args(GRPO_GROUPS, calls["grpo"])
    validate(*groups)
    values = flat(groups)
    if demo:
        assert values["model_id"] == str(tmp_path / "cache" / TINY)
        assert values["data_path"] == [str(REPO / "data_examples" / "grpo_demo.json")]
        assert values["image_folder"] == str(REPO / "data_examples")
        expected = dict(num_generations=4, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                        max_completion_length=8, learning_rate=5e-2, lora_rank=16, lora_alpha=32,
                        reward_funcs=["count", f"{REPO / 'data_examples' / 'grpo_demo_rewards.py'}:starts_with_word"],
                        reward_weights=None, dataloader_num_workers=0, num_train_epochs=3)
    else:
        assert (values["model_id"], values["data_path"], values["image_folder"]) == (
            "/ckpt/merged-sft", [str(prompts)], str(tmp_path))
        expected = dict(num_generations=8, per_device_train_batch_size=8, gradient_accumulation_steps=8,
                        max_completion_length=512, learning_rate=1e-6, lora_rank=64, lora_alpha=64,
                        reward_funcs=["format", "my_rewards.py:box_reward"], reward_weights=[0.5, 1.0],
                        dataloader_num_workers=WORKERS, num_train_epochs=1)
    expected.update(lora_enable=True, lora_dropout=0.0, freeze_vision_tower=True,
                    freeze_merger=False, beta=0.0, loss_type="dapo", temperature=1.0, packing=False,
                    output_dir=str(tmp_path / "out"))
    assert {k: values[k] for k in expected} == expected


def test_grpo_script_use_vllm_settings_reach_vlft(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    default = flat(parse_args(GRPO_GROUPS, launched_argv(tmp_path / "a", "finetune_grpo.sh")["grpo"]))
    assert (default["use_vllm"], default["vllm_mode"], default["vllm_server_base_url"]) == (False, "colocate", None)
    calls = launched_argv(tmp_path / "b", "finetune_grpo.sh", USE_VLLM="true", VLLM_MODE="server",
                          VLLM_SERVER_BASE_URL="http://vllm-host:8000")
    values = flat(parse_args(GRPO_GROUPS, calls["grpo"]))
    assert (values["use_vllm"], values["vllm_mode"], values["vllm_server_base_url"]) == (
        True, "server", "http://vllm-host:8000")


def test_grpo_demo_writes_completions_and_merges(tmp_path, cache):
    """`bash scripts/finetune_grpo.sh` with only OUTPUT_DIR: the offline demo (7 prompts: images, two images, a
    video, a text prompt; 4 completions each, 2 prompts a step, so 3 steps an epoch and one prompt left out, as in
    TRL) runs three epochs and logs every completion with its record, media and rewards in completions.jsonl, its
    learnable reward rising; merge_lora.sh folds the run into a model plain transformers loads and runs."""
    import importlib.util

    from vlft.train.grpo.rewards import count_reward

    spec = importlib.util.spec_from_file_location("grpo_demo_rewards", REPO / "data_examples" / "grpo_demo_rewards.py")
    demo_rewards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_rewards)

    out = tmp_path / "runs" / "grpo"
    env = script_env(tmp_path, PYTHON=sys.executable, VLFT_CACHE=str(cache), OUTPUT_DIR=str(out))
    proc = subprocess.run(["bash", str(SCRIPTS / "finetune_grpo.sh"), "--disable_tqdm", "true"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "7 of 7 records usable" in proc.stderr
    for name in ["adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors", ARGS_FILE,
                 "tokenizer.json", "chat_template.jinja", "completions.jsonl"]:
        assert (out / name).is_file(), name
    assert (out.parent / "latest").resolve() == out.resolve()
    match = re.search(r"\[vlft\] done: (\d+) steps", proc.stderr)
    assert match and int(match.group(1)) == 9, proc.stderr[-3000:]  # 7 prompts, 2 a step: 3 steps an epoch, 3 epochs
    assert "GRPO: 7 prompts, 2 a step" in proc.stderr
    assert re.search(r"done: 9 steps in [\d.]+s; loss \S+ -> \S+; reward [\d.]+ -> [\d.]+;", proc.stderr)

    records = {r["id"]: r for r in json.loads((REPO / "data_examples" / "grpo_demo.json").read_text())}
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 9 * 2 * 4  # 9 steps of 2 prompts, 4 completions each
    assert sorted({r["step"] for r in rows}) == list(range(1, 10))
    for row in rows:
        record = records[row["id"]]
        assert row["record"] == list(records).index(row["id"])
        for key, field in (("image", "images"), ("video", "videos")):
            media = record.get(key, [])
            assert row[field] == (media if isinstance(media, list) else [media]), (row["id"], field)
        assert isinstance(row["completion"], str) and isinstance(row["truncated"], bool)
        solution = record.get("solution") or record["conversations"][-1]["value"]
        assert row["rewards"] == {"count": count_reward([row["completion"]], [solution])[0],
                                  "starts_with_word": demo_rewards.starts_with_word([row["completion"]])[0]}
        assert row["reward"] == sum(row["rewards"].values())
    for first in (1, 4, 7):  # each epoch: 6 of the 7 prompts, 4 rows each
        epoch = [r for r in rows if first <= r["step"] < first + 3]
        ids = {r["id"] for r in epoch}
        assert len(ids) == 6 and all(sum(r["id"] == rid for r in epoch) == 4 for rid in ids)

    base, new = merge_with_script_and_generate(tmp_path, cache, out, "count_3.png", "How many shapes?")
    assert all(base[k].shape == new[k].shape for k in base)


def merge_with_script_and_generate(tmp_path, cache, run_dir, image: str, question: str):
    """`merge_lora.sh` on a run; the merged model loads with plain transformers and generates 4 tokens for an image
    question. Returns the base and merged state dicts (same keys)."""
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    merged = tmp_path / "merged"
    env = script_env(tmp_path, PYTHON=sys.executable, VLFT_CACHE=str(cache), ADAPTER=str(run_dir), OUTPUT=str(merged))
    proc = subprocess.run(["bash", str(SCRIPTS / "merge_lora.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, new = load_file(str(cache / TINY / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert base.keys() == new.keys()
    model = AutoModelForImageTextToText.from_pretrained(merged)
    processor = AutoProcessor.from_pretrained(merged)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(REPO / "data_examples" / "images" / image).convert("RGB")],
                       return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert ids.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert isinstance(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:])[0], str)
    return base, new


@pytest.mark.slow  # a real training run stopped by a signal: in `make test-distributed`
def test_sigterm_to_the_whole_job_saves_a_checkpoint_and_the_script_exits_0(tmp_path, cache):
    """What Slurm and Kubernetes do: SIGTERM to every process of the job (the script's shell included). The script
    execs its launch, so the signal reaches vlft, which finishes the step, saves and exits 0; the `latest` link stays
    where it was (the run is not finished)."""
    import signal
    import time

    out = tmp_path / "runs" / "preempted"
    env = script_env(tmp_path, PYTHON=sys.executable, EPOCHS="100", SAVE_STEPS="100000", OUTPUT_DIR=str(out),
                     VLFT_CACHE=str(cache))
    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen(["bash", str(SCRIPTS / "finetune_lora.sh")], env=env, stdout=sink, stderr=sink,
                                start_new_session=True)
        deadline = time.time() + 300
        while "[vlft] step " not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGTERM" in text and "RESUME=latest" in text
    assert list(out.glob("checkpoint-*")) and not (out.parent / "latest").exists()


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_vl_moe"])
def test_lora_script_trains_a_tiny_model_of_the_newer_families(tmp_path, tiny_model_factory, family):
    """`vlft tiny-model --family F` then `MODEL=<it> bash scripts/finetune_lora.sh`: the run goes through the same
    code as a real checkpoint of the family, and the loss falls."""
    out = tmp_path / "out"
    env = script_env(tmp_path, PYTHON=sys.executable, MODEL=str(tiny_model_factory(family)), OUTPUT_DIR=str(out),
                     EPOCHS="3", LR="5e-3", BATCH_SIZE="2", GLOBAL_BATCH_SIZE="2", NUM_WORKERS="0", SAVE_STEPS="1000",
                     REPORT_TO="none")
    proc = subprocess.run(["bash", str(SCRIPTS / "finetune_lora.sh"), "--disable_tqdm", "true"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = DONE.search(proc.stderr)
    assert match, proc.stderr[-3000:]
    assert int(match.group(1)) == 15  # 10 records, 2 per step, 3 epochs
    assert float(match.group(3)) < float(match.group(2)) - 0.5, match.group(0)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / ARGS_FILE).read_text())["model_id"] == str(tiny_model_factory(family))
    assert "Traceback" not in proc.stderr
