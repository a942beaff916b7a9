"""Data preparation, the same for every stage: every record is parsed, every image and video decoded and
every sequence tokenised before the model is loaded, so a bad sample stops the run in seconds, not hours in.

A stage brings only a `RecordFormat`: a pure parser (record -> sample with messages and media paths, or the
problems found; no I/O) and the encoding whose lengths must fit `--max_seq_length` (SFT: the conversation;
preference pairs: prompt + each answer; prompts: the generation prompt). Everything else is shared here: path
resolution, media probing and decoding (each file once, in threads), tokenisation with the model's template
(data/encoding.py), the skip / drop policy and one error report naming file, record, id and field. The records'
top-level keys that the stage does not read are listed once (`key_census`), so a misspelt field is seen, not
dropped. A JSONL line that is not valid JSON is a bad record like the others (data/formats.py `BadLine`):
listed with them, skipped by --skip_bad_samples. What --skip_bad_samples may leave out is capped by
--max_bad_fraction (`max_bad_fraction`): a run that would lose most of its records stops instead.

    prepared = prepare_data("train.json", CONVERSATION, processor=processor, image_folder="images/",
                            media=media, max_seq_length=8192)
    prepared.samples[i], prepared.image_paths[i], prepared.video_sources[i], prepared.sequence_lengths[i]
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from vlft.data.encoding import ChatEncoder, EncodingError, VisionSpec
from vlft.data.formats import BadLine
from vlft.data.llava import LLAVA_KEYS, SYSTEM_KEY, Sample, parse_record
from vlft.data.media import MediaError, image_grid, probe_image_size, resolve_media_path
from vlft.data.preference import ANSWER_KEYS, PREFERENCE_KEYS, PreferenceSample, parse_preference_record
from vlft.data.reasoning import Thinking, message_reasoning
from vlft.data.video import check_video
from vlft.errors import DataError, Problem, VlftError
from vlft.utils import log


@dataclass(frozen=True)
class MediaSettings:
    """Pixel budgets (pixels per image / per video frame / per video) and frame sampling, shared by data
    preparation and the datasets so both agree."""

    image_min_pixels: int
    image_max_pixels: int
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    video_max_total_pixels: int | None = None
    fps: float | None = None
    nframes: int | None = None
    video_min_frames: int = 4
    video_max_frames: int = 768
    frames_fps: float = 2.0  # rate assumed for a video given as frame images

    def video_kwargs(self, encoder: ChatEncoder) -> dict:
        return dict(fps=self.fps, nframes=self.nframes, min_frames=self.video_min_frames,
                    max_frames=self.video_max_frames, min_pixels=self.video_min_pixels, max_pixels=self.video_max_pixels,
                    total_pixels=self.video_max_total_pixels, factor=encoder.video_patch_size * encoder.merge_size,
                    temporal_patch_size=encoder.temporal_patch_size, frames_fps=self.frames_fps)


# (record, index, file) -> (sample or None, problems); the sample has .index, .id, .images, .videos
RecordParser = Callable[[object, int, str], tuple[object | None, list[Problem]]]
# (encoder, sample, image specs, video specs) -> token count of each sequence the stage builds from the record; a
# sample with other media for its rejected sequence (image-side preference pairs) also gets `rejected=(image specs,
# video specs)` of that sequence
SequenceLengths = Callable[..., tuple[int, ...]]


@dataclass(frozen=True)
class RecordFormat:
    """What one stage's records look like: its pure parser and the sequences it encodes from a record."""

    name: str
    parse: RecordParser
    sequence_lengths: SequenceLengths
    # the top-level record keys the stage reads (None: those PARSER_KEYS gives for `parse`); prepare_data lists
    # every other key once as unused
    keys: frozenset[str] | None = None
    columns: bool = False  # the other keys are passed on (GRPO's reward columns), listed as such, not as unused
    # what the cache of prepared indexes (data/index.py) knows this format by: its parser and lengths, with any
    # setting they read; None: never cached (prepared again on each call)
    cache_key: str | None = None
    # `sequence_lengths` of many records at once, [(sample, image specs, video specs)] -> [lengths or EncodingError]
    # (one batch tokenisation); only for formats whose lengths take no rejected media
    batch_lengths: Callable[..., list] | None = None

    @property
    def used_keys(self) -> frozenset[str] | None:
        return self.keys if self.keys is not None else PARSER_KEYS.get(self.parse)


# the keys of a parser whose RecordFormat is built elsewhere without `keys` (data/dpo.py PreferenceFormat)
PARSER_KEYS = {parse_preference_record: PREFERENCE_KEYS}


def key_census(records: Iterable, record_format: RecordFormat, limit: int = 12) -> str | None:
    """One line naming the top-level keys of `records` that `record_format` does not read, each with the number of
    records that carry it (keys with a null value do not count: a parquet column is null where a row lacks it), or
    None when there are none (or the format does not say which keys it reads). One pass over the records. With
    `record_format.columns` (GRPO) those keys are the reward columns and named so; otherwise they are "unused keys
    (ignored)", each with the closest key the stage reads when one is close (a misspelling)."""
    used = record_format.used_keys
    if used is None:
        return None
    counts = Counter(key for record in records if isinstance(record, dict)
                     for key, value in record.items() if value is not None and key not in used)
    if not counts:
        return None
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    names = []
    for key, n in ranked[:limit]:
        close = [] if record_format.columns else difflib.get_close_matches(str(key), sorted(used), n=1, cutoff=0.75)
        names.append(f"{key!r} in {n} record{'' if n == 1 else 's'}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if len(ranked) > limit:
        names.append(f"{len(ranked) - limit} more")
    what = "reward columns (passed to the reward functions)" if record_format.columns else "unused keys (ignored)"
    return f"{what}: {', '.join(names)}"


def _conversation_lengths(encoder: ChatEncoder, sample: Sample, images, videos) -> tuple[int, ...]:
    return (len(encoder.encode_conversation(sample.messages, images, videos).input_ids),)


def _conversation_batch(encoder: ChatEncoder, items) -> list:
    """`_conversation_lengths` of many (sample, image specs, video specs) at once (ChatEncoder.lengths: one batch
    tokenisation); an EncodingError in place of a record's lengths."""
    found = encoder.lengths([(sample.messages, images, videos) for sample, images, videos in items])
    return [n if isinstance(n, EncodingError) else (n,) for n in found]


def _preference_lengths(encoder: ChatEncoder, sample: PreferenceSample, images, videos, rejected=None) -> tuple[int, ...]:
    return tuple(p + c for p, c in preference_parts(encoder, sample, images, videos, rejected))


def preference_parts(encoder: ChatEncoder, sample: PreferenceSample, images, videos,
                     rejected=None) -> list[tuple[int, int]]:
    """(prompt tokens, answer tokens) of the chosen and the rejected sequence; `rejected` = (image specs, video
    specs) of the rejected sequence when its media differ from the prompt's (its prompt then has its own length)."""
    if rejected is None:
        pair = encoder.encode_preference(sample.messages, sample.completions, images, videos)
        return [(len(pair.prompt_ids), len(ids)) for ids in pair.completion_ids]
    parts = []
    for answer, (side_images, side_videos) in zip(sample.completions, ((images, videos), rejected)):
        pair = encoder.encode_preference(sample.messages, (answer,), side_images, side_videos)
        parts.append((len(pair.prompt_ids), len(pair.completion_ids[0])))
    return parts


def _parse_conversation_or_prompt(record: object, index: int, file: str):
    """Prediction: a LLaVA conversation whose last turn may be human, or the flat `prompt` string of 2U1's layout
    (the form of the DPO and GRPO examples)."""
    if isinstance(record, dict) and "conversations" not in record and isinstance(record.get("prompt"), str):
        record = {**record, "conversations": [{"from": "human", "value": record["prompt"]}]}
    return parse_record(record, index, file, require_answer=False)


# SFT: LLaVA conversations ending with a gpt turn. Prediction: the last turn may be human (no reference).
CONVERSATION = RecordFormat("conversation", partial(parse_record, require_answer=True), _conversation_lengths,
                            keys=LLAVA_KEYS, cache_key="conversation", batch_lengths=_conversation_batch)
CONVERSATION_OR_PROMPT = RecordFormat("conversation or prompt", _parse_conversation_or_prompt, _conversation_lengths,
                                      keys=LLAVA_KEYS | {"prompt"}, cache_key="conversation-or-prompt",
                                      batch_lengths=_conversation_batch)
# DPO: a prompt with a chosen and a rejected answer (data/preference.py); one sequence per answer
PREFERENCE = RecordFormat("preference", parse_preference_record, _preference_lengths, keys=PREFERENCE_KEYS,
                          cache_key="preference")


class LengthRows(Sequence):
    """Rows `rows` of a store's int32 [n_records, k] token counts, as tuples (`PreparedData.sequence_lengths`)."""

    def __init__(self, lengths, rows):
        import numpy as np

        self.array = np.asarray(lengths)[np.asarray(rows, dtype=np.int64)] if len(rows) else np.zeros((0, 1), np.int32)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return tuple(int(n) for n in self.array[i])

    def longest(self) -> list[int]:
        return self.array.max(axis=1).tolist() if len(self.array) else []


@dataclass
class PreparedData:
    """The usable records of one file, in file order, with their media resolved and measured. From data
    preparation the per-record fields are read-only sequences over a memory-mapped store (data/store.py Column):
    len, [i] and iteration, no Python object per record held; built by hand they may be lists."""

    samples: Sequence  # the stage parser's samples (Sample for conversations)
    image_paths: Sequence[list[str]]  # resolved, parallel to samples
    sequence_lengths: Sequence[tuple[int, ...]]  # tokens of each encoded sequence of a record, vision tokens included
    n_records: int
    skipped: list[Problem] = field(default_factory=list)  # invalid records left out (--skip_bad_samples)
    overlong: list[Problem] = field(default_factory=list)  # records longer than max_seq_length, left out
    length_flag: str = "--max_seq_length"  # the flag that set the length limit, as messages name it
    video_sources: Sequence[list] = field(default_factory=list)  # resolved videos, parallel to samples
    image_specs: Sequence[list[VisionSpec]] = field(default_factory=list)  # grid of each image, parallel to samples
    video_specs: Sequence[list[VisionSpec]] = field(default_factory=list)  # grid and timing of each video
    # image-side preference pairs: the rejected sequence's resolved (images, videos), else None; parallel to samples
    rejected_media: Sequence[tuple[list, list] | None] = field(default_factory=list)
    # data/store.py REASONED / CUT / DESIRABLE bits of each record, parallel to samples (empty when built by hand)
    flags: Sequence[int] = field(default_factory=list)
    # each sample's record index in its file (None: read from samples[i].index)
    indices: Sequence[int] | None = None

    @classmethod
    def from_store(cls, store, rows, *, length_flag: str = "--max_seq_length") -> PreparedData:
        """The records `rows` (record indices, ascending) of an open store (data/store.py)."""
        import numpy as np

        from vlft.data.store import Column

        rows = np.asarray(rows, dtype=np.int64)
        which = np.zeros(len(rows), np.int8)
        column = partial(Column, [store], which, rows)
        return cls(column(0), column(1), LengthRows(store.lengths, rows), store.n_records, length_flag=length_flag,
                   video_sources=column(2), image_specs=column(3), video_specs=column(4), rejected_media=column(5),
                   flags=np.asarray(store.flags)[rows] if len(rows) else np.zeros(0, np.uint8), indices=rows)

    @property
    def record_indices(self) -> list[int]:
        """Each sample's record index in its file, without unpickling the samples when the store knows them."""
        if self.indices is not None:
            return [int(i) for i in self.indices]
        return [s.index for s in self.samples]

    def flagged(self, bit: int) -> list[int]:
        """The record indices of the samples with a data/store.py flag bit set (CUT: DPO pairs whose answers
        truncation cuts), in sample order."""
        return [i for i, f in zip(self.record_indices, self.flags) if int(f) & bit]

    def count_flag(self, bit: int) -> int | None:
        """How many samples have a data/store.py flag bit set; None when the data carries no flags."""
        if len(self.flags) != len(self.samples):
            return None
        return sum(1 for f in self.flags if int(f) & bit)

    @property
    def lengths(self) -> list[int]:
        """The longest sequence of each record: what batching, packing and length grouping plan with."""
        if isinstance(self.sequence_lengths, LengthRows):
            return self.sequence_lengths.longest()
        return [max(n) for n in self.sequence_lengths]

    def summary(self) -> str:
        text = f"{len(self.samples)} of {self.n_records} records usable"
        if self.skipped:
            text += f"; {len(self.skipped)} problem(s) skipped"
        if self.overlong:
            text += f"; {len(self.overlong)} over {self.length_flag} dropped"
        if len(self.sequence_lengths):
            s = sorted(self.lengths)
            text += f"; tokens per record min {s[0]} / median {s[len(s) // 2]} / max {s[-1]}"
        return text


def probe_image(path: str, encoder: ChatEncoder, media: MediaSettings) -> VisionSpec | MediaError:
    """Check that the image decodes (data/media.py `probe_image_size`: a baseline JPEG by its marker structure, no
    decode; any other file decoded, JPEG at 1/8 scale) and return the grid it will have."""
    try:
        height, width = probe_image_size(path)
        return VisionSpec(image_grid(height, width, patch_size=encoder.patch_size, merge_size=encoder.merge_size,
                                     min_pixels=media.image_min_pixels, max_pixels=media.image_max_pixels))
    except MediaError as err:
        return err


def probe_video(source, encoder: ChatEncoder, media: MediaSettings) -> VisionSpec | MediaError:
    """Decode the frames that will be sampled and return the grid and timing the video will have."""
    try:
        info = check_video(list(source) if isinstance(source, tuple) else source, **media.video_kwargs(encoder))
    except MediaError as err:
        return err
    patch = encoder.video_patch_size
    grid = (info.nframes // encoder.temporal_patch_size, info.height // patch, info.width // patch)
    return VisionSpec(grid, info.indices, info.source_fps, info.fps)


def _resolve_video(source, image_folder: str | None, file: str):
    """A video file or frame folder (str), or a list of frame images (kept as a tuple, so it can be a key)."""
    if isinstance(source, list):
        return tuple(str(resolve_media_path(f, image_folder, file)) for f in source)
    return str(resolve_media_path(source, image_folder, file))


def _missing(source) -> bool:
    paths = source if isinstance(source, tuple) else (source,)
    return not all(Path(p).exists() for p in paths)


def _relative(raw) -> bool:
    """Whether a media entry as written in the record (a path, or a list of frame paths) has a relative path,
    the only kind --image_folder changes."""
    return any(not Path(p).is_absolute() for p in (raw if isinstance(raw, list) else [raw]))


def _encoding_field(error: EncodingError, sample) -> str:
    """The record field an EncodingError is about, as the LLaVA layout names it (`loaded.source` maps it to the
    user's own format); a message index counts the system message of a `system` key (`sample.turn_offset`)."""
    if error.completion is not None:  # the record field of that completion: the sample's own names, else DPO's
        keys = getattr(sample, "answer_keys", ANSWER_KEYS)
        return keys[error.completion] if error.completion < len(keys) else "conversations"
    if error.turn is None:
        return "conversations"
    turn = error.turn - getattr(sample, "turn_offset", 0)
    return SYSTEM_KEY if turn < 0 else f"conversations[{turn}].value"


def length_flag_of(data_args) -> str:
    """The flag the user set the length limit with, for messages: TRL's --max_length when it was given, else
    --max_seq_length (DataArguments copies --max_length into max_seq_length)."""
    return "--max_length" if getattr(data_args, "max_length", None) is not None else "--max_seq_length"


def _missing_hint(kind: str, raw, image_folder: str | None, file: str) -> str:
    if not _relative(raw):
        return "fix the path in the record (it is absolute: --image_folder does not change it)"
    if image_folder:
        return (f"fix the path in the record (relative {kind} paths resolve against --image_folder {image_folder}), "
                "or pass the --image_folder that holds it")
    return (f"fix the path in the record, or pass --image_folder: without it relative {kind} paths resolve against the "
            f"data file's folder, {Path(file).parent}")


def _not_found_header(n: int, image_folder: str | None, file: str) -> str:
    """The first line when none of the media files was found and all were written as relative paths."""
    if image_folder:
        return f"none of the {n} media files was found under --image_folder {image_folder}: is it the right folder?"
    return (f"none of the {n} media files was found under {Path(file).parent}, the data file's folder, which relative "
            "paths resolve against when --image_folder is not given: pass --image_folder")


def _advice(*, invalid: bool, overlong: bool, skip_bad_samples: bool, reject_overlong: bool, length_flag: str) -> str:
    """The closing lines of a data error, from the run's own flags: each kind of listed record gets the way out
    that applies to it, and no flag is suggested that is already set."""
    lines = []
    if invalid:
        lines.append("Fix the invalid records above" + ("." if skip_bad_samples else
                     ", or pass --skip_bad_samples true to go on without them (they are counted and listed)."))
    if overlong and reject_overlong:
        lines.append(f"The over-long records stop the run because --reject_overlong is set: raise {length_flag} (or "
                     "lower the pixel budgets or frame counts), or drop --reject_overlong to leave them out (counted "
                     "and listed)" + (". --skip_bad_samples does not skip them." if skip_bad_samples else "."))
    return "\n".join(lines)


def _check_bad_fraction(problems: list[Problem], n_records: int, kept: int, limit: float, file: str,
                        note: str) -> None:
    """DataError when the records `problems` leave out (each record counted once) are more than `limit` of
    `n_records`: a run that would lose that much of its data stops, listing why, with the --max_bad_fraction that
    would let it go on (`kept`: the records it would train on)."""
    bad = len({p.index for p in problems if p.index is not None})
    if bad <= limit * n_records:
        return
    needed = math.ceil(bad / n_records * 100) / 100  # the smallest two-decimal value that lets this run go on
    header = (f"--skip_bad_samples would leave out {bad} of the {n_records} records of {file} ({bad / n_records:.0%}), "
              f"more than --max_bad_fraction {limit:g} allows; stopped rather than train on {kept} record(s):")
    advice = ("Fix the records above (most records failing at once often means a wrong --data_path, --image_folder or "
              f"stage), or pass --max_bad_fraction {needed:g} (1 turns the limit off) to train on the {kept} usable "
              "record(s).")
    raise DataError(problems, header=(note + "\n" + header) if note else header, advice=advice)


def prepare_data(data_path: str, record_format: RecordFormat, *, processor, image_folder: str | None,
                 media: MediaSettings, max_seq_length: int, reject_overlong: bool = False,
                 skip_bad_samples: bool = False, workers: int = 4,
                 length_flag: str = "--max_seq_length", thinking: Thinking | None = None,
                 max_bad_fraction: float | None = None, num_proc: int = 1,
                 cache_dir: str | Path | None = None) -> PreparedData:
    """Parse, resolve, probe and measure every record of `data_path` (JSON list or JSONL in LLaVA or another
    chat format, parquet, arrow or a save_to_disk folder: data/convert.py turns each record into LLaVA first).

    Raises DataError listing every problem (file, record index, id, field, what to do) unless
    `skip_bad_samples`; records with a sequence over `max_seq_length` tokens are dropped and counted, or
    raise DataError under `reject_overlong` (one error lists both kinds); VlftError when no record is left.
    `length_flag` is the flag that set `max_seq_length`, as messages name it (GRPO: --max_prompt_length; TRL's
    --max_length when given: `length_flag_of`). What the error tells the user to do follows the flags passed.

    `max_bad_fraction` (--max_bad_fraction; None: no limit): under `skip_bad_samples`, DataError when the invalid
    records left out are more than this fraction of the file's records, saying how many of how many and how to go
    on. Over-long records dropped by the length limit do not count: they are valid, and listed as dropped.

    The work is done once per job and kept (data/index.py `prepared_store`): `num_proc` processes (--dataset_num_proc)
    prepare the records, `workers` threads each decode media; with `cache_dir` (--data_cache_dir) the result is
    cached there, and a later call with the same inputs loads it (and prepares again only the records whose media
    files changed). What is cached is the finding before any policy: the length limit, --skip_bad_samples,
    --reject_overlong and --max_bad_fraction apply here, on every call."""
    from vlft.data.index import prepared_store

    file = str(data_path)
    if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
        raise VlftError(f"--max_bad_fraction {max_bad_fraction:g} must be between 0 and 1 (the largest fraction of the "
                        "records --skip_bad_samples may leave out)")
    store = prepared_store(data_path, record_format, processor=processor, image_folder=image_folder, media=media,
                           thinking=thinking, workers=workers, num_proc=num_proc, cache_dir=cache_dir)
    return apply_policy(store, file, max_seq_length=max_seq_length, reject_overlong=reject_overlong,
                        skip_bad_samples=skip_bad_samples, length_flag=length_flag, max_bad_fraction=max_bad_fraction,
                        image_folder=image_folder)


def apply_policy(store, file: str, *, max_seq_length: int, reject_overlong: bool, skip_bad_samples: bool,
                 length_flag: str, max_bad_fraction: float | None, image_folder: str | None) -> PreparedData:
    """The PreparedData of a store (data/store.py) under the run's length limit and skip policy; raises as
    `prepare_data` says."""
    import numpy as np

    from vlft.data.store import OK

    if store.meta.get("census"):
        log(f"{file}: {store.meta['census']}")
    status, lengths = np.asarray(store.status), np.asarray(store.lengths)
    usable = status == OK
    longest = lengths.max(axis=1) if len(lengths) else np.zeros(0, np.int32)
    too_long_mask = usable & (longest > max_seq_length)
    keep = np.nonzero(usable & ~too_long_mask)[0]
    problems = sorted((p for found in store.problems.values() for p in found),
                      key=lambda p: (p.index if p.index is not None else -1))
    overlong = []
    for i in np.nonzero(too_long_mask)[0]:
        sample = store.record(int(i))[0]
        overlong.append(Problem(
            file, int(i), "", f"{int(longest[i])} tokens (vision tokens included) > {length_flag} {max_seq_length}",
            f"raise {length_flag}, lower the pixel budgets or frame counts, or split the conversation", sample.id))
    n_records = store.n_records
    n_media, n_missing = store.meta.get("n_media_entries", 0), store.meta.get("n_missing_relative", 0)
    not_found = n_media > 0 and n_missing == n_media  # every media file missing, all relative: the folder is wrong
    n_unique = len(store.media) if not_found else 0
    invalid, too_long = bool(problems) and not skip_bad_samples, bool(overlong) and reject_overlong
    if invalid or too_long:
        listed = sorted((problems if invalid else []) + (overlong if too_long else []),
                        key=lambda p: (p.index if p.index is not None else -1))
        too_long_what = f"{length_flag} {max_seq_length} (--reject_overlong is set)"
        if invalid:
            header = (f"{len(problems)} problem(s) and {len(overlong)} record(s) over {too_long_what} in {file}:"
                      if too_long else f"{len(problems)} problem(s) in {file}:")
            if not_found:
                header = _not_found_header(n_unique, image_folder, file) + "\n" + header
        else:
            header = f"{len(overlong)} record(s) in {file} exceed {too_long_what}:"
        raise DataError(listed, header=header, advice=_advice(
            invalid=invalid, overlong=too_long, skip_bad_samples=skip_bad_samples, reject_overlong=reject_overlong,
            length_flag=length_flag))
    if skip_bad_samples and max_bad_fraction is not None:
        _check_bad_fraction(problems, n_records, len(keep), max_bad_fraction, file,
                            _not_found_header(n_unique, image_folder, file) if not_found else "")
    out = PreparedData.from_store(store, keep, length_flag=length_flag)
    out.skipped, out.overlong = problems, overlong
    for p in problems[:10]:
        log(f"skipped: {p}")
    for p in overlong[:10]:
        log(f"dropped: {p}")
    if not len(out.samples):
        raise VlftError(f"no usable records left in {file} ({out.summary()})")
    return out


def prepare_records(job, indices) -> list:
    """data/store.py RecordResults of the records `indices` of `job` (data/index.py `Job`: the converted records,
    the format, the encoder and settings): parse, resolve, probe each media file once (in `job.workers` threads:
    PIL and PyAV release the GIL while decoding), measure. Pure of global state, so processes can split a file."""
    from vlft.data.store import CUT, DESIRABLE, REASONED, RecordResult, file_stat, media_files, record_digest

    file, image_folder, record_format, encoder, media = (job.file, job.image_folder, job.record_format, job.encoder,
                                                         job.media)
    results: dict[int, RecordResult] = {}
    problems: dict[int, list[Problem]] = {}

    def add(problem: Problem) -> None:
        problems.setdefault(problem.index, []).append(problem)

    parsed = []
    for index in indices:
        record = job.records[index]
        results[index] = RecordResult(index)
        if record is None:  # not convertible: its problems are in loaded.problems
            for p in job.record_problems.get(index, []):
                add(p)
            continue
        if isinstance(record, BadLine):  # a JSONL line that is not valid JSON: a bad record, reported with the others
            add(record.problem)
            continue
        results[index].digest = record_digest(record)
        sample, found = record_format.parse(record, index, file)
        for p in found:
            add(p)
        if sample is not None:
            parsed.append(sample)

    images = {s.index: [str(resolve_media_path(p, image_folder, file)) for p in s.images] for s in parsed}
    videos = {s.index: [_resolve_video(v, image_folder, file) for v in s.videos] for s in parsed}
    # image-side preference pairs: what the rejected sequence shows instead (only the kinds the record replaces)
    other_images = {s.index: [str(resolve_media_path(p, image_folder, file)) for p in s.rejected_images]
                    for s in parsed if getattr(s, "rejected_images", None) is not None}
    other_videos = {s.index: [_resolve_video(v, image_folder, file) for v in s.rejected_videos]
                    for s in parsed if getattr(s, "rejected_videos", None) is not None}
    # a rejected picture that resolves to the prompt's own file is no replacement (the parser compared the strings)
    for i, s in enumerate(parsed):
        same = [kind for kind, other, own in (("image", other_images, images), ("video", other_videos, videos))
                if s.index in other and other[s.index] == own[s.index]]
        if not same:
            continue
        for kind in same:
            del (other_images if kind == "image" else other_videos)[s.index]
        parsed[i] = dataclasses.replace(s, **{f"rejected_{kind}s": None for kind in same})
        if s.completions[0] == s.completions[1] and s.index not in other_images and s.index not in other_videos:
            add(Problem(file, s.index, f"rejected_{same[0]}", f"'rejected_{same[0]}' names the same file as "
                        f"'{same[0]}' and the rejected answer is the chosen one, so the pair teaches nothing",
                        "give the rejected sequence another picture, or a different answer", s.id))
            parsed[i] = None
    parsed = [s for s in parsed if s is not None]
    unique_images = sorted({p for s in parsed for p in [*images[s.index], *other_images.get(s.index, [])]})
    unique_videos = sorted({v for s in parsed for v in [*videos[s.index], *other_videos.get(s.index, [])]}, key=str)
    if unique_videos and getattr(job.processor, "video_processor", None) is None:
        raise VlftError(f"{file} has video records but the processor of this model has no video processor")
    stats = {}
    for source in [*unique_images, *unique_videos]:  # before decoding: a file changed meanwhile is seen as changed
        stats[source] = [(f, file_stat(f)) for f in media_files(source)]
    probe = job.probe_image
    if job.workers > 1 and len(unique_images) + len(unique_videos) > 1:
        with ThreadPoolExecutor(max_workers=job.workers) as pool:
            probed = dict(zip(unique_images, pool.map(lambda p: probe(p, encoder, media), unique_images)))
            probed.update(zip(unique_videos, pool.map(lambda v: probe_video(v, encoder, media), unique_videos)))
    else:
        probed = {p: probe(p, encoder, media) for p in unique_images}
        probed.update((v, probe_video(v, encoder, media)) for v in unique_videos)

    measured = []  # (sample, specs, other): the records whose media are all usable
    for sample in parsed:
        result = results[sample.index]
        specs: dict[str, list[VisionSpec]] = {"image": [], "video": [], "rejected_image": [], "rejected_video": []}
        bad = False
        for key, kind, sources, written in (
                ("image", "image", images[sample.index], sample.images),
                ("video", "video", videos[sample.index], sample.videos),
                ("rejected_image", "image", other_images.get(sample.index, []), getattr(sample, "rejected_images", None)),
                ("rejected_video", "video", other_videos.get(sample.index, []), getattr(sample, "rejected_videos", None))):
            for j, source in enumerate(sources):
                for f, stat in stats[source]:
                    result.media.append(f)
                    result.stats.append(stat)
                result.n_media += 1
                outcome = probed[source]
                if isinstance(outcome, MediaError):
                    bad = True
                    missing = _missing(source)
                    result.n_missing_relative += int(missing and _relative(written[j]))
                    hint = (_missing_hint(kind, written[j], image_folder, file) if missing
                            else f"replace the {kind} or remove the record")
                    add(Problem(file, sample.index, f"{key}[{j}]", str(outcome), hint, sample.id))
                else:
                    specs[key].append(outcome)
        if bad:
            continue
        other = None
        if sample.index in other_images or sample.index in other_videos:
            other = (specs["rejected_image"] if sample.index in other_images else specs["image"],
                     specs["rejected_video"] if sample.index in other_videos else specs["video"])
        measured.append((sample, specs, other))

    if record_format.batch_lengths is not None and all(other is None for _, _, other in measured):
        all_lengths = record_format.batch_lengths(encoder, [(s, sp["image"], sp["video"]) for s, sp, _ in measured])
    else:
        all_lengths = []
        for sample, specs, other in measured:
            try:
                all_lengths.append(record_format.sequence_lengths(encoder, sample, specs["image"], specs["video"],
                                                                  **({} if other is None else {"rejected": other})))
            except EncodingError as e:
                all_lengths.append(e)
    for (sample, specs, other), lengths in zip(measured, all_lengths):
        if isinstance(lengths, EncodingError):  # the template drops or rewrites an answer: named before the model loads
            add(Problem(file, sample.index, _encoding_field(lengths, sample), str(lengths), lengths.hint, sample.id))
            continue
        result = results[sample.index]
        result.lengths = tuple(int(n) for n in lengths)
        result.flags = ((REASONED if _reasoned(sample) else 0) | (CUT if getattr(lengths, "cut", False) else 0)
                        | (DESIRABLE if getattr(sample, "label", None) is True else 0))  # KTO's labels, unread later
        result.payload = (
            sample, images[sample.index], [list(v) if isinstance(v, tuple) else v for v in videos[sample.index]],
            specs["image"], specs["video"],
            None if other is None else (
                other_images.get(sample.index, images[sample.index]),
                [list(v) if isinstance(v, tuple) else v for v in other_videos.get(sample.index, videos[sample.index])]))
    for index, found in problems.items():
        # named by the fields the user wrote (messages[1].content, images[0]), not by their LLaVA equivalents
        results[index].problems = [job.loaded.source(p) for p in found]
        results[index].payload = None
    for result in results.values():  # pickled here, in the preparing process: the one writing only copies bytes
        if result.payload is not None:
            result.blob, result.payload = pickle.dumps(result.payload, protocol=pickle.HIGHEST_PROTOCOL), None
    return [results[i] for i in indices]


def _reasoned(sample) -> bool:
    """Whether the sample's last answer carries reasoning (the turn every Qwen3.5 template renders with its think
    block): check.py `quick_reasoning_counts` reads it from the index instead of the messages."""
    messages = getattr(sample, "messages", None) or []
    last = next((m for m in reversed(messages) if m.get("role") == "assistant"), None)
    if last is None:
        return False
    return bool((message_reasoning(last)[0] or "").strip())


def prepare_sft_data(data_path: str, *, require_answer: bool = True, **kwargs) -> PreparedData:
    """`prepare_data` for LLaVA conversations (SFT; with `require_answer=False`, prediction prompts too)."""
    return prepare_data(data_path, CONVERSATION if require_answer else CONVERSATION_OR_PROMPT, **kwargs)
