"""The prepared index of one data file, on disk: what data preparation (data/prepare.py) found for every record,
in arrays that every process and every DataLoader worker maps from the same files instead of holding Python
objects (forked workers would copy those page by page as reference counts change).

One store is a folder:

    meta.json        counts, the unused-keys line, the inputs it was built from (its cache key)
    payload.bin      one pickle per usable record: (sample, image paths, video sources, image specs, video specs,
                     rejected media), concatenated; `offsets.npy` (int64 [n_records, 2]) holds each one's byte range
    lengths.npy      int32 [n_records, k]: tokens of each sequence the stage builds (0 for unusable records)
    status.npy       uint8 [n_records]: OK, BAD (problems found) or ABSENT
    flags.npy        uint8 [n_records]: REASONED (the last answer carries reasoning), CUT (DPO: answers truncated),
                     DESIRABLE (KTO: the answer's label is true)
    digests.npy      uint8 [n_records, 16]: blake2b of the record as converted to LLaVA (reuse after an edit)
    media.pkl        the resolved media files of the records (a frame list counts each frame), in first-use order
    media_stat.npy   int64 [n_media, 3]: size, mtime_ns and inode of each when it was probed (-1: missing)
    media_rows.npy   int64 [n_media_refs], `media_offsets.npy` int64 [n_records + 1]: which files each record uses
    media_counts.npy int32 [n_records, 2]: media entries of each record, and those missing and written as relative
    problems.pkl     {record index: [Problem, ...]} for the records with problems (and file-level ones under -1)

A store is written into a temporary folder and renamed into place (data/once.py), so a killed preparation never
leaves a store a later run would trust. `Store.open` maps the arrays read-only (numpy memmap); `Store.record(i)`
unpickles one record. An open store costs a process about 100 bytes per record of mapped array pages (37 of them
private heap, measured at 20,000 records: bench/prepare_scale.py), and the payload pages it reads (about 2 kB per
record once every record was read), all file-backed and shared by every process on the machine through the page
cache: forked DataLoader workers copy nothing.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlft.errors import Problem

FORMAT_VERSION = 2  # bumped when the layout of a store or what a record's payload holds changes
OK, BAD, ABSENT = 1, 2, 0
REASONED, CUT, DESIRABLE = 1, 2, 4
MISSING_STAT = (-1, -1, -1)


@dataclass
class RecordResult:
    """What preparation found for one record: its payload (usable) or its problems, never both."""

    index: int
    payload: tuple | None = None  # (sample, image_paths, video_sources, image_specs, video_specs, rejected_media)
    blob: bytes | None = None  # the payload already pickled (by a preparing process: the writer only copies it)
    problems: list[Problem] = field(default_factory=list)
    lengths: tuple[int, ...] = ()
    flags: int = 0
    media: list[str] = field(default_factory=list)  # the resolved files it reads (frames one by one)
    stats: list[tuple[int, int, int]] = field(default_factory=list)  # stat of each, as probed
    digest: bytes = b""
    n_media: int = 0  # media entries (image/video slots) of the parsed record
    n_missing_relative: int = 0  # of which missing and written as relative paths


def file_stat(path: str) -> tuple[int, int, int]:
    """(size in bytes, mtime in ns, inode) of a file, or (-1, -1, -1) when it cannot be stat'ed. A frame folder
    counts by its own stat (its files are listed as media one by one by the caller)."""
    try:
        st = os.stat(path)
    except OSError:
        return MISSING_STAT
    return st.st_size, st.st_mtime_ns, st.st_ino


def record_digest(record: object) -> bytes:
    """16-byte blake2b of a converted record's canonical JSON (sorted keys): equal records, equal digests."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def media_files(source) -> list[str]:
    """The files a resolved media source reads: an image path or video file (itself), a frame list (each frame), a
    frame folder (the folder and each file in it, sorted)."""
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source]
    source = str(source)
    if os.path.isdir(source):
        try:
            return [source, *sorted(str(p) for p in Path(source).iterdir() if p.is_file())]
        except OSError:
            return [source]
    return [source]


def write_store(folder: Path, results: Iterable[RecordResult], n_records: int, meta: dict,
                file_problems: list[Problem] = ()) -> dict:
    """Write the store of `n_records` records into `folder` (an empty folder) from `results` (any order, each
    record at most once; records with no result are ABSENT). Returns the meta written (with counts added)."""
    folder = Path(folder)
    status = np.zeros(n_records, np.uint8)
    flags = np.zeros(n_records, np.uint8)
    digests = np.zeros((n_records, 16), np.uint8)
    starts: dict[int, tuple[int, int]] = {}
    all_lengths: dict[int, tuple[int, ...]] = {}
    media_index: dict[str, int] = {}
    media_stats: list[tuple[int, int, int]] = []
    record_media: dict[int, list[int]] = {}
    problems: dict[int, list[Problem]] = {}
    counts = np.zeros((n_records, 2), np.int32)
    if file_problems:
        problems[-1] = list(file_problems)
    n_media = n_missing = 0
    position = 0
    with open(folder / "payload.bin", "wb") as out:
        for r in results:
            if r.payload is not None or r.blob is not None:
                blob = r.blob if r.blob is not None else pickle.dumps(r.payload, protocol=pickle.HIGHEST_PROTOCOL)
                out.write(blob)
                starts[r.index] = (position, len(blob))
                position += len(blob)
                status[r.index] = OK
                all_lengths[r.index] = tuple(r.lengths)
            else:
                status[r.index] = BAD
            if r.problems:
                problems.setdefault(r.index, []).extend(r.problems)
            flags[r.index] = r.flags
            if r.digest:
                digests[r.index] = np.frombuffer(r.digest, np.uint8)
            ids = []
            for path, stat in zip(r.media, r.stats):
                if path not in media_index:
                    media_index[path] = len(media_stats)
                    media_stats.append(stat)
                ids.append(media_index[path])
            record_media[r.index] = ids
            counts[r.index] = (r.n_media, r.n_missing_relative)
            n_media += r.n_media
            n_missing += r.n_missing_relative
    # offsets: payload start of record i; a record without payload has an empty range
    ends = np.zeros(n_records, np.int64)
    begins = np.zeros(n_records, np.int64)
    for i, (start, size) in starts.items():
        begins[i], ends[i] = start, start + size
    offsets = np.stack([begins, ends], axis=1) if n_records else np.zeros((0, 2), np.int64)
    k = max((len(v) for v in all_lengths.values()), default=1)
    lengths = np.zeros((n_records, k), np.int32)
    for i, v in all_lengths.items():
        lengths[i, :len(v)] = v
    media_offsets = np.zeros(n_records + 1, np.int64)
    rows: list[int] = []
    for i in range(n_records):
        rows += record_media.get(i, [])
        media_offsets[i + 1] = len(rows)
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "lengths.npy", lengths)
    np.save(folder / "status.npy", status)
    np.save(folder / "flags.npy", flags)
    np.save(folder / "digests.npy", digests)
    np.save(folder / "media_stat.npy", np.array(media_stats, np.int64).reshape(-1, 3))
    np.save(folder / "media_rows.npy", np.array(rows, np.int64))
    np.save(folder / "media_offsets.npy", media_offsets)
    np.save(folder / "media_counts.npy", counts)
    with open(folder / "media.pkl", "wb") as f:
        pickle.dump(list(media_index), f, protocol=pickle.HIGHEST_PROTOCOL)
    with open(folder / "problems.pkl", "wb") as f:
        pickle.dump(problems, f, protocol=pickle.HIGHEST_PROTOCOL)
    meta = {**meta, "format_version": FORMAT_VERSION, "n_records": n_records, "usable": int((status == OK).sum()),
            "n_media_entries": n_media, "n_missing_relative": n_missing}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


class Store:
    """A store opened read-only (see the module docstring). Arrays are memory-mapped; nothing per record is
    held as a Python object until asked for."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.folder}: store format {self.meta.get('format_version')}, not {FORMAT_VERSION}")

        def arr(name):
            return np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)

        self.offsets, self.lengths, self.status, self.flags = arr("offsets"), arr("lengths"), arr("status"), arr("flags")
        self.digests = arr("digests")
        self.media_stat, self.media_rows, self.media_offsets = arr("media_stat"), arr("media_rows"), arr("media_offsets")
        self.media_counts = arr("media_counts")
        size = (self.folder / "payload.bin").stat().st_size
        self.payload = np.memmap(self.folder / "payload.bin", np.uint8, "r") if size else np.zeros(0, np.uint8)
        self._media: list[str] | None = None
        self._problems: dict[int, list[Problem]] | None = None
        self._last: tuple[int, tuple] | None = None

    @classmethod
    def open(cls, folder: Path) -> Store:
        return cls(folder)

    @property
    def n_records(self) -> int:
        return int(self.meta["n_records"])

    @property
    def media(self) -> list[str]:
        if self._media is None:
            with open(self.folder / "media.pkl", "rb") as f:
                self._media = pickle.load(f)
        return self._media

    @property
    def problems(self) -> dict[int, list[Problem]]:
        if self._problems is None:
            with open(self.folder / "problems.pkl", "rb") as f:
                self._problems = pickle.load(f)
        return self._problems

    def record(self, index: int) -> tuple:
        """The payload of usable record `index` (its position in the file)."""
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        start, end = self.offsets[index]
        if end <= start:
            raise KeyError(f"record {index} of {self.folder} has no payload")
        value = pickle.loads(self.payload[int(start):int(end)].tobytes())
        self._last = (index, value)
        return value

    def result(self, index: int, new_index: int | None = None) -> RecordResult:
        """Record `index` as the RecordResult it was written from, moved to `new_index` (its position in an edited
        file) when given: the sample's and the problems' record index follow."""
        import dataclasses

        new = index if new_index is None else new_index
        payload = self.record(index) if self.status[index] == OK else None
        if payload is not None and new != index:
            payload = (dataclasses.replace(payload[0], index=new), *payload[1:])
        problems = [p if new == index else dataclasses.replace(p, index=new) for p in self.problems.get(index, [])]
        ids = np.asarray(self.media_rows[self.media_offsets[index]:self.media_offsets[index + 1]])
        n_media, n_missing = (int(x) for x in self.media_counts[index])
        return RecordResult(new, payload=payload, problems=problems,
                            lengths=tuple(int(n) for n in self.lengths[index]) if payload else (),
                            flags=int(self.flags[index]), media=[self.media[i] for i in ids],
                            stats=[tuple(int(x) for x in self.media_stat[i]) for i in ids],
                            digest=bytes(self.digests[index]), n_media=n_media, n_missing_relative=n_missing)

    def current_media_stats(self) -> np.ndarray:
        """int64 [n_media, 3]: the stat of each media file now."""
        return np.array([file_stat(p) for p in self.media], np.int64).reshape(-1, 3)

    def records_using(self, media_ids: Iterable[int]) -> set[int]:
        """The record indices that read any of these media files."""
        wanted = np.zeros(len(self.media_stat), bool)
        wanted[list(media_ids)] = True
        if not wanted.any():
            return set()
        hits = np.nonzero(wanted[np.asarray(self.media_rows)])[0]
        offsets = np.asarray(self.media_offsets)
        return {int(np.searchsorted(offsets, h, side="right") - 1) for h in hits}

    def __getstate__(self):  # DataLoader workers started with spawn reopen the same files
        return {"folder": self.folder}

    def __setstate__(self, state):
        self.__init__(state["folder"])


class Column(Sequence):
    """One field of the usable records of one or more stores, as a read-only sequence: item `i` is field `slot` of
    the payload of record `rows[i]` of store `stores[which[i]]` (numpy arrays, so a million items cost 9 MB)."""

    def __init__(self, stores: list[Store], which: np.ndarray, rows: np.ndarray, slot: int):
        self.stores, self.which, self.rows, self.slot = stores, which, rows, slot

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.stores[int(self.which[i])].record(int(self.rows[i]))[self.slot]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None


class Picked(Sequence):
    """Items `picked` of several sequences, concatenated (a mixture's selection): no item is copied."""

    def __init__(self, parts: list[tuple[Sequence, Sequence[int]]]):
        self.parts = [(seq, np.asarray(picked, np.int64)) for seq, picked in parts]
        self.starts = []
        total = 0
        for _, picked in self.parts:
            self.starts.append(total)
            total += len(picked)
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += self.total
        if not 0 <= i < self.total:
            raise IndexError(i)
        part = bisect.bisect_right(self.starts, i) - 1
        seq, picked = self.parts[part]
        return seq[int(picked[i - self.starts[part]])]

    def __iter__(self):
        for i in range(self.total):
            yield self[i]

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None
