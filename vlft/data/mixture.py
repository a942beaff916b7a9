"""Several data files in one run, each with an optional record count or fraction.

    --data_path a.json b.jsonl#1000 c.parquet#0.5        (or one string: "a.json,b.jsonl#1000 c.parquet#0.5")

The syntax is ms-swift's (its `dataset` argument takes `a b#1000`: a record count per dataset) with LLaMA-Factory's
comma-separated `dataset: a,b`; `#p` with 0 < p < 1 (a fraction of the file) is vlft's. One string holding several files, split at
commas and spaces, is what a finetune script's DATA="a.json b.json#100" passes. A name that exists on disk is taken
whole: a `#`, comma or space that is part of a real file name is never read as a separator.

Each file goes through data/prepare.py's `prepare_data` on its own (its own error report naming that file, its own
--skip_bad_samples and --max_bad_fraction counts); when several fail, every failure is reported, one after the
other. Then each file's usable records are selected (`select_records`) and the selections are concatenated in the
order given. The log gets one line per file (usable records, selected records) and one for the mix (records per
file and share). A single file without a suffix is prepared exactly as before, with no mix line.
"""
from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vlft.data.prepare import PreparedData, RecordFormat, prepare_data
from vlft.data.store import Picked
from vlft.errors import DataError, VlftError
from vlft.utils import log

FLAG = "--data_path"
_SEPARATORS = re.compile(r"[,\s]+")
_COUNT = re.compile(r"^\d+$")


@dataclass(frozen=True)
class DataSource:
    """One file of --data_path: `path` (a file or a save_to_disk folder), and what to take of its usable records:
    `count` records, or the `fraction` 0 < p < 1 of them, or (both None) every one."""

    path: str
    count: int | None = None
    fraction: float | None = None
    written: str = ""  # as the user wrote it (path and suffix)

    @property
    def selects(self) -> bool:
        return self.count is not None or self.fraction is not None

    def wanted(self, usable: int) -> int:
        """How many records this source contributes when its file has `usable` usable records: `count`, or
        round(`fraction` x usable) (halves up) and at least 1, or `usable`."""
        if self.count is not None:
            return self.count
        if self.fraction is not None:
            return max(1, math.floor(self.fraction * usable + 0.5))
        return usable


def _pieces(value) -> list[tuple[str, str]]:
    """(piece, the element it was read from) of a --data_path value: a list of strings (argparse's nargs="+") or one
    string; an element that names nothing on disk is split at commas and whitespace."""
    if value is None:
        return []
    elements = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    out = []
    for element in map(str, elements):
        if os.path.exists(element):
            out.append((element, element))
        else:
            out += [(piece, element) for piece in _SEPARATORS.split(element.strip()) if piece]
    return out


def split_selection(piece: str) -> tuple[str, str | None]:
    """(path, suffix) of one --data_path entry: `a.json#1000` -> ("a.json", "1000"); a name that exists on disk,
    or has no `#`, -> (name, None). No checks (see `parse_data_paths`)."""
    if os.path.exists(piece) or "#" not in piece:
        return piece, None
    path, suffix = piece.rsplit("#", 1)
    return path, suffix


def data_specs(value) -> list[tuple[str, str | None]]:
    """(path, suffix or None) of every entry of a --data_path value (list or string), without checks: what the
    resume identity, the DPO reference cache and the run card read."""
    return [split_selection(piece) for piece, _ in _pieces(value)]


def data_files(value) -> list[str]:
    """The file paths a --data_path value names, suffixes left out, in order."""
    return [path for path, _ in data_specs(value)]


def _suffix_value(suffix: str, piece: str, flag: str) -> tuple[int | None, float | None]:
    if _COUNT.match(suffix):
        count = int(suffix)
        if count == 0:
            raise VlftError(f"{flag} {piece}: #0 selects no record; give a count of at least 1, or leave the file out")
        return count, None
    try:
        fraction = float(suffix)
    except ValueError:
        fraction = None
    if fraction is None or not math.isfinite(fraction):
        raise VlftError(f"{flag} {piece}: no file {piece} exists, and #{suffix} is neither a record count (#1000) nor "
                        "a fraction of the file (#0.5)")
    if not 0 < fraction < 1:
        raise VlftError(f"{flag} {piece}: #{suffix} is no fraction between 0 and 1 and no whole count; write #N (an "
                        "integer) for N records, #p with 0 < p < 1 for that share of the file, nothing for all of it")
    return None, fraction


def parse_data_paths(value, *, flag: str = FLAG) -> list[DataSource]:
    """The files of a --data_path value, in order: a list of entries (`--data_path a.json b.json#100`) or one
    string (entries separated by commas or whitespace, LLaMA-Factory's `a,b`). Each entry is a path with an optional
    `#N` (N >= 1 records of the file: ms-swift's `dataset#N`) or `#p` (0 < p < 1: that fraction of its usable
    records); a name that exists on disk is a path even when it holds `#`, a comma or a space.

    Raises VlftError naming the entry for a suffix that is no count or fraction, for no entry at all, and for every
    file that is not found (all of them in one message)."""
    sources, missing = [], []
    for piece, element in _pieces(value):
        path, suffix = split_selection(piece)
        count, fraction = (None, None) if suffix is None else _suffix_value(suffix, piece, flag)
        if not os.path.exists(path):
            split = f" (read from {element!r}, split at commas and spaces)" if piece != element else ""
            missing.append(f"{path}{split}")
        sources.append(DataSource(path, count, fraction, piece))
    if len(missing) == 1:
        raise VlftError(f"{flag} {missing[0]}: file not found")
    if missing:
        raise VlftError(f"{flag}: {len(missing)} files not found: {', '.join(missing)}")
    if not sources:
        raise VlftError(f"{flag} names no file; give one or more data files (a.json b.jsonl#1000 c.parquet#0.5)")
    return sources


def single_data_path(value, *, command: str, why: str, flag: str = FLAG) -> str:
    """The one file of a --data_path value for a command that reads one file whole (`why`: the reason, for the
    message); VlftError for several files or a `#` selection, and for a missing file."""
    sources = parse_data_paths(value, flag=flag)
    if len(sources) > 1:
        raise VlftError(f"{command} takes one file in {flag} ({why}); got {len(sources)}: "
                        f"{', '.join(s.written for s in sources)}. Run it once per file")
    if sources[0].selects:
        raise VlftError(f"{command} takes the whole file ({why}): drop the #{sources[0].written.rsplit('#', 1)[1]} "
                        f"of {flag} {sources[0].written}")
    return sources[0].path


def select_records(usable: int, source: DataSource, rng: random.Random) -> list[int]:
    """Indices (into a file's usable records) of the records `source` takes: every one without a suffix; with
    `source.wanted(usable)` = N records, ms-swift's rule (swift/llm/dataset/utils.py `sample_dataset`): the file
    whole N // usable times, then N % usable records drawn without replacement from `rng`. Drawn records keep their
    file order (the trainer shuffles every epoch anyway)."""
    if not source.selects:
        return list(range(usable))
    whole, rest = divmod(source.wanted(usable), usable)
    return list(range(usable)) * whole + sorted(rng.sample(range(usable), rest))


def source_rng(seed: int, position: int) -> random.Random:
    """The generator of the `position`-th --data_path entry under --seed `seed`: each file its own stream, so that
    a file's draw does not change when another file's count does. (A str seed is hashed with sha512: the same draw on
    every platform and Python version.)"""
    return random.Random(f"vlft-data-mix:{seed}:{position}")


@dataclass(frozen=True)
class MixPart:
    """One file's share of a mix."""

    source: DataSource
    records: int  # records in the file
    usable: int  # records that passed the start-up check
    selected: int  # records taken into the mix (repeats counted)


# PreparedData's fields parallel to `samples`: what the selection takes record by record (tests/data/test_mixture.py
# checks that every list field of PreparedData is either here or a list of problems)
PARALLEL_FIELDS = ("samples", "image_paths", "sequence_lengths", "video_sources", "image_specs", "video_specs",
                   "rejected_media", "flags")
PROBLEM_FIELDS = ("skipped", "overlong")


@dataclass
class MixedData(PreparedData):
    """The selected records of several files (or of one file with a `#` selection), concatenated in --data_path
    order; `n_records`, `skipped` and `overlong` cover every file."""

    parts: list[MixPart] = field(default_factory=list)
    usable: int = 0  # usable records of the files (a file given twice counted once), before the selection
    # (position in --data_path, record index in that file) of each sample: a record's identity across files
    origins: list[tuple[int, int]] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{len(self.samples)} records selected from {len(self.parts)} file(s) ({self.usable} of {self.n_records} "
                "records usable")
        if self.skipped:
            text += f"; {len(self.skipped)} problem(s) skipped"
        if self.overlong:
            text += f"; {len(self.overlong)} over {self.length_flag} dropped"
        text += ")"
        if self.sequence_lengths:
            s = sorted(self.lengths)
            text += f"; tokens per record min {s[0]} / median {s[len(s) // 2]} / max {s[-1]}"
        return text


def record_keys(data: PreparedData) -> list:
    """A key per training item that names its record across files, in training order: [position in --data_path,
    file name, record index] for MixedData (so that files given in another order give other keys), the record index
    for the data of one file."""
    if not isinstance(data, MixedData):  # PreparedData knows them without reading its samples
        indices = getattr(data, "record_indices", None)
        return indices if indices is not None else [s.index for s in data.samples]
    return [[position, os.path.basename(data.parts[position].source.path), index] for position, index in data.origins]


def _selection_note(source: DataSource, usable: int, picked: int, seed: int) -> str:
    if not source.selects:
        return "all selected"
    what = f"#{source.count}" if source.count is not None else f"#{source.fraction:g} of {usable}"
    whole, rest = divmod(picked, usable)
    if whole == 0:
        return f"{picked} selected ({what}, drawn with --seed {seed})"
    drawn = f" + {rest} drawn with --seed {seed}" if rest else ""
    return f"{picked} selected ({what}: the file whole {'once' if whole == 1 else f'{whole} times'}{drawn})"


def mix_line(parts: Sequence[MixPart]) -> str:
    """`data mix: N records: a.json 100 (9.1%), b.jsonl 1000 (90.9%)`."""
    total = sum(p.selected for p in parts)
    shares = ", ".join(f"{p.source.path} {p.selected} ({p.selected / total:.1%})" for p in parts)
    return f"data mix: {total} records: {shares}"


class MixtureError(DataError):
    """Several --data_path files cannot be used: each file's own error, one after the other."""

    def __init__(self, errors: list[tuple[DataSource, VlftError]], n_files: int, flag: str = FLAG):
        self.problems = [p for _, err in errors for p in getattr(err, "problems", [])]
        parts = [f"{len(errors)} of the {n_files} {flag} files cannot be used; each is reported on its own:"]
        parts += [f"[{source.written}]\n{err}" for source, err in errors]
        VlftError.__init__(self, "\n\n".join(parts))


def prepare_mixture(data_path, record_format: RecordFormat, *, seed: int, flag: str = FLAG,
                    prepare: Callable[..., PreparedData] = prepare_data, **kwargs) -> PreparedData:
    """`prepare(path, record_format, **kwargs)` (data/prepare.py `prepare_data`) for each file of `data_path` (see
    `parse_data_paths`), then each file's selection (`select_records`, drawn with `seed`: --seed) concatenated in
    order. Returns the file's PreparedData unchanged for one file without a suffix; otherwise MixedData, after
    logging one line per file and the mix line.

    Raises VlftError for a bad --data_path value; each file's DataError / VlftError as it is when one file fails,
    MixtureError listing each failing file's report when several do. A file given twice is prepared once."""
    sources = parse_data_paths(data_path, flag=flag)
    if len(sources) == 1 and not sources[0].selects:
        return prepare(sources[0].path, record_format, **kwargs)
    prepared: dict[str, PreparedData] = {}
    errors: list[tuple[DataSource, VlftError]] = []
    for source in sources:
        key = os.path.realpath(source.path)
        if key in prepared:
            continue
        try:
            prepared[key] = prepare(source.path, record_format, **kwargs)
        except VlftError as err:
            errors.append((source, err))
    if len(errors) == 1:
        raise errors[0][1]
    if errors:
        raise MixtureError(errors, len(sources), flag)

    first = prepared[os.path.realpath(sources[0].path)]
    out = MixedData([], [], [], 0, length_flag=first.length_flag)
    seen: set[str] = set()
    parts: dict[str, list] = {name: [] for name in PARALLEL_FIELDS}
    for position, source in enumerate(sources):
        key = os.path.realpath(source.path)
        data = prepared[key]
        usable = len(data.samples)
        picked = select_records(usable, source, source_rng(seed, position))
        log(f"data {source.written}: {data.summary()}; {_selection_note(source, usable, len(picked), seed)}")
        for name in PARALLEL_FIELDS:  # views, not copies: a store-backed file stays on disk (data/store.py)
            parts[name].append((getattr(data, name), picked))
        indices = data.record_indices
        out.origins.extend((position, indices[i]) for i in picked)
        if key not in seen:  # a file given twice counts its records and problems once
            seen.add(key)
            out.n_records += data.n_records
            out.usable += usable
            out.skipped += data.skipped
            out.overlong += data.overlong
        out.parts.append(MixPart(source, data.n_records, usable, len(picked)))
    flagged = all(len(values) == len(data.samples) for (values, _), data in
                  zip(parts["flags"], (prepared[os.path.realpath(s.path)] for s in sources)))
    for name, pieces in parts.items():
        if name != "flags" or flagged:  # data built by hand carries no flags
            setattr(out, name, Picked(pieces))
    if len(sources) > 1:
        log(mix_line(out.parts))
    return out
