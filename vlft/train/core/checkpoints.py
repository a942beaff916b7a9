"""Checkpoints a run can always come back from: atomic writes, `--resume_from_checkpoint latest`, a check that a
resume continues the same run, and preemption (SIGTERM / SIGUSR1).

Atomic checkpoints
    The Trainer writes `checkpoint-N` into `<output_dir>/.vlft-staging/` and the main process renames it to
    `<output_dir>/checkpoint-N` once every rank has finished writing (a rename within one filesystem is atomic).
    So a `checkpoint-N` folder is always complete: a process killed while saving leaves the previous checkpoint
    as the newest one (`latest` resolves to it), and the rotation of `--save_total_limit` runs only after the new
    checkpoint is in place, so it never deletes the last complete one. The final save is staged the same way and
    its files are moved into `--output_dir` one by one (each `os.replace` is atomic). Leftovers of a killed save
    are removed at the next start.

Resume identity
    Every save writes `vlft_resume.json`: what must not change across a resume for the resumed steps to continue
    the same run (model, data file contents, record count, media and length settings, seed, batch geometry, what
    trains; the images' and videos' contents where the stage records them, DPO's). A resume that differs stops
    before training and names each difference.

Preemption
    Schedulers send SIGTERM (Slurm, Kubernetes) or a chosen signal such as SIGUSR1 (sbatch's signal option) before
    they kill a job. The handler only sets a flag; at the end of the step in progress the ranks agree (one
    all-reduce), save a checkpoint, stop, and the run exits 0 with the line that resumes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from vlft.errors import VlftError
from vlft.run_dir import (
    ARGS_FILE,
    CHECKPOINT_PREFIX,
    LATEST,
    RESUME_FILE,
    RUN_LEFTOVERS,
    STAGING_DIR,
    STATE_FILE,
    WRITE_PROBE_PREFIX,
)
from vlft.utils import log

_CHECKPOINT = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")

# Resolved arguments that must be equal for a resumed run to be the same run (when both runs have them).
# Paths are not compared (a resume may spell them differently, or the model may have moved): the data files' contents
# and the model's configuration are.
IDENTITY_ARGS = (
    "image_min_pixels", "image_max_pixels", "video_min_pixels",
    "video_max_pixels", "video_max_total_pixels", "fps", "nframes", "video_min_frames", "video_max_frames",
    "frames_fps", "max_seq_length", "max_length", "max_prompt_length", "truncation_mode", "packing",
    "group_by_length", "seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lora_rank", "lora_alpha", "use_dora", "bits", "num_generations",
    "num_iterations",  # GRPO: the sampler's order and which steps generate
    # restored from the checkpoint's optimizer and scheduler states, so a new value would be shown at start-up and
    # then silently not used: refused instead
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "optim", "adam_beta1",
    "adam_beta2", "adam_epsilon", "vision_lr", "merger_lr", "loraplus_lr_ratio",
)


# --- finding checkpoints ---------------------------------------------------------------------------------------

def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete `checkpoint-N` folders of a run directory, oldest step first. Complete means renamed into
    place (see the module docstring) and holding `trainer_state.json`."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CHECKPOINT.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def user_files(output_dir: str | os.PathLike) -> list[str]:
    """What a directory holds besides what a run writes before its first checkpoint (RUN_LEFTOVERS)."""
    root = Path(output_dir)
    # `.vlft-write-test-*`: rank 0's writability probe (check_writable), which another rank may see for a moment
    return sorted(p.name for p in root.iterdir()
                  if p.name not in RUN_LEFTOVERS and not p.name.startswith(WRITE_PROBE_PREFIX)) if root.is_dir() else []


def resolve_resume(train_args) -> str | None:
    """Turn `--resume_from_checkpoint` into the checkpoint to load (sets it on `train_args` and returns it).

    `latest`: the newest complete checkpoint in --output_dir; with none and an empty (or missing) --output_dir the
    run starts from step 0 (a job script can always pass `latest`, first start and requeue alike). A path must be
    a complete checkpoint. Raises VlftError naming the flag and what to do otherwise."""
    value = train_args.resume_from_checkpoint
    if not value:
        return None
    out = train_args.output_dir
    if str(value) == LATEST:
        found = latest_checkpoint(out)
        if found is None:
            if user_files(out):
                raise VlftError(f"--resume_from_checkpoint latest: {out} holds no complete checkpoint-N folder "
                                f"(it holds {', '.join(user_files(out)[:5])}); pass a checkpoint path, or a new "
                                "--output_dir to start a new run")
            log(f"--resume_from_checkpoint latest: no checkpoint in {out} yet; starting from step 0")
            train_args.resume_from_checkpoint = None
            return None
        log(f"resuming from {found} (the newest complete checkpoint in {out})")
        train_args.resume_from_checkpoint = str(found)
        return str(found)
    path = Path(value)
    if not path.is_dir():
        raise VlftError(f"--resume_from_checkpoint {value}: no such directory; pass a checkpoint-N folder of the run "
                        "or `latest`")
    if not (path / STATE_FILE).is_file():
        raise VlftError(f"--resume_from_checkpoint {value} is not a complete checkpoint (it has no "
                        f"{STATE_FILE}); pass a checkpoint-N folder of the run, or `latest`")
    return str(path)


def clear_staging(output_dir: str | os.PathLike) -> None:
    """Remove what a killed save left in the staging area (call on the main process before training)."""
    staging = Path(output_dir) / STAGING_DIR
    if staging.exists():
        log(f"removing {staging}: an unfinished save of an earlier, interrupted run")
        shutil.rmtree(staging, ignore_errors=True)


def check_writable(output_dir: str | os.PathLike) -> None:
    """--output_dir accepts a file (tried by writing and removing one); VlftError otherwise, before anything
    loads. Folders created for the try are removed again: a run that fails at start-up leaves nothing behind."""
    out = Path(output_dir).absolute()
    created = []
    parent = out
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    probe = out / f"{WRITE_PROBE_PREFIX}{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise VlftError(f"--output_dir {output_dir} is not writable ({err.strerror}); choose a directory you can "
                        "write to, with room for the checkpoints") from None
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


# --- publishing a staged save ----------------------------------------------------------------------------------

def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a completely written checkpoint into place. A folder of the same name from an earlier timeline (a
    resume from an older checkpoint reaches the same step again) is replaced."""
    _replace_dir(staged, final)
    remove_if_empty(staged.parent)


def _replace_dir(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` is first renamed aside (next to `new`) and removed only once
    the new one is in place, so a kill at any moment leaves one of the two complete under a known name."""
    if final.exists():
        old = new.parent / f"replaced-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)


def remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def publish_final(staged: Path, output_dir: Path) -> None:
    """Move the entries of a staged final save into --output_dir, each with one atomic replace."""
    for entry in sorted(staged.iterdir()):
        target = output_dir / entry.name
        if entry.is_dir():
            _replace_dir(entry, target)
        else:
            os.replace(entry, target)
    shutil.rmtree(staged, ignore_errors=True)
    remove_if_empty(staged.parent)


def save_failed(err: OSError, what: str, output_dir: str | os.PathLike) -> VlftError:
    """The error for a save that could not be written (disk full, permissions, quota)."""
    previous = latest_checkpoint(output_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    where = f" ({err.filename})" if err.filename else ""
    return VlftError(f"could not write {what}: {err.strerror or err}{where}. Nothing half-written was left in place; "
                     f"{kept}. Free space (or fix the permissions of --output_dir {output_dir}) and resume with "
                     "--resume_from_checkpoint latest")


# --- resume identity -------------------------------------------------------------------------------------------

def file_digest(path: str | os.PathLike, _cache: dict = {}) -> str:  # noqa: B006 (a per-process cache)
    """sha256 of a file's bytes (cached per path, size and mtime)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        _cache[key] = _sha256(path)
    return _cache[key]


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "attn_implementation"}


def config_digest(config) -> str:
    """sha256 of a model configuration without what does not change the model (its path, the library version,
    the dtype it was loaded in, cache and attention settings): two copies of one model give the same digest."""
    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()
                    if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        return value

    text = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def data_digest(data_path) -> dict:
    """{name: sha256} of the data a --data_path names (a list of entries, or one string of entries separated by
    commas or spaces: data/mixture.py): each file, or every file of a folder (a Hugging Face `save_to_disk`
    dataset). An entry's selection (`#1000`, `#0.5`) is part of its name, so a changed count is a changed identity."""
    from vlft.data.mixture import data_specs

    data = {}
    for path, suffix in data_specs(data_path):
        mark = "" if suffix is None else f"#{suffix}"
        if os.path.isfile(path):
            data[os.path.basename(path) + mark] = file_digest(path)
        elif os.path.isdir(path):
            for file in sorted(Path(path).rglob("*")):
                if file.is_file():
                    data[str(file.relative_to(Path(path).parent)) + mark] = file_digest(file)
    return data


# A video file is identified by its size, modification time and three sampled windows of its bytes, not by all of
# them: measured here, sha256 of a 64 MB, 2-minute 480p video takes 0.35 s, 16 % of the cheapest start-up probe
# (16 frames, 2.2 s), which seeks and reads only the stretches it decodes; a folder of long videos would pay that
# on every start. Images are hashed whole: the probe decodes every byte anyway (300 JPEGs of 1024x768: decode
# 1.47 s, sha256 0.08 s).
VIDEO_WINDOW = 1 << 20


def _video_file_identity(path: str) -> str:
    st = os.stat(path)
    if st.st_size <= 3 * VIDEO_WINDOW:
        sampled = _sha256(path)
    else:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for start in (0, (st.st_size - VIDEO_WINDOW) // 2, st.st_size - VIDEO_WINDOW):
                f.seek(start)
                digest.update(f.read(VIDEO_WINDOW))
        sampled = digest.hexdigest()
    return f"{st.st_size}:{st.st_mtime_ns}:{sampled}"


def media_identity(kind: str, source) -> str:
    """The identity of one resolved media entry. `kind` "image": sha256 of the file's bytes. "video": a video file
    by size, modification time (ns) and sha256 of its first, middle and last MiB (the whole file when it is at most
    3 MiB); a folder of frames or a list of frame paths by the sha256 of every frame, in order. The path itself is
    not part of it: a moved or copied folder (cp, rsync, another --image_folder spelling) keeps its identity, a
    changed picture at the same path does not. Read afresh on every call (no cache keyed on size and modification
    time, which a redraw can keep). Raises OSError for a file that cannot be read."""
    if kind == "image":
        return _sha256(source)
    if isinstance(source, (list, tuple)):
        return "frames:" + ",".join(_sha256(f) for f in source)
    if os.path.isdir(source):
        return "frames:" + ",".join(_sha256(f) for f in sorted(Path(source).iterdir()) if f.is_file())
    return _video_file_identity(str(source))


def media_digest(data, *, workers: int = 4) -> str:
    """sha256 of the media of every training item, item by item and slot by slot (`media_identity` of each), so
    that a picture swapped between two records changes it too. `data`: data/prepare.py's PreparedData (its
    `image_paths`, `video_sources` and, for image-side preference pairs, `rejected_media`, parallel to `samples`).
    Each distinct file is read once, in `workers` threads (hashlib releases the GIL)."""
    rejected = getattr(data, "rejected_media", None) or [None] * len(data.image_paths)
    items = [[("image", p) for p in images] + [("video", v) for v in videos]
             + ([("rejected_image", p) for p in other[0]] + [("rejected_video", v) for v in other[1]] if other else [])
             for images, videos, other in zip(data.image_paths, data.video_sources or [[]] * len(data.image_paths),
                                              rejected)]

    def identity(entry):
        kind, source = entry
        return media_identity(kind.removeprefix("rejected_"), source)

    unique = {(kind.removeprefix("rejected_"), json.dumps(source)): (kind, source)
              for item in items for kind, source in item}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = dict(zip(unique, pool.map(identity, unique.values())))
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([(kind, found[(kind.removeprefix("rejected_"), json.dumps(source))])
                                  for kind, source in item]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def run_identity(vlft_args: dict, *, records: int, trained: dict, world_size: int, model_config=None,
                 media: str | None = None) -> dict:
    """What a resume must find unchanged: the identity arguments, the data files' contents, the media's contents
    (`media`: `media_digest` of the training items, when the stage passes it), the model's configuration, the
    number of training items (records, pairs or packed rows after the start-up check), what trains and the number
    of processes. --image_folder is recorded to name it when the media differ, not compared itself."""
    return {
        "args": {k: vlft_args[k] for k in IDENTITY_ARGS if k in vlft_args},
        "model_id": vlft_args.get("model_id"),
        "data_sha256": data_digest(vlft_args.get("data_path")),
        "media_sha256": media,
        "image_folder": vlft_args.get("image_folder"),
        "model_config_sha256": config_digest(model_config) if model_config is not None else None,
        "train_items": records,
        "trained": trained,
        "world_size": world_size,
    }


def write_identity(output_dir: str | os.PathLike, identity: dict) -> None:
    (Path(output_dir) / RESUME_FILE).write_text(json.dumps(identity, indent=1, sort_keys=True, default=str))


def identity_differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between a checkpoint's identity and this run's ([] when it may resume)."""
    out = []
    saved_args, now_args = saved.get("args", {}), now.get("args", {})
    for key in sorted(saved_args.keys() & now_args.keys()):
        if saved_args[key] != now_args[key]:
            out.append(f"--{key}: {saved_args[key]!r} in the checkpoint, {now_args[key]!r} now")
    if saved.get("data_sha256") != now.get("data_sha256"):
        out.append(f"the data file contents differ (sha256 {saved.get('data_sha256')} in the checkpoint, "
                   f"{now.get('data_sha256')} now)")
    if saved.get("media_sha256") and now.get("media_sha256") and saved["media_sha256"] != now["media_sha256"]:
        folder = saved.get("image_folder"), now.get("image_folder")
        where = (f"--image_folder {folder[0]!r} in the checkpoint, {folder[1]!r} now" if folder[0] != folder[1]
                 else f"the same --image_folder {folder[0]!r}: images or videos were replaced or redrawn in place")
        out.append(f"the media contents differ ({where}; sha256 {saved['media_sha256']} in the checkpoint, "
                   f"{now['media_sha256']} now)")
    if saved.get("model_config_sha256") != now.get("model_config_sha256"):
        out.append(f"the model differs (its configuration; --model_id {saved.get('model_id')!r} in the checkpoint, "
                   f"{now.get('model_id')!r} now)")
    if saved.get("train_items") != now.get("train_items"):
        out.append(f"training items: {saved.get('train_items')} in the checkpoint, {now.get('train_items')} now")
    if saved.get("world_size") != now.get("world_size"):
        out.append(f"processes: {saved.get('world_size')} in the checkpoint, {now.get('world_size')} now (the data "
                   "order and the position in the epoch depend on it)")
    for part, label in (("non_lora", "fully trained weights"), ("lora_modules", "modules with an adapter")):
        before, after = set(saved.get("trained", {}).get(part, [])), set(now.get("trained", {}).get(part, []))
        if before != after:
            gone, new = sorted(before - after), sorted(after - before)
            out.append(f"{label}: {len(before)} in the checkpoint, {len(after)} now (only in the checkpoint: "
                       f"{gone[:3]}; only now: {new[:3]})")
    return out


def check_resume(checkpoint: str, identity: dict) -> None:
    """VlftError when `checkpoint` was written by a run that differs from this one (see `identity_differences`);
    a checkpoint written before vlft recorded its identity is accepted with a log line."""
    path = Path(checkpoint) / RESUME_FILE
    if not path.is_file():
        log(f"{checkpoint} has no {RESUME_FILE} (saved by an older vlft): resuming without checking that the data "
            "and settings are the same")
        return
    diffs = identity_differences(json.loads(path.read_text()), json.loads(json.dumps(identity, default=str)))
    if diffs:
        raise VlftError(f"cannot resume from {checkpoint}: this run is not the run that wrote it:\n  - "
                        + "\n  - ".join(diffs)
                        + f"\nResume with the data and flags that run was started with (its {ARGS_FILE} works as "
                          "--config), or start a new run in a new --output_dir")


# --- preemption ------------------------------------------------------------------------------------------------

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # SIGINT: Ctrl-C (a second one stops at once, unsaved)


class PreemptionCallback(TrainerCallback):
    """On SIGTERM / SIGUSR1: finish the step in progress, save a checkpoint, stop (see the module docstring).

    `install()` / `uninstall()` set and restore the signal handlers (main thread only); `stopped_by` is the
    signal's name and `stopped_at` the last finished step once the run stopped for it."""

    def __init__(self):
        self.requested: str | None = None
        # the ranks' agreement on `requested` for the step in progress, when the trainer already took it in its
        # per-step collective (train/core/trainer.py: _get_grad_norm); None: take it here
        self.agreed: bool | None = None
        self.stopped_by: str | None = None
        self.stopped_at: int | None = None
        self.started_at = 0  # the step training began from (a resume's checkpoint step)
        self._previous: dict = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested is not None:  # Ctrl-C twice: stop now, as Python would
            self.uninstall()
            raise KeyboardInterrupt
        if self.requested is None:
            again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
            os.write(2, f"[vlft] {name} received: finishing this step, then saving a checkpoint{again}\n".encode())
        self.requested = name

    def on_train_begin(self, args, state, control, **kwargs):
        self.started_at = state.global_step  # > 0 on a resume

    def on_step_end(self, args, state, control, **kwargs):
        agreed, self.agreed = self.agreed, None
        if agreed if agreed is not None else any_rank(self.requested is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_by = self.requested or "a signal on another process"
            self.stopped_at = state.global_step
        return control


def any_rank(flag, device) -> bool:
    """True when `flag` is true on any process (one all-reduce when distributed; the flag itself otherwise)."""
    return any_ranks([flag], device)[0]


def any_ranks(flags, device) -> list[bool]:
    """For each flag (a bool or a 0-d tensor on any device), whether it is true on any process: one all-reduce of
    them all when distributed, and one device-to-host copy either way."""
    import torch
    import torch.distributed as dist

    values = torch.stack([torch.as_tensor(f, device=device).reshape(()).to(torch.int32) for f in flags])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
