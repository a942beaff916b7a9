"""`vlft convert`: write any data file vlft reads (LLaVA, ShareGPT, OpenAI messages, parquet, arrow, a save_to_disk
folder: data/convert.py) as vlft's LLaVA JSONL, one record per line.

    vlft convert --data_path train.parquet --output train.jsonl [--image_folder images/] [--overwrite true]

Training reads these formats directly; converting is for looking at the records, editing them, or handing them to
a tool that reads LLaVA. Media paths are written so that the JSONL works with no --image_folder, and keeps working
when it moves together with its media:

    media under the output's folder       relative to that folder ("train_media/ab12.png")
    media given by relative paths         relative to the output's folder, with ".." where needed
      (the record's path, and --image_folder or --data_path it resolves against; a relative --media_dir)
    media given by an absolute path        absolute, as given: the JSONL alone can move, the media stay put
      (the record's own path, or an absolute --image_folder / --data_path / --media_dir)

so a project folder holding data, media and output can be moved or copied as a whole. The log counts the paths
written absolute. Embedded images (bytes in a parquet or dataset folder) are written next to the output, into
`<output stem>_media/` (--media_dir), named by content hash.
An answer's reasoning is written as its gpt turn's `reasoning_content` (from OpenAI-style messages, or the alias
`reasoning`); reasoning written inline (<think>...</think>) stays in the turn's value.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vlft.errors import DataError, VlftError
from vlft.utils import log


@dataclass
class ConvertArguments:
    data_path: str | None = field(default=None, metadata={"help": "The file (or save_to_disk folder) to convert."})
    output: str | None = field(default=None, metadata={"help": "The LLaVA JSONL file to write."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that relative media paths resolve against (default: the data file's "
                                        "folder)."})
    media_dir: str | None = field(
        default=None, metadata={"help": "Where embedded media are written (default: <output stem>_media/ beside it)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists."})
    skip_bad_samples: bool = field(
        default=False, metadata={"help": "Leave out records that cannot be converted (counted and listed) instead of "
                                         "stopping."})


def _written_path(raw: str, image_folder: str | None, data_file: str, out_dir: Path, media_dir: Path,
                  media_relative: bool) -> str:
    """The path written for a media file the record names as `raw` (the rules in the module docstring).
    `out_dir` and `media_dir` (where embedded media were extracted) are absolute; `media_relative` says whether
    the user named the media folder relatively (or not at all: the default beside the output)."""
    from vlft.data.media import resolve_media_path

    path = Path(os.path.abspath(resolve_media_path(raw, image_folder, data_file)))
    if path.is_relative_to(out_dir):
        return path.relative_to(out_dir).as_posix()
    if path.is_relative_to(media_dir):
        given_relative = media_relative
    else:
        given_relative = not os.path.isabs(raw) and not os.path.isabs(image_folder or data_file)
    if given_relative:
        try:
            return Path(os.path.relpath(path, out_dir)).as_posix()
        except ValueError:  # Windows: another drive has no relative path
            pass
    return str(path)


def _written_turn(turn: dict) -> dict:
    """A (checked) turn with its reasoning under vlft's name, `reasoning_content`, also where the record used the
    alias `reasoning`; null or empty reasoning fields are left out."""
    from vlft.data.llava import given_reasoning
    from vlft.data.reasoning import REASONING_KEYS

    if not any(key in turn for key in REASONING_KEYS):
        return turn
    given = given_reasoning(turn)
    out = {key: value for key, value in turn.items() if key not in REASONING_KEYS}
    if given:
        out["reasoning_content"] = next(iter(given.values()))
    return out


def convert(args: ConvertArguments) -> dict:
    """Convert; returns the counts (records read, written, skipped; media written)."""
    from vlft.data.convert import FORMAT_NAMES, load_llava_records
    from vlft.data.llava import parse_record

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise VlftError(f"--output {out} exists; pass --overwrite true to replace it, or choose another name")
    if not out.parent.is_dir():
        raise VlftError(f"--output {out}: the folder {out.parent} does not exist")
    if args.image_folder and not Path(args.image_folder).is_dir():
        raise VlftError(f"--image_folder {args.image_folder}: no such directory")
    out_dir = Path(os.path.abspath(out.parent))
    # absolute, so the extracted files' paths are not read later against the data file's folder
    media_dir = Path(os.path.abspath(args.media_dir)) if args.media_dir else out_dir / f"{out.stem}_media"
    media_relative = not args.media_dir or not os.path.isabs(args.media_dir)
    file = str(args.data_path)
    loaded = load_llava_records(file, media_dir=media_dir)
    problems = list(loaded.problems)
    rows = []
    for index, record in enumerate(loaded.records):
        if record is None:
            continue
        # the LLaVA rules a converted record must meet; whether it ends with an answer is the stage's business
        _, found = parse_record(record, index, file, require_answer=False)
        if found:
            problems += [loaded.source(p) for p in found]
            continue
        row = dict(record)
        row["conversations"] = [_written_turn(turn) for turn in row["conversations"]]
        for kind in ("image", "video"):
            if kind in row:
                value = row[kind] if isinstance(row[kind], list) else [row[kind]]
                def written(f):
                    return _written_path(f, args.image_folder, file, out_dir, media_dir, media_relative)

                row[kind] = [[written(f) for f in v] if isinstance(v, list) else written(v) for v in value]
        rows.append(row)
    skipped = sorted({p.index for p in problems})
    # the embedded media are extracted while the records are read: say so when the output itself is not written
    unwritten = f"{out} was not written" + (f" ({loaded.media_written} embedded media file(s) were extracted to "
                                            f"{loaded.media_dir}, reused by the next try)" if loaded.media_written else "")
    if problems and not args.skip_bad_samples:
        raise DataError(sorted(problems, key=lambda p: p.index if p.index is not None else -1),
                        header=f"{len(problems)} problem(s) in {file}; {unwritten}:",
                        advice="Fix the records above, or pass --skip_bad_samples true to convert the others.")
    if not rows:
        raise VlftError(f"no record of {file} could be converted; {unwritten}")
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    counts = {"records": len(loaded.records), "written": len(rows), "skipped": len(skipped),
              "format": FORMAT_NAMES[loaded.format], "media_written": loaded.media_written,
              "output": str(out), "absolute_paths": sum(_absolute_count(row) for row in rows)}
    for p in problems[:10]:
        log(f"skipped: {p}")
    media = f"; {loaded.media_written} embedded media file(s) written to {media_dir}" if loaded.media_written else ""
    log(f"{file} ({counts['format']}): {len(rows)} of {len(loaded.records)} records written to {out}"
        f"{f', {len(skipped)} skipped' if skipped else ''}{media}")
    if counts["absolute_paths"]:
        log(f"{counts['absolute_paths']} media path(s) written absolute, as given (an absolute record path, "
            "--image_folder, --data_path or --media_dir): the JSONL can move, those media cannot; give relative "
            "paths for a folder that moves as a whole")
    return counts


def _absolute_count(row: dict) -> int:
    """How many of a written record's media paths are absolute."""
    paths = [p for kind in ("image", "video") for v in row.get(kind, []) for p in (v if isinstance(v, list) else [v])]
    return sum(os.path.isabs(p) for p in paths)


def main(argv: list[str] | None = None) -> int:
    from vlft.config import parse_args

    (args,) = parse_args((ConvertArguments,), list(argv or []), prog="vlft convert")
    if not args.data_path or not args.output:
        raise VlftError("vlft convert needs --data_path and --output")
    convert(args)
    return 0
