"""Data preparation at scale: once per job, in processes, cached (issue 25).

`prepared_store` returns the store (data/store.py) of one data file for one set of inputs:

- **Cached** under --data_cache_dir (default $VLFT_DATA_CACHE, else $VLFT_CACHE/prepared, else
  ~/.cache/vlft/prepared), in a folder named by
  a key of everything the result depends on: the data file (its stat, and its bytes up to 256 MiB), the record
  format and the settings it reads, the processor (chat template, tokenizer vocabulary and special tokens, patch,
  merge and temporal patch sizes), the media settings, the thinking flags, --image_folder, vlft's version and the
  store's format. The length limit and the skip policy are not in it: they apply to the stored finding on every
  call (data/prepare.py `apply_policy`), so changing --max_seq_length re-uses the index.
- **Media files** are checked by stat (size, mtime, inode) on every call, one stat per file. When some changed (a
  broken image replaced, a missing one added), only the records that read them are prepared again, into a new
  generation `<key>.m<stats digest>`; the others are taken from the index as they are.
- **An edited data file** gets a new key; its records that are unchanged (same converted record, by blake2b digest)
  and whose media did not change are taken from the file's previous index (`sources/` remembers it).
- **Once per job**: the first process to reach a missing index builds it under a lock file and every other process
  waits for it on the file system (data/once.py), not in a torch.distributed collective, so no rank reaches the
  distributed timeout while one prepares. A shared file system gives one preparation per job; a node-local cache
  folder, one per node.
- **In processes**: the records are split into chunks prepared by `num_proc` forked processes (tokenisation holds
  the GIL; threads would not scale), with a progress line (records/s, ETA) every few seconds.
- **Written atomically**: into a temporary folder renamed into place; a killed preparation leaves nothing a later
  run trusts.

Without a cache folder (--no_data_cache) the store is built in a temporary folder removed when the process exits:
the same code and memory layout, nothing kept, and every process prepares for itself.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import numpy as np

from vlft.errors import Problem, VlftError
from vlft.utils import log

CONTENT_HASH_LIMIT = 256 * 1024**2  # data files up to this size are keyed by their bytes too, not only their stat
MIN_CHUNK = 64  # records per task handed to a preparing process
PROGRESS_EVERY_S = 5.0


def default_cache_dir() -> Path:
    """$VLFT_DATA_CACHE, else $VLFT_CACHE/prepared, else ~/.cache/vlft/prepared."""
    if os.environ.get("VLFT_DATA_CACHE"):
        return Path(os.environ["VLFT_DATA_CACHE"])
    root = os.environ.get("VLFT_CACHE") or str(Path.home() / ".cache" / "vlft")
    return Path(root) / "prepared"


def default_num_proc() -> int:
    """The CPUs this process may use, at most 32."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(32, cpus))


@dataclass
class Job:
    """What `data/prepare.py prepare_records` needs for a file: shared with forked processes, never pickled."""

    file: str
    records: list
    loaded: object  # data/convert.py Loaded
    record_format: object
    encoder: object
    processor: object
    media: object
    image_folder: str | None
    workers: int
    probe_image: object
    record_problems: dict[int, list[Problem]] = field(default_factory=dict)


_JOB: Job | None = None  # the job of the forked preparing processes


def _prepare_chunk(indices: list[int]):
    from vlft.data.prepare import prepare_records

    return prepare_records(_JOB, indices)


def _digest(value) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _plain(value):
    return asdict(value) if is_dataclass(value) else value


def processor_fingerprint(processor) -> dict:
    """What of the processor the prepared lengths depend on: chat template, the tokenizer's vocabulary, merges and
    special tokens (hashed), and the vision patch settings."""
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    image = getattr(processor, "image_processor", None)
    video = getattr(processor, "video_processor", None)

    def sizes(p):
        return None if p is None else {k: getattr(p, k, None) for k in ("patch_size", "merge_size", "temporal_patch_size")}

    return {"class": type(processor).__name__,
            "chat_template": getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
            "tokenizer": hashlib.blake2b(vocab.encode(), digest_size=16).hexdigest(),
            "added": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
            "image": sizes(image), "video": sizes(video)}


def data_fingerprint(path) -> dict:
    """The data file's identity: real path, size, mtime (ns) and inode, and its blake2b for files up to 256 MiB; a
    folder (save_to_disk) by each file's name, size and mtime."""
    path = Path(path)
    real = os.path.realpath(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"path": real, "files": [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                        for p in files]}
    st = path.stat()
    out = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    if st.st_size <= CONTENT_HASH_LIMIT:
        with open(path, "rb") as f:
            out["blake2b"] = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    return out


def _settings(record_format, processor, media, thinking, image_folder) -> dict:
    from vlft import __version__
    from vlft.data.store import FORMAT_VERSION

    return {"vlft": __version__, "store": FORMAT_VERSION, "format": record_format.cache_key,
            "processor": processor_fingerprint(processor), "media": _plain(media), "thinking": _plain(thinking),
            "image_folder": os.path.realpath(image_folder) if image_folder else None}


def prepared_store(data_path, record_format, *, processor, image_folder, media, thinking=None, workers: int = 4,
                   num_proc: int = 1, cache_dir=None):
    """The open store (data/store.py) of `data_path` for these inputs; see the module docstring.

    `num_proc`: processes for a preparation (1: this process only); `workers`: decoding threads in each;
    `cache_dir`: where indexes are kept (None: nothing kept). Raises what data/convert.py raises for a file that
    cannot be read, and VlftError for a video record when the processor has no video processor."""
    from vlft.data.once import build_once
    from vlft.data.store import Store

    file = str(data_path)
    if cache_dir is None or record_format.cache_key is None:
        folder = Path(tempfile.mkdtemp(prefix="vlft-prepared-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # this process' own: gone when it exits
        _build(folder, data_path, record_format, processor=processor, image_folder=image_folder, media=media,
               thinking=thinking, workers=workers, num_proc=num_proc, previous=None)
        return Store(folder)
    root = Path(cache_dir)
    settings = _settings(record_format, processor, media, thinking, image_folder)
    if not Path(image_folder or data_path).is_absolute():  # relative media paths resolve against the working folder
        settings["cwd"] = os.getcwd()
    key = _digest({"settings": settings, "data": data_fingerprint(data_path)})
    final = root / key
    pointer = root / "sources" / f"{_digest([settings, os.path.realpath(data_path)])}.json"
    started = time.perf_counter()

    def build(folder: Path, previous=None, into: Path = final) -> None:
        if previous is None:
            previous = _previous_store(pointer, root, key)
        _build(folder, data_path, record_format, processor=processor, image_folder=image_folder, media=media,
               thinking=thinking, workers=workers, num_proc=num_proc, previous=previous, settings=settings,
               cache_folder=into)

    if final.exists():
        built = False
    else:
        _check_writable(root)
        built = build_once(final, build, what=f"the prepared index of {file}")
        if built:
            _write_pointer(pointer, key)
    store = Store(final)
    # media files are checked on every call: one stat each
    current = store.current_media_stats()
    changed = np.nonzero((current != np.asarray(store.media_stat)).any(axis=1))[0] if len(current) else []
    if len(changed):
        generation = root / f"{key}.m{hashlib.blake2b(current.tobytes(), digest_size=8).hexdigest()}"
        if not generation.exists():
            redo = store.records_using(changed)
            log(f"data cache: {len(changed)} media file(s) of {file} changed since its index was built (e.g. "
                f"{store.media[int(changed[0])]}): preparing the {len(redo)} record(s) that read them again")
            _check_writable(root)
            built = build_once(generation, lambda folder: build(folder, previous=store, into=generation),
                               what=f"the prepared index of {file}")
        store = Store(generation)
    if not built:
        log(f"data cache: the prepared index of {file} ({store.n_records} records) loaded from {store.folder} in "
            f"{time.perf_counter() - started:.1f} s")
    return store


def _check_writable(root: Path) -> None:
    """VlftError naming the flags when the cache folder cannot be written (an index must be built there)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise VlftError(f"--data_cache_dir {root} cannot be written ({e.strerror or e}): pass --data_cache_dir "
                        "with a folder this job can write (shared by every node for one preparation per job), "
                        "or --no_data_cache true to prepare in every process and keep nothing") from None


def _previous_store(pointer: Path, root: Path, key: str):
    """The index last built for the same file and settings (an earlier version of the file), or None."""
    from vlft.data.store import Store

    try:
        previous = json.loads(pointer.read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None
    if previous == key or not (root / previous).is_dir():
        return None
    try:
        return Store(root / previous)
    except (OSError, ValueError):
        return None


def _write_pointer(pointer: Path, key: str) -> None:
    try:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key}))
        os.replace(tmp, pointer)
    except OSError:
        pass  # only an optimisation: the next edit of the file prepares every record


def _reusable(previous, records) -> dict[int, int]:
    """new record index -> the previous store's record index holding the same converted record, for the records
    whose media files did not change since."""
    from vlft.data.formats import BadLine
    from vlft.data.store import ABSENT, record_digest

    current = previous.current_media_stats()
    changed = np.nonzero((current != np.asarray(previous.media_stat)).any(axis=1))[0] if len(current) else []
    tainted = previous.records_using(changed)
    status = np.asarray(previous.status)
    by_digest = {}
    for j, digest in enumerate(np.asarray(previous.digests)):
        if status[j] != ABSENT and j not in tainted:
            by_digest.setdefault(digest.tobytes(), j)
    reuse = {}
    for i, record in enumerate(records):
        if record is None or isinstance(record, BadLine):
            continue
        j = by_digest.get(record_digest(record))
        if j is not None:
            reuse[i] = j
    return reuse


def _build(folder: Path, data_path, record_format, *, processor, image_folder, media, thinking, workers, num_proc,
           previous, settings=None, cache_folder=None) -> None:
    """Prepare every record of `data_path` (taking what `previous` already holds) and write the store into
    `folder`."""
    global _JOB
    from vlft.data.convert import load_llava_records
    from vlft.data.encoding import ChatEncoder
    from vlft.data.prepare import key_census, probe_image
    from vlft.data.store import write_store

    file = str(data_path)
    started = time.perf_counter()
    loaded = load_llava_records(data_path)  # any supported format, as LLaVA records (data/convert.py)
    records = loaded.records
    census = key_census(records, record_format)
    record_problems: dict[int, list[Problem]] = {}
    file_problems = []
    for p in loaded.problems:
        if p.index is None:
            file_problems.append(p)
        else:
            record_problems.setdefault(p.index, []).append(p)
    job = Job(file, records, loaded, record_format, ChatEncoder(processor, thinking), processor, media, image_folder,
              max(1, workers), probe_image, record_problems)
    reuse = _reusable(previous, records) if previous is not None else {}
    todo = [i for i in range(len(records)) if i not in reuse]
    procs = max(1, min(num_proc, math.ceil(len(todo) / MIN_CHUNK)))
    chunk = max(MIN_CHUNK, min(1000, math.ceil(len(todo) / (procs * 4)))) if todo else MIN_CHUNK
    chunks = [todo[k:k + chunk] for k in range(0, len(todo), chunk)]
    # one process per job prepares a cached index (data/once.py), whichever rank it is: its lines are printed by it,
    # not by rank 0's log; without a cache every process prepares, and rank 0 speaks for them
    say = _stderr if cache_folder is not None else log
    where = f" into {cache_folder}" if cache_folder is not None else ""
    kept = f", {len(reuse)} taken from the previous index" if reuse else ""
    say(f"data: preparing {len(todo)} record(s) of {file} in {procs} process(es){kept}{where}")
    progress = _Progress(file, len(todo), say)

    def computed():
        global _JOB
        if procs == 1:
            for part in chunks:
                results = _prepare_chunk_with(job, part)
                progress.update(len(part))
                yield from results
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked children: no Rust thread pool to inherit
        _JOB = job
        try:
            context = multiprocessing.get_context("fork")
            with context.Pool(procs) as pool:
                for results in pool.imap(_prepare_chunk, chunks):
                    progress.update(len(results))
                    yield from results
        finally:
            _JOB = None

    def reused():
        for i, j in reuse.items():
            yield previous.result(j, i)

    def everything():
        yield from reused()
        yield from computed()

    meta = {"file": file, "census": census, "settings": settings}
    write_store(folder, everything(), len(records), meta, file_problems)
    elapsed = time.perf_counter() - started
    rate = f" ({len(todo) / elapsed:,.0f} records/s)" if todo and elapsed > 0 else ""
    say(f"data: prepared {len(todo)} record(s) of {file} in {elapsed:.1f} s{rate}")


def _prepare_chunk_with(job: Job, indices: list[int]):
    from vlft.data.prepare import prepare_records

    return prepare_records(job, indices)


class _Progress:
    """A log line every few seconds while a preparation runs: records done, records/s, ETA."""

    def __init__(self, file: str, total: int, say=log):
        self.file, self.total, self.done, self.say = file, total, 0, say
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S or self.done >= self.total:
            return
        self.last = now
        rate = self.done / (now - self.start)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.say(f"data: {self.file}: {self.done:,} / {self.total:,} records prepared ({rate:,.0f}/s, "
            f"ETA {_duration(eta)})")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _stderr(message: str) -> None:
    print(f"[vlft] {message}", file=sys.stderr, flush=True)
