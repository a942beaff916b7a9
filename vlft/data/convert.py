"""Other data formats -> vlft's LLaVA records, at load time, so every stage and `vlft check-data` see LLaVA.

Read (detected from the records' keys, never from a flag):

    LLaVA / ShareGPT   {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nHi"}, ...]}
                       `from` human/gpt or user/assistant (+ system); media as `image`/`video` (LLaVA) or as
                       `images`/`videos` lists (LLaMA-Factory's ShareGPT mode). A record without `images`/`videos`
                       is passed on untouched: the LLaVA path is unchanged.
    OpenAI messages    {"images": ["a.png"], "messages": [{"role": "user", "content": "<image>Hi"}, ...]}
                       (LLaMA-Factory's OpenAI mode, ms-swift, TRL). `content` is a string with <image>/<video>
                       tags or a list of typed parts: {"type": "text", "text"}, {"type": "image"} (the next entry
                       of `images`), {"type": "image", "image": path}, {"type": "image_url", "image_url":
                       {"url": path or file://...}}, and the same for video / video_url. A typed media part becomes
                       a tag in place, in order.

System prompt: a top-level `system` string (LLaMA-Factory's `system` column, in either layout) is kept on the
record as written; data/llava.py makes it the leading system turn, and refuses a record that also has a system turn.

Reasoning: an assistant message's `reasoning_content` (or `reasoning`, vLLM's / OpenRouter's name) becomes its LLaVA
gpt turn's `reasoning_content`; a ShareGPT turn carrying it keeps it. An answer's inline <think>...</think> stays in
its text. data/llava.py checks both forms.

Files: a JSON list or JSONL (data/formats.py), a `.parquet` or `.arrow` file, or a `datasets` `save_to_disk`
folder. Media columns may hold paths or `datasets.Image`/`Video` values ({"bytes", "path"}, raw bytes, or PIL
images): those with bytes are written once into a cache folder (VLFT_CACHE/media, or ~/.cache/vlft/media), named
by their sha256, because the rest of vlft reads media from files. http(s) URLs are an error: nothing downloads.

A file mixing `messages` and `conversations` records is an error naming the first record of the other format. A
converted record keeps its index in the file, and every problem found later (parsing, media, length) is named by
the field the user wrote (`messages[2].role`, `images[0]`), not by its LLaVA equivalent: `Loaded.source`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from vlft.constants import IMAGE_TAG, VIDEO_TAG
from vlft.data.formats import BadLine, load_records
from vlft.data.reasoning import REASONING_KEYS
from vlft.errors import DataError, Problem, VlftError
from vlft.utils import log

TAGS = {"image": IMAGE_TAG, "video": VIDEO_TAG}
LISTS = {"image": "images", "video": "videos"}  # LLaVA's media key -> the list key of the other formats
ROLES = {"system": "system", "user": "human", "assistant": "gpt"}  # OpenAI role -> LLaVA speaker
FORMAT_NAMES = {"llava": "LLaVA/ShareGPT conversations", "messages": "OpenAI messages"}
HF_SUFFIXES = (".parquet", ".arrow")
_TAG_RE = re.compile(f"{re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)}")
_CONVERT_ADVICE = "Fix the file: a file holds one format."


class LlavaRecord(dict):
    """A converted record: a plain LLaVA record, plus `fields`, LLaVA field -> the field the user wrote."""

    fields: dict[str, str]


def record_format(record: object) -> str | None:
    """'messages', 'llava' (a `conversations` record), or None when the keys say neither (a flat `prompt`
    record, a non-object: the stage's parser judges those)."""
    if not isinstance(record, dict):
        return None
    if record.get("messages") is not None and record.get("conversations") is None:
        return "messages"
    if record.get("conversations") is not None:
        return "llava"
    return None


def _record_id(record: dict) -> str | None:
    return None if record.get("id") is None else str(record["id"])


def local_path(value: object, where: str, report) -> str | None:
    """A media reference as a local path: a path, or a file:// URL. Anything else is reported, and None returned."""
    if not isinstance(value, str) or not value.strip():
        report(where, f"expected a file path, got {value!r}", "give the path of a local file")
        return None
    scheme = urlparse(value).scheme.lower()
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        report(where, f"{value!r} is a URL; vlft reads local files and downloads nothing",
               "download the file and give its local path")
        return None
    if scheme == "data":
        report(where, "an inline data: URL", "save the media to a file and give its path")
        return None
    if scheme == "file":
        return unquote(urlparse(value).path)
    return value


def _media_list(record: dict, kind: str, report) -> tuple[list, str] | None:
    """The record's images or videos as (list, key written): from `images`/`videos`, or LLaVA's `image`/`video`."""
    plural, single = LISTS[kind], kind
    if record.get(plural) is not None and record.get(single) is not None:
        report(plural, f"both '{single}' and '{plural}' are given", f"give the {kind}s once, as '{plural}'")
        return None
    key = plural if record.get(plural) is not None else single
    value = record.get(key)
    if value is None:
        return [], key
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        report(key, f"'{key}' is a {type(value).__name__}", f"give '{key}' as a list of paths")
        return None
    out, ok = [], True
    for k, item in enumerate(value):
        if kind == "video" and isinstance(item, list):  # a video given as its frame images (LLaVA)
            frames = [local_path(f, f"{key}[{k}][{m}]", report) for m, f in enumerate(item)]
            ok = ok and None not in frames
            out.append(frames)
            continue
        path = local_path(item, f"{key}[{k}]", report)
        ok = ok and path is not None
        out.append(path)
    return (out, key) if ok else None


def sharegpt_to_llava(record: dict, index: int, file: str) -> tuple[dict | None, list[Problem]]:
    """A `conversations` record. Without `images`/`videos` it is LLaVA and returned as it is; with them, the lists
    become LLaVA's `image`/`video` (an empty list: no media)."""
    if record.get("images") is None and record.get("videos") is None:
        return record, []
    problems: list[Problem] = []
    record_id = _record_id(record)

    def report(where: str, message: str, hint: str) -> None:
        problems.append(Problem(file, index, where, message, hint, record_id))

    out = LlavaRecord({k: v for k, v in record.items() if k not in ("image", "images", "video", "videos")})
    out.fields = {}
    for kind in TAGS:
        found = _media_list(record, kind, report)
        if found is None:
            continue
        media, key = found
        if media:
            out[kind] = media
        out.fields[kind] = key
        out.fields.update({f"{kind}[{k}]": f"{key}[{k}]" for k in range(len(media))})
    return (None, problems) if problems else (out, [])


def messages_to_llava(record: dict, index: int, file: str) -> tuple[dict | None, list[Problem]]:
    """An OpenAI `messages` record -> a LLaVA record (turn i is message i). Checks what only this layout can get
    wrong, in its own terms: roles (system first if at all, then user and assistant alternating), typed parts,
    media parts against the `images`/`videos` lists, URLs. Whether the conversation must end with an answer is the
    stage's rule (data/llava.py), reported as `messages[i]`."""
    problems: list[Problem] = []
    record_id = _record_id(record)

    def report(where: str, message: str, hint: str) -> None:
        problems.append(Problem(file, index, where, message, hint, record_id))

    lists = {kind: _media_list(record, kind, report) for kind in TAGS}
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else f"a {type(messages).__name__}"
        report("messages", f"'messages' must be a non-empty list of messages, got {got}",
               'write "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]')
        return None, problems

    fields = {"conversations": "messages", **{kind: found[1] for kind, found in lists.items() if found is not None}}
    media: dict[str, list] = {"image": [], "video": []}
    used = {"image": 0, "video": 0}  # entries of `images` / `videos` taken so far

    def take(kind: str, where: str, what: str) -> None:
        """A media item with no path of its own: the next entry of the record's list."""
        entries = lists[kind][0] if lists[kind] is not None else None
        if entries is None:
            return  # the list itself is broken (reported)
        key = lists[kind][1]
        if used[kind] >= len(entries):
            n = len(entries)
            report(where, f"{what} has no file: it is {kind} #{len(media[kind]) + 1} of the record, but '{key}' has "
                   f"{n} entr{'y' if n == 1 else 'ies'}",
                   f"add the file to '{LISTS[kind]}', or give it in the part as \"{kind}\": path")
            media[kind].append(None)
            return
        fields[f"{kind}[{len(media[kind])}]"] = f"{key}[{used[kind]}]"
        media[kind].append(entries[used[kind]])
        used[kind] += 1

    turns, roles = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        fields.update({f"conversations[{i}]": where, f"conversations[{i}].from": f"{where}.role",
                       f"conversations[{i}].value": f"{where}.content"})
        if not isinstance(message, dict):
            report(where, f"a message must be an object, got {type(message).__name__}",
                   'write each message as {"role": "user", "content": "..."}')
            continue
        role = message.get("role")
        if role not in ROLES:
            hint = "use system, user or assistant"
            if role in ("tool", "function", "function_call", "observation", "ipython"):
                hint = "tool calls are not supported: drop these messages, or fold them into the text of a turn"
            report(f"{where}.role", "the message has no 'role'" if role is None else f"unknown role {role!r}", hint)
            continue
        roles.append((i, role))
        content = message.get("content")
        if isinstance(content, str):
            for match in _TAG_RE.finditer(content):
                kind = "image" if match.group() == IMAGE_TAG else "video"
                take(kind, f"{where}.content", f"the {match.group()} tag")
            text = content
        elif isinstance(content, list):
            text = _parts(content, where, role, take, media, fields, report)
        else:
            report(f"{where}.content", f"'content' must be a string or a list of parts, got "
                   f"{'nothing' if content is None else type(content).__name__}",
                   'write the text as a string, or as [{"type": "text", "text": "..."}]')
            continue
        turn = {"from": ROLES[role], "value": text}
        given = [key for key in REASONING_KEYS if message.get(key) is not None]
        # kept on any role: the LLaVA parser refuses reasoning on a non-gpt turn, named by the field written here
        for key in given:
            llava_key = "reasoning_content" if len(given) == 1 else key  # both given: the parser compares them
            turn[llava_key] = message[key]
            fields[f"conversations[{i}].{llava_key}"] = f"{where}.{key}"
        turns.append(turn)
    _check_roles(roles, report)
    for kind, found in lists.items():
        if found is not None and used[kind] < len(found[0]):
            key = found[1]
            report(key, f"'{key}' has {len(found[0])} entr{'y' if len(found[0]) == 1 else 'ies'} but the messages "
                   f"use {used[kind]} of them ({TAGS[kind]} tags and {kind} parts without a path of their own)",
                   f"add a {TAGS[kind]} tag or a {{\"type\": \"{kind}\"}} part where each {kind} belongs, or remove "
                   f"the extra entries")
    if problems:
        return None, problems
    out = LlavaRecord({k: v for k, v in record.items() if k not in ("messages", "images", "videos", "image", "video")})
    out["conversations"] = turns
    for kind in TAGS:
        if media[kind]:
            out[kind] = media[kind]
    out.fields = fields
    return out, []


def _parts(content: list, where: str, role: str, take, media: dict, fields: dict, report) -> str:
    """Typed parts -> one LLaVA text with a tag in place of each media part."""
    pieces = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            report(at, f"a part must be an object, got {type(part).__name__}",
                   'write parts as {"type": "text", "text": "..."} or {"type": "image"}')
            continue
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                report(f"{at}.text", f"a text part needs a string 'text', got {text!r}", "give the text as a string")
                continue
            for tag in TAGS.values():
                if tag in text:
                    report(f"{at}.text", f"{tag} inside a text part; with typed parts a medium is a part of its own",
                           f"replace the {tag} tag with a {{\"type\": \"{'image' if tag == IMAGE_TAG else 'video'}\"}} part")
            pieces.append(text)
            continue
        medium = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}.get(kind)
        if medium is None:
            report(f"{at}.type", "the part has no 'type'" if kind is None else f"unknown part type {kind!r}",
                   "use text, image, image_url, video or video_url")
            continue
        if role != "user":
            report(at, f"a {medium} part in a {role} message; media can only be given in user messages",
                   "move the part into a user message")
            continue
        inline, inline_field = part.get(kind), f"{at}.{kind}"
        if kind.endswith("_url"):
            if isinstance(inline, dict):
                inline, inline_field = inline.get("url"), f"{inline_field}.url"
            if inline is None:
                report(inline_field, f"a {kind} part without a URL", f'give "{kind}": {{"url": "file:///path"}}')
                continue
        if inline is None:
            take(medium, at, f"the {medium} part")
        else:
            path = local_path(inline, inline_field, report)
            fields[f"{medium}[{len(media[medium])}]"] = inline_field
            media[medium].append(path)
        pieces.append(TAGS[medium])
    return "".join(pieces)


def _check_roles(roles: list[tuple[int, str]], report) -> None:
    """System first if at all, then user and assistant alternating, starting with user; the first break only."""
    for n, (i, role) in enumerate(roles):
        if role == "system":
            if n:
                report(f"messages[{i}].role", "a system message is only allowed first",
                       "move it to the front, or merge it into the first system message")
                return
            continue
        body = n - (1 if roles[0][1] == "system" else 0)
        expected = "user" if body % 2 == 0 else "assistant"
        if role != expected:
            want = "a user" if expected == "user" else "an assistant"
            report(f"messages[{i}].role", f"expected {want} message here, got {role}",
                   "messages must alternate user, assistant, user, ...; add the missing message or merge the two")
            return


CONVERTERS = {"messages": messages_to_llava, "llava": sharegpt_to_llava}


def to_llava(record: object, index: int, file: str) -> tuple[object | None, list[Problem]]:
    """One record of any format -> (the LLaVA record, []) or (None, every problem). A record whose format the keys
    do not tell is returned as it is, for the stage's parser to judge."""
    if isinstance(record, BadLine):  # a JSONL line that is not JSON: a bad record, reported as it is
        return None, [record.problem]
    fmt = record_format(record)
    if isinstance(record, dict) and record.get("messages") is not None and record.get("conversations") is not None:
        return None, [Problem(file, index, "messages", "the record has both 'messages' and 'conversations'",
                              "give the conversation once", _record_id(record))]
    return CONVERTERS[fmt](record, index, file) if fmt else (record, [])


@dataclass
class Loaded:
    """A data file's records as LLaVA records, in file order (None where conversion failed: see `problems`)."""

    records: list
    problems: list[Problem] = field(default_factory=list)
    format: str = "llava"
    media_written: int = 0  # media files written from embedded bytes (new ones; cached ones are reused)
    media_dir: Path | None = None

    def source(self, problem: Problem) -> Problem:
        """The problem with its field named as the user wrote it (`image[1]` -> `messages[0].content[2].image`)."""
        record = self.records[problem.index] if problem.index is not None and problem.index < len(self.records) else None
        fields = getattr(record, "fields", None)
        if not fields or not problem.field:
            return problem
        head, _, rest = problem.field.partition(".")
        for key in (problem.field, head):
            if key in fields:
                renamed = fields[key] + (problem.field[len(key):] if key == head and rest else "")
                return dataclasses.replace(problem, field=renamed)
        return problem


def media_cache_dir() -> Path:
    """Where embedded media are written: $VLFT_CACHE/media, or ~/.cache/vlft/media."""
    root = os.environ.get("VLFT_CACHE") or str(Path.home() / ".cache" / "vlft")
    return Path(root) / "media"


def load_llava_records(path: str | Path, *, media_dir: str | Path | None = None) -> Loaded:
    """Read any supported file (see the module docstring) and convert every record to LLaVA.

    Raises VlftError for a file that cannot be read, DataError for a file that mixes formats; problems of single
    records are returned (the caller's skip policy applies to them). Embedded media go to `media_dir` (default
    `media_cache_dir()`)."""
    path, file = Path(path), str(path)
    cache = MediaCache(Path(media_dir) if media_dir else media_cache_dir())
    if path.is_dir() or path.suffix.lower() in HF_SUFFIXES:
        rows = read_hf_rows(path, cache)
    else:
        rows = load_records(path)
    fmt, first = None, None
    for index, row in enumerate(rows):
        kind = record_format(row)
        if kind is None:
            continue
        if fmt is None:
            fmt, first = kind, index
        elif kind != fmt:
            message = (f"this record is in the {FORMAT_NAMES[kind]} format, but record {first} and those after it "
                       f"are in the {FORMAT_NAMES[fmt]} format")
            raise DataError([Problem(file, index, "messages" if kind == "messages" else "conversations", message,
                                     "convert the file to one format (vlft convert writes LLaVA JSONL), or split it",
                                     _record_id(row))], header=f"{file} mixes data formats:", advice=_CONVERT_ADVICE)
    out = Loaded([], format=fmt or "llava", media_written=cache.written, media_dir=cache.root if cache.used else None)
    for index, row in enumerate(rows):
        record, problems = to_llava(row, index, file)
        out.records.append(record)
        out.problems += problems
    if out.format != "llava":
        log(f"{file}: {len(rows)} records in the {FORMAT_NAMES[out.format]} format, read as LLaVA records")
    if cache.used:
        log(f"{file}: {cache.used} embedded media file(s) read from {cache.root} ({cache.written} written now)")
    return out


# --- Hugging Face datasets: parquet, arrow, save_to_disk folders ---------------------------------------------------

_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
               "MPO": ".jpg"}


class MediaCache:
    """Embedded media -> files named by the sha256 of their bytes, each written once (atomically, so several
    processes preparing the same data do not collide)."""

    def __init__(self, root: Path):
        self.root = root
        self.used = 0  # distinct blobs seen
        self.written = 0
        self._seen: set[str] = set()

    def path_of(self, data: bytes, kind: str, name: str | None) -> str:
        digest = hashlib.sha256(data).hexdigest()
        suffix = Path(name).suffix.lower() if name and 1 < len(Path(name).suffix) <= 6 else _sniff(data, kind)
        target = self.root / f"{digest}{suffix}"
        if digest not in self._seen:
            self._seen.add(digest)
            self.used += 1
            if not target.exists():
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                except OSError as e:
                    raise VlftError(f"cannot write embedded media into {self.root} ({e}); set VLFT_CACHE to a "
                                    "writable folder") from e
                self.written += 1
        return str(target)


def _sniff(data: bytes, kind: str) -> str:
    if kind == "video":
        return ".mp4"  # PyAV reads the container from its bytes; the suffix is only for people
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return _EXTENSIONS.get(img.format or "", ".img")
    except (UnidentifiedImageError, OSError):
        return ".img"  # not an image: the media check reports it, naming the record and field


def _materialize(value: object, kind: str, cache: MediaCache) -> object:
    """A media cell -> a path string (lists element-wise); bytes and PIL images are written to the cache. Anything
    unrecognised is left as it is, for the converter to report."""
    if isinstance(value, list):
        return [_materialize(v, kind, cache) for v in value]
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return cache.path_of(value["bytes"], kind, value.get("path"))
        return value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return cache.path_of(bytes(value), kind, None)
    if type(value).__module__.startswith("PIL."):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return cache.path_of(buffer.getvalue(), kind, None)
    return value


def _materialize_row(row: dict, cache: MediaCache) -> dict:
    for key in ("image", "images", "video", "videos"):
        if row.get(key) is not None:
            row[key] = _materialize(row[key], "video" if key.startswith("video") else "image", cache)
    for message in row.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            for part in message["content"]:
                if isinstance(part, dict):
                    for key in ("image", "video"):
                        if part.get(key) is not None:
                            part[key] = _materialize(part[key], key, cache)
    return row


def read_hf_rows(path: Path, cache: MediaCache) -> list[dict]:
    """Rows of a parquet file, an arrow file or a save_to_disk folder, as dicts, media cells as paths. Read in
    batches, so only one batch of embedded bytes is in memory at a time."""
    import pyarrow as pa

    if not path.exists():
        raise VlftError(f"data {path} does not exist; check --data_path")
    try:
        if path.is_dir():
            table = _table_from_disk(path)
        elif path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            table = _arrow_table(path)
    except (pa.ArrowException, OSError) as e:
        raise VlftError(f"cannot read {path} as {path.suffix or 'a dataset folder'} ({type(e).__name__}: {e}); is it "
                        "the right file?") from e
    rows = []
    for batch in table.to_batches(max_chunksize=256):
        rows += [_materialize_row(row, cache) for row in batch.to_pylist()]
    if not rows:
        raise VlftError(f"{path} holds no records; check --data_path")
    return rows


def _arrow_table(path: Path):
    """An .arrow file: the IPC stream format (what `datasets` writes) or the IPC file format (feather v2)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()


def _table_from_disk(path: Path):
    """A `save_to_disk` folder: a Dataset, or a DatasetDict whose `train` split (or only split) is read."""
    if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise VlftError(f"data folder {path} is not a dataset saved with datasets' save_to_disk (no state.json or "
                        "dataset_dict.json); give a JSON, JSONL, .parquet or .arrow file, or such a folder")
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        splits = list(dataset)
        if "train" in dataset:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise VlftError(f"data folder {path} holds the splits {', '.join(splits)} and none is 'train'; save the "
                            "split to train on on its own (dataset['name'].save_to_disk(...))")
        if len(splits) > 1:
            log(f"{path}: reading split '{split}' of {', '.join(splits)}")
        dataset = dataset[split]
    return dataset.with_format("arrow")[: len(dataset)]
