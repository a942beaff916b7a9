"""`vlft plan` against measurement: estimated and measured peak memory of real `vlft sft` runs.

    python bench/plan_check.py                       # CPU: tiny and mid-sized random models, full and LoRA, fp32
    python bench/plan_check.py --settings mid-full   # one setting
    python bench/plan_check.py --device cuda         # on a GPU (bf16): pending, not yet run

Each setting trains in its own process (`vlft sft`, 2 steps, one process, no DeepSpeed) on a synthetic data set
whose records are all alike (one 256x256 image, 256 vision tokens, and the same text), so every batch has the
same length and the estimate can be given exactly the run's shape. The models are random and built offline: the
tiny model of the tests (`vlft.models.tiny`), and a mid-sized Qwen2-VL (hidden 512, 4 layers, MLP 1408, vocabulary
32,000, a 4-block 256-wide vision tower) built from the same code.

Measured memory: on the CPU, the process's RSS high-water mark (getrusage ru_maxrss) at the end of training minus
its RSS just before the model loads (Python, torch, transformers, the processor and the checked data: what the
plan does not model); `overhead_gb` is 0 in the estimate. On CUDA, torch.cuda.max_memory_allocated (allocated
tensors only, so the estimate's fixed overhead is left out there too).

How to read the table: `error %` = (estimated - measured) / measured. The estimate is a worst case (gradients
counted with the full activations, as under gradient accumulation), so it should read high rather than low;
tests/test_plan.py asserts the mid-sized full fine-tuning row to within `MAX_ERROR`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing vlft

MAX_ERROR = 0.35  # asserted by tests/test_plan.py for mid-full on the CPU
IMAGE_SIDE = 256  # pixels; the tiny processor's patch 8 x merge 2 -> 16 x 16 = 256 vision tokens
STEPS = 2  # the optimizer states exist from the first step on: the second step's peak carries them
MID = dict(hidden=512, layers=4, intermediate=1408, vocab=32000, vision_depth=4, vision_hidden=256)

SETTINGS = {  # name -> (model, vlft sft flags)
    "tiny-full": ("tiny", []),
    "tiny-lora": ("tiny", ["--lora_enable", "true", "--lora_rank", "8"]),
    "mid-full": ("mid", []),
    "mid-lora": ("mid", ["--lora_enable", "true", "--lora_rank", "16", "--freeze_vision_tower", "true"]),
    "mid-full-gc": ("mid", ["--gradient_checkpointing", "true"]),
}
DEFAULT_SETTINGS = ("tiny-full", "tiny-lora", "mid-full", "mid-lora")


def build_models(root: Path, which: tuple[str, ...] = ("tiny", "mid")) -> dict[str, Path]:
    """The tiny and / or the mid-sized model directories under `root` (built once)."""
    import torch

    from vlft.models.tiny import build_model, build_processor, build_tokenizer, save_tiny_model

    out = {"tiny": save_tiny_model(root / "tiny", "qwen2_vl", exist_ok=True)} if "tiny" in which else {}
    if "mid" not in which:
        return out
    mid = root / "mid"
    if not (mid / "config.json").exists():
        tok = build_tokenizer("qwen2_vl")
        small = build_model("qwen2_vl", tok, hidden=MID["hidden"], layers=MID["layers"],
                            vision_depth=MID["vision_depth"], vision_hidden=MID["vision_hidden"], initializer_range=0.02)
        config = small.config
        config.text_config.vocab_size = MID["vocab"]
        config.text_config.intermediate_size = MID["intermediate"]
        torch.manual_seed(0)
        model = type(small)(config).to(torch.float32)
        model.generation_config = small.generation_config
        build_processor("qwen2_vl", tok).save_pretrained(mid)
        model.save_pretrained(mid)
    out["mid"] = mid
    return out


def build_data(root: Path, records: int = 4) -> Path:
    """`records` identical LLaVA records: one IMAGE_SIDE x IMAGE_SIDE image and a fixed question and answer."""
    from PIL import Image

    path = root / "data.json"
    if not path.exists():
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (200, 40, 40)).save(root / "images" / "red.png")
        answer = " ".join(["The image shows a red square on a blue background."] * 6)
        record = {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                        {"from": "gpt", "value": answer}]}
        path.write_text(json.dumps([dict(record, id=str(i)) for i in range(records)]))
    return path


def child(spec: dict) -> dict:
    """Train one setting in this process; returns the baseline and peak memory (bytes) and the run's shape."""
    import resource

    import psutil
    import torch

    import vlft.train.core.setup as setup
    import vlft.train.sft.run as sft

    cuda = spec["device"] == "cuda"
    seen: dict = {}
    prepare_model, prepare_data = setup.prepare_model, sft.prepare_sft_data

    def data_hook(*args, **kwargs):
        data = prepare_data(*args, **kwargs)
        seen["lengths"] = sorted(set(data.lengths))
        return data

    def model_hook(*args, **kwargs):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            seen["baseline"] = torch.cuda.memory_allocated()
        else:
            seen["baseline"] = psutil.Process().memory_info().rss
        return prepare_model(*args, **kwargs)

    setup.prepare_model, sft.prepare_sft_data = model_hook, data_hook
    argv = ["--model_id", spec["model"], "--data_path", spec["data"], "--image_folder", spec["images"],
            "--output_dir", spec["output"], "--per_device_train_batch_size", str(spec["batch"]),
            "--max_steps", str(STEPS), "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
            "--report_to", "none", "--dataloader_num_workers", "0", "--image_min_pixels", "1024",
            "--image_max_pixels", str(IMAGE_SIDE * IMAGE_SIDE), "--seed", "0", "--overwrite_output_dir", "true", *spec["flags"]]
    if cuda:
        argv += ["--bf16", "true"]
    sft.run(argv)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"baseline": seen["baseline"], "peak": peak, "lengths": seen["lengths"]}


def settings_for(name: str, seq: int, batch: int, device: str):
    """The plan's Settings for one bench setting, parsed from the same flags `vlft sft` got."""
    from vlft.plan import Settings

    _, flags = SETTINGS[name]
    given = dict(zip(flags[::2], flags[1::2]))
    truth = {"true": True, "false": False}
    freeze_vision = given.get("--freeze_vision_tower")
    return Settings(per_device_train_batch_size=batch, max_seq_length=seq, image_tokens=(IMAGE_SIDE // 16) ** 2,
                    lora_enable=given.get("--lora_enable") == "true", lora_rank=int(given.get("--lora_rank", 64)),
                    freeze_vision_tower=truth[freeze_vision] if freeze_vision else None,
                    gradient_checkpointing=given.get("--gradient_checkpointing") == "true",
                    bf16=device == "cuda", overhead_gb=0.0)


def measure(name: str, *, root: Path, models: dict[str, Path], data: Path, batch: int = 2, device: str = "cpu") -> dict:
    """Run one setting in a fresh process; returns estimated and measured bytes and the error."""
    from vlft.models.loading import load_family  # noqa: F401  (fails early outside a vlft checkout)
    from vlft.plan import estimate, load_config, model_shape

    model_key, flags = SETTINGS[name]
    spec = {"model": str(models[model_key]), "data": str(data), "images": str(data.parent / "images"),
            "output": str(root / "runs" / name), "batch": batch, "flags": flags, "device": device}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[1])
    if result.returncode:
        raise RuntimeError(f"{name}: the training process failed:\n{result.stderr[-4000:]}")
    got = json.loads(result.stdout.strip().splitlines()[-1])
    if len(got["lengths"]) != 1:
        raise RuntimeError(f"{name}: records of several lengths {got['lengths']}; the check needs one")
    plan = estimate(model_shape(load_config(spec["model"])), settings_for(name, got["lengths"][0], batch, device))
    measured = got["peak"] - got["baseline"]
    return {"setting": name, "estimated": plan.total, "measured": measured,
            "error": (plan.total - measured) / measured, "plan": plan, "seq": got["lengths"][0], "batch": batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workdir", help="where models, data and runs go (default: a temporary directory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    root = Path(args.workdir or tempfile.mkdtemp(prefix="plan_check."))
    models = build_models(root, tuple({SETTINGS[name][0] for name in args.settings}))
    data = build_data(root, records=STEPS * args.batch)
    print(f"{'setting':<12} {'tokens':>8} {'estimated MB':>13} {'measured MB':>12} {'diff MB':>8} {'error %':>8}   "
          "estimate by part (MB)")
    worst = 0.0
    for name in args.settings:
        r = measure(name, root=root, models=models, data=data, batch=args.batch, device=args.device)
        parts = ", ".join(f"{p} {getattr(r['plan'], p) / 1e6:.0f}" for p in r["plan"].PARTS if getattr(r["plan"], p))
        print(f"{name:<12} {r['batch']}x{r['seq']:<6} {r['estimated'] / 1e6:>13,.1f} {r['measured'] / 1e6:>12,.1f} "
              f"{(r['estimated'] - r['measured']) / 1e6:>+8.0f} {100 * r['error']:>+8.1f}   {parts}", flush=True)
        worst = max(worst, abs(r["error"]))
    print(f"largest |error|: {100 * worst:.1f}% (device {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
