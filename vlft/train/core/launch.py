"""What every training stage (sft, dpo, grpo) does around training, one definition each: the output-dir rule,
distributed start and clean shutdown, the resolved-arguments record, training + saving + the end-of-run summary,
and the process exit routine. A stage's module is then a short linear `run(argv)`:

    def main(argv=None) -> int:
        return run_stage(run, argv)
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

from vlft.errors import VlftError
from vlft.run_dir import ARGS_FILE, REF_CACHE_DIR
from vlft.utils import log


def init_distributed_early(*, deepspeed: bool) -> None:
    """Start DeepSpeed's process group before TrainingArguments exist, when launched on several processes
    with --deepspeed (on the command line or in --config; `config.parse_command` calls this).

    Why: TrainingArguments fill the DeepSpeed config's "auto" batch sizes from the world size when they are
    built, and ZeRO-3's zero.Init (inside from_pretrained) checks train_batch_size = micro x accumulation x
    world size. If the group is not up yet, the world size reads 1 and the check fails (seen on the CPU
    rehearsal: "4 != 2 * 1 * 1")."""
    if not deepspeed or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import deepspeed as ds
    import torch

    if not torch.distributed.is_initialized():
        ds.init_distributed()
        release_cpu_allreduce_names()


def release_cpu_allreduce_names() -> bool:
    """Unlink the shared-memory names of DeepSpeed's CPU all-reduce once every rank has mapped them.

    Why: on CPU (the rehearsal), DeepSpeed's shm all-reduce (csrc/cpu/comm/shm.cpp, read against 0.19.8) creates
    one ~69 MB POSIX shared-memory segment per rank, `/dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_
    {MASTER_PORT}_{rank}`, and never unlinks it. /dev/shm is RAM: every rehearsal leaks 69 MB per process
    until reboot (a day of test runs here left 22 GB and the next runs hung), and a later run on the same port
    can map a peer's stale segment before that peer recreates it. `initialize` returns on each rank only after
    it has mapped every peer's segment, so after a barrier the names serve nothing: each rank unlinks its own,
    its mappings stay valid, and the kernel frees the memory when the processes exit, however they exit."""
    import os

    import torch
    from deepspeed.comm import comm as ds_comm

    if getattr(getattr(ds_comm, "cdb", None), "shm_comm_op", None) is None:
        return False
    torch.distributed.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        return False
    return True


def shutdown_distributed(wait: bool = True) -> bool:
    """Leave the process group cleanly: a gloo/DeepSpeed group still alive at interpreter exit can abort the
    process ("terminate called without an active exception") after a successful run."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return True
    return False


def check_output_dir(train_args) -> None:
    """Before anything loads: nothing the user wrote is overwritten (a non-empty --output_dir needs
    --overwrite_output_dir or a resume), --output_dir is writable, `--resume_from_checkpoint latest` is resolved
    to the newest complete checkpoint (train/core/checkpoints.py), and what a killed save left behind is removed.
    --overwrite_output_dir (without a resume) starts a new run: DPO's cached reference log-probs of the old one
    (`ref_log_probs/`) are removed, so nothing of it is read back."""
    import shutil

    from vlft.train.core.checkpoints import check_writable, clear_staging, resolve_resume, user_files

    out = train_args.output_dir
    resume = resolve_resume(train_args)
    if user_files(out) and not (train_args.overwrite_output_dir or resume):
        raise VlftError(
            f"--output_dir {out} already holds files; nothing was changed. Choose a new directory, pass "
            "--overwrite_output_dir true to write into it, or --resume_from_checkpoint latest to continue that run"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        check_writable(out)
        clear_staging(out)
        cache = os.path.join(out, REF_CACHE_DIR)
        if train_args.overwrite_output_dir and not resume and os.path.isdir(cache):
            log(f"--overwrite_output_dir: removing {cache}, the reference log-probs of the run written there before")
            shutil.rmtree(cache)


# --report_to name -> the package it needs (HF's Trainer finds a missing one only after the model has loaded)
REPORTER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_training_flags(data_args, train_args, *, stage: str) -> None:
    """The flags HF's Trainer would only reject after the model load, checked before anything loads:

    - --report_to: each reporter's package is installed (tensorboard, wandb);
    - --train_empty_think: SFT only (which tokens SFT learns);
    - evaluation, stages whose config `evaluates` (sft, rm): --eval_data_path turns on --eval_strategy steps when
      that was left at "no" (every --eval_steps, which the Trainer defaults to --logging_steps); --eval_strategy or
      --load_best_model_at_end without --eval_data_path is an error. Other stages do not evaluate yet: any of these
      flags is an error."""
    import importlib.util

    from transformers.trainer_utils import IntervalStrategy

    for name in train_args.report_to or []:
        packages = REPORTER_PACKAGES.get(name, ())
        if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
            raise VlftError(f"--report_to {name} needs the {packages[0]} package, which this Python lacks: "
                            f"pip install {packages[0]}, or choose another --report_to (none, tensorboard, wandb)")

    if stage != "sft" and getattr(data_args, "train_empty_think", False):
        what = ("the completions are the policy's own; nothing is learned from labels" if stage == "grpo" else
                "every token of the answers is scored, an empty think block's included")
        raise VlftError(f"--train_empty_think decides which tokens SFT learns; in vlft {stage} {what}: drop the flag")

    evaluating = train_args.eval_strategy != IntervalStrategy.NO
    asked = [flag for flag, on in (("--eval_data_path", bool(data_args.eval_data_path)),
                                   (f"--eval_strategy {train_args.eval_strategy.value}", evaluating),
                                   ("--load_best_model_at_end", train_args.load_best_model_at_end)) if on]
    if not getattr(train_args, "evaluates", stage == "sft"):
        if asked:
            raise VlftError(f"{', '.join(asked)}: vlft {stage} does not evaluate during training yet; drop the flag(s)")
        return
    if data_args.eval_data_path:
        if not evaluating:
            train_args.eval_strategy = IntervalStrategy.STEPS
            train_args.eval_steps = train_args.eval_steps or train_args.logging_steps
            train_args.do_eval = True
        return
    if asked:
        raise VlftError(f"{', '.join(asked)} needs held-out records to evaluate on: add --eval_data_path FILE (a file "
                        "in --data_path's format), or drop the flag(s)")


def batch_warning(items: int, train_args, *, what: str = "records", prompts_per_step: int | None = None) -> str | None:
    """At start-up: warn (log and return the line) when one optimizer step's batch takes the whole data, so that an
    epoch is a single step (the scripts' GLOBAL_BATCH_SIZE=64 on a 10-record pilot: 3 epochs, 3 steps, each on 10
    records, not 64). None, and nothing logged, when an epoch holds more than one batch, or one item makes a batch of
    one (a deliberate smoke test).

    SFT / DPO: `items` are the training set's items (`what`: records, packed rows, pairs); the global batch is
    --per_device_train_batch_size x --gradient_accumulation_steps x processes, and the steps per epoch follow HF's
    Trainer (transformers 5.x `set_initial_training_values`): ceil(micro-batches per process / accumulation steps),
    at least 1, where accelerate gives each process ceil(ceil(items / per-device batch) / processes) micro-batches
    (floor with --dataloader_drop_last). GRPO: `items` are prompts and `prompts_per_step` is one step's prompts
    (train/grpo/trainer.py `prompts_per_step`); an epoch is items // prompts_per_step batches of prompts, TRL's rule
    (its RepeatSampler drops an incomplete last one), each trained on --num_iterations times."""
    bs, accum, world = (train_args.per_device_train_batch_size, train_args.gradient_accumulation_steps,
                        train_args.world_size)
    if prompts_per_step is None:
        per_step, unit = bs * accum * world, what
        how = f"--per_device_train_batch_size {bs} x --gradient_accumulation_steps {accum} x {world} process(es)"
        micro = (items // bs) // world if train_args.dataloader_drop_last else math.ceil(math.ceil(items / bs) / world)
        batches = steps_per_epoch = max(math.ceil(micro / accum), 1)
    else:
        per_step, unit = prompts_per_step, "prompts"
        how = (f"--per_device_train_batch_size {bs} / --num_generations {train_args.num_generations} x "
               f"--gradient_accumulation_steps {accum} x {world} process(es)")
        batches = items // per_step
        steps_per_epoch = batches * train_args.num_iterations
    if batches != 1 or per_step == 1:
        return None
    if train_args.max_steps > 0:
        total, source = train_args.max_steps, f"--max_steps {train_args.max_steps}"
    else:
        total = math.ceil(train_args.num_train_epochs * steps_per_epoch)
        source = f"--num_train_epochs {train_args.num_train_epochs:g}"
    per_epoch = ("one optimizer step per epoch" if steps_per_epoch == 1 else
                 f"one batch of prompts per epoch, trained on in {steps_per_epoch} steps (--num_iterations)")
    have = f"{items} {what if items != 1 else what[:-1]}"  # records, pairs, prompts, packed rows: one of each
    fewer = f", on {have} instead of {per_step}" if per_step > items else ""
    smaller = ("make the global batch smaller than the data: lower --gradient_accumulation_steps or "
               "--per_device_train_batch_size (the scripts: GLOBAL_BATCH_SIZE), or " if items > 1 else "")
    line = (f"warning: {have} and a global batch of {per_step} {unit} ({how}): {per_epoch}{fewer}, {total} optimizer "
            f"step(s) in all ({source}) -> for more steps, {smaller}give more data")
    log(line)
    return line


def train_and_save(trainer, *, lora: bool) -> tuple[dict, object]:
    """Train (resuming when --resume_from_checkpoint is set, after checking the checkpoint belongs to this run),
    save the final model and state, and log one end-of-run summary. Returns (summary, trainer); the summary's
    `tokens_per_second` is the whole job's (all processes), the same figure the throughput line shows.

    On SIGTERM / SIGUSR1 the run saves a checkpoint at the end of the step in progress and returns with
    `summary["preempted"]` set (no final save: the run is not finished) and the line that resumes it."""
    from vlft.train.core.checkpoints import PreemptionCallback, check_resume, latest_checkpoint

    args = trainer.args
    if args.resume_from_checkpoint:
        check_resume(args.resume_from_checkpoint, trainer.identity())
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    preemption.install()
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    finally:
        preemption.uninstall()
    elapsed = time.perf_counter() - start
    if preemption.stopped_at is not None:
        saved = latest_checkpoint(args.output_dir)
        log(f"stopped by {preemption.stopped_by} after step {preemption.stopped_at}; checkpoint saved: {saved}\n"
            f"       resume: run the same command with --resume_from_checkpoint latest (the scripts: "
            f"OUTPUT_DIR={os.path.abspath(args.output_dir)} RESUME=latest)")
        return {"preempted": preemption.stopped_by, "steps": result.global_step, "checkpoint": str(saved),
                "train_seconds": elapsed, "output_dir": os.path.abspath(args.output_dir), "lora": lora}, trainer
    trainer.save_final(args.output_dir)
    trainer.save_state()
    if args.should_save:
        link_latest(args.output_dir)
    from vlft.plot import plot_finished_run
    plot_finished_run(trainer)  # training_curves.png; a failure is a warning, the run stays finished

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rates = trainer.throughput.summary or {}
    summary = {
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "steps": result.global_step,
        "train_seconds": elapsed,
        "tokens_per_second": rates.get("tokens_per_second", 0.0),
        "flops": rates.get("flops", 0.0),
        "output_dir": os.path.abspath(args.output_dir),
        "lora": lora,
    }
    from vlft.run_dir import write_run_card
    write_run_card(trainer, summary)  # README.md in place of PEFT's empty card; a failure is a warning
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]  # GRPO: what to watch, not its loss
    reward = f"; reward {rewards[0]:.4f} -> {rewards[-1]:.4f}" if rewards else ""
    log(
        f"done: {summary['steps']} steps in {elapsed:.1f}s; loss {summary['first_loss']:.4f} -> "
        f"{summary['last_loss']:.4f}{reward}; {summary['tokens_per_second']:.0f} tokens/s (non-pad, all processes)"
        + (f"; resumed at step {preemption.started_at}: {summary['steps'] - preemption.started_at} steps ran in "
           "that time" if preemption.started_at else "") + "\n"
        f"       {'adapter' if lora else 'model'}, processor and {ARGS_FILE} in {summary['output_dir']}"
    )
    return summary, trainer


def link_latest(output_dir: str) -> None:
    """Point the link the scripts name in VLFT_LATEST_LINK (scripts/_common.sh: `<name>/latest`) at a finished run's
    directory, atomically (a new link renamed over the old one). Nothing without the variable."""
    link = os.environ.get("VLFT_LATEST_LINK")
    if not link:
        return
    out = os.path.abspath(output_dir)
    target = os.path.basename(out) if os.path.dirname(out) == os.path.dirname(os.path.abspath(link)) else out
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError as err:
        log(f"could not point {link} at {out}: {err.strerror}")


def run_stage(run: Callable[[list[str]], object], argv: list[str] | None) -> int:
    """Call a stage's `run(argv)` and leave the process the way a distributed job must."""
    try:
        run(list(argv or []))
    except BaseException:
        shutdown_distributed(wait=False)  # the other ranks may never reach a barrier
        raise
    if shutdown_distributed():
        # Everything is saved and the group is closed. On the CPU (gloo / DeepSpeed shared-memory comm) a
        # communication thread can still abort the interpreter's teardown ("terminate called without an
        # active exception") and turn a finished run into a failed one: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
