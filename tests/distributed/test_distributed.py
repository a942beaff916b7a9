"""Distributed training on CPU (2 processes, gloo), through the launcher the scripts use
(scripts/_common.sh: torchrun for DDP, the DeepSpeed launcher for ZeRO): the same global batch gives the
same loss curve on 1 process, DDP, ZeRO-1, ZeRO-2 and ZeRO-3; ZeRO-3 checkpoints equal single-process ones key by
key; ranks with and without visual inputs in one step do not hang; the data is split across ranks."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import launcher
import pytest
import torch
from conftest import DEMO_IMAGES, REPO
from safetensors.torch import load_file

from vlft.train.sft.run import run

pytestmark = pytest.mark.distributed


def launch(argv: list[str], *, zero: str | None, nproc: int = 2, port: int | None = None) -> subprocess.CompletedProcess:
    """`vlft sft argv` through vlft_launch, as the scripts run it (launcher.py)."""
    return launcher.launch("sft", argv, zero=zero, nproc=nproc, port=port)


def losses(out) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def four_records(tmp_path_factory):
    """4 demo records (images, multi-image, text): with a global batch of 4, every step sees all of them,
    whatever order or rank split a sampler chooses."""
    records = json.loads((REPO / "data_examples" / "llava_demo.json").read_text())
    path = tmp_path_factory.mktemp("data") / "four.json"
    path.write_text(json.dumps([records[i] for i in (0, 2, 3, 8)]))
    return path


def common(model_dir, data, out, per_device: int) -> list[str]:
    """Plain SGD: what is under test is the distributed arithmetic (gradient all-reduce, partitioned weights,
    gathering on save). With SGD a weight differs from the single-process one by lr x its gradient's rounding
    difference, so 1e-5 on the checkpoints means something. Adam divides by sqrt(v): an element whose gradient
    is at rounding level (LoRA A at the step where B has just left zero) can flip sign between reduction orders
    and its update jumps by up to 2 x lr; that made one element in 512 differ by 2e-5 with AdamW."""
    return ["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(DEMO_IMAGES),
            "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", str(per_device),
            "--optim", "sgd", "--learning_rate", "0.1", "--lr_scheduler_type", "constant", "--logging_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "true", "--seed", "0", "--weight_decay", "0.0"]


MODES = {"lora": ["--lora_enable", "true", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0"],
         "full": ["--freeze_vision_tower", "true"]}


@pytest.fixture(scope="module")
def single(tiny_model_dir, four_records, tmp_path_factory):
    """One process, global batch 4: the reference curve and checkpoint."""
    out = {}
    for mode, flags in MODES.items():
        path = tmp_path_factory.mktemp(f"single-{mode}") / "out"
        run(common(tiny_model_dir, four_records, path, 4) + flags)
        out[mode] = path
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", ["ddp", "zero1", "zero2", "zero3"])
def test_same_loss_curve_as_one_process(backend, mode, single, tiny_model_dir, four_records, tmp_path):
    out = tmp_path / "out"
    launch(common(tiny_model_dir, four_records, out, 2) + MODES[mode], zero=None if backend == "ddp" else backend)
    reference, got = losses(single[mode]), losses(out)
    print(f"\n{backend}/{mode}: 1 process {reference}, 2 processes {got}, "
          f"max |diff| {max(abs(a - b) for a, b in zip(reference, got)):.2e}")
    assert len(got) == len(reference) == 3
    assert max(abs(a - b) for a, b in zip(reference, got)) < 1e-4, (reference, got)
    assert reference[-1] < reference[0]  # the curve moves, so equal curves mean something

    if backend == "zero3":  # checkpoints written under ZeRO-3 equal the single-process ones, key by key
        files = (["adapter_model.safetensors", "non_lora_trainables.safetensors"] if mode == "lora"
                 else ["model.safetensors"])
        for name in files:
            ref, cur = load_file(str(single[mode] / name)), load_file(str(out / name))
            assert ref.keys() == cur.keys(), name
            for key in ref:
                assert ref[key].shape == cur[key].shape and ref[key].numel() > 0, key
                assert torch.allclose(ref[key], cur[key], atol=1e-5, rtol=1e-4), (name, key)


def test_zero3_on_a_hybrid_moe_model_gives_the_single_process_losses(four_records, tiny_model_factory, tmp_path):
    """Qwen3.5-MoE (linear and full attention layers, routed experts with LoRA, a shared expert) under ZeRO-3 on 2
    ranks: each rank routes its own tokens to its own experts, yet every rank gathers the same fused expert tensors,
    so nothing hangs and the global batch's losses equal one process's."""
    model = tiny_model_factory("qwen3_5_moe")
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    run(common(model, four_records, single, 4) + MODES["lora"])
    launch(common(model, four_records, zero3, 2) + MODES["lora"], zero="zero3")
    reference, got = losses(single), losses(zero3)
    print(f"\nqwen3_5_moe zero3: 1 process {reference}, 2 processes {got}")
    assert len(got) == len(reference) == 3
    assert max(abs(a - b) for a, b in zip(reference, got)) < 1e-4, (reference, got)
    assert reference[-1] < reference[0]
    saved = load_file(str(zero3 / "adapter_model.safetensors"))
    assert saved and all(v.numel() > 0 for v in saved.values())


@pytest.mark.parametrize("family", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5_moe"))
def test_zero3_ranks_with_and_without_media_do_not_hang(family, tiny_model_factory, tmp_path):
    """Each step, one rank gets a text-only record and the other an image + video record."""
    records = json.loads((REPO / "data_examples" / "llava_video_demo.json").read_text())
    mixed = [r for r in records if r["id"] in ("image_and_video", "text_only")]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(mixed))
    out = tmp_path / "out"
    launch(["--model_id", str(tiny_model_factory(family)), "--data_path", str(data), "--image_folder",
            str(REPO / "data_examples"), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size",
            "1", "--video_min_pixels", "1024", "--video_max_pixels", "4096", "--video_max_total_pixels", "65536",
            "--lora_enable", "true", "--vision_lora", "true", "--lora_rank", "4", "--save_strategy", "no",
            "--disable_tqdm", "true"], zero="zero3")
    assert len(losses(out)) == 2
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(".visual.blocks." in k for k in saved) and all(v.numel() > 0 for v in saved.values())


def test_data_is_split_across_ranks(tiny_model_dir, tmp_path):
    """10 records, 2 per device: one epoch is 3 steps on 2 ranks (5 on one), so each rank saw its own half."""
    out = tmp_path / "out"
    launch(["--model_id", str(tiny_model_dir), "--data_path", str(REPO / "data_examples" / "llava_demo.json"),
            "--image_folder", str(DEMO_IMAGES), "--output_dir", str(out), "--num_train_epochs", "1",
            "--per_device_train_batch_size", "2", "--lora_enable", "true", "--save_strategy", "no",
            "--disable_tqdm", "true"], zero="zero2")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_rehearsal_clears_shared_memory_left_on_its_port(tiny_model_dir, tmp_path):
    """Segments of an earlier run killed on the same port (here: short, zero-filled, one for a rank this run
    does not have) are removed by the launcher before the ranks start, and the run leaves none behind."""
    port = launcher.free_port()
    stale = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}") for rank in (0, 1, 7)]
    for path in stale:
        path.write_bytes(bytes(4096))
    try:
        launch(["--model_id", str(tiny_model_dir), "--data_path", str(REPO / "data_examples" / "llava_demo.json"),
                "--image_folder", str(DEMO_IMAGES), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                "--per_device_train_batch_size", "1", "--save_strategy", "no", "--disable_tqdm", "true"],
               zero="zero2", port=port)
    finally:
        for path in stale:
            path.unlink(missing_ok=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])
def test_zero3_packed_equals_one_process_padded(family, tiny_model_factory, four_records, tmp_path):
    """The 4 records packed into 2 rows, one per rank under ZeRO-3, give the loss of one process with all 4
    padded in one batch (one step at learning rate 0). On Qwen3.5 the ranks' rows hold different numbers of records,
    so its linear-attention layers run a different number of times per rank (models/patches/linear_attention.py)."""
    common_args = ["--model_id", str(tiny_model_factory(family)), "--data_path", str(four_records), "--image_folder",
                   str(DEMO_IMAGES), "--max_steps", "1", "--learning_rate", "0", "--save_strategy", "no",
                   "--disable_tqdm", "true", "--max_seq_length", "160", "--lora_enable", "true", "--lora_dropout", "0"]
    summary, _ = run(common_args + ["--output_dir", str(tmp_path / "padded"), "--per_device_train_batch_size", "4"])
    out = tmp_path / "packed"
    proc = launch(common_args + ["--output_dir", str(out), "--per_device_train_batch_size", "1", "--packing", "true"],
                  zero="zero3")
    assert "into 2 rows" in proc.stderr
    (packed,) = losses(out)
    print(f"\nZeRO-3 packed {packed} vs one process padded {summary['first_loss']}")
    assert abs(packed - summary["first_loss"]) < 1e-5


@pytest.mark.parametrize("zero", [None, "zero2"])
def test_two_ranks_prepare_the_data_once_then_load_it(zero, tiny_model_dir, tmp_path):
    """Both ranks ask for the prepared index (torchrun, and DeepSpeed whose process group is up before the data):
    one prepares while the other waits on the lock file; a second launch prepares nothing."""
    cache = tmp_path / "cache"

    def run(out):
        return launch(["--model_id", str(tiny_model_dir), "--data_path", str(REPO / "data_examples" / "llava_demo.json"),
                       "--image_folder", str(DEMO_IMAGES), "--output_dir", str(out), "--max_steps", "1",
                       "--per_device_train_batch_size", "1", "--lora_enable", "true", "--save_strategy", "no",
                       "--disable_tqdm", "true", "--data_cache_dir", str(cache)], zero=zero)

    first = run(tmp_path / "a").stderr
    assert first.count("data: preparing 10 record(s)") == 1, first[-3000:]
    second = run(tmp_path / "b").stderr
    assert "data: preparing" not in second and "loaded from" in second, second[-3000:]
