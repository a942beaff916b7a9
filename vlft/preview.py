"""`vlft preview`: one self-contained HTML page that shows records the way training will see them.

    vlft preview --model_id DIR --data_path train.json --image_folder images/ [--stage NAME]   (a row of vlft/stages.py)
                 [--num_records 20 | --ids a,b,c] [--output preview.html]

--model_id is a model directory (or id), or a run directory: then the model it trained from (its vlft_args.json's
model_id) and the media settings and reasoning flags it trained with (pixel budgets, frame sampling,
--max_seq_length, --enable_thinking, --preserve_thinking, --train_empty_think) are used, unless given here, as
`vlft predict` does.

Everything shown comes from vlft's own data path, so what the page shows is what trains: the start-up check
(data/prepare.py `prepare_data`, with --skip_bad_samples on, so that bad records are listed rather than stopping
the preview), then the stage's dataset (SFTDataset, PreferenceDataset, PromptDataset) and its ChatEncoder. Per
record the page shows:

- each image as the model sees it (resized to its pixel budget), with its patch grid (t x h x w) and its vision
  token count; for a video, a few of the frames vlft samples (data/video.py) with their time, the grid and count;
- the tokens: trained ones (label != -100) and masked ones in different colours, special tokens outlined, each
  vision span (<|vision_start|> ... <|vision_end|>) as one block with its token count; for a thinking model (or
  answers with `<think>` text) the reasoning tokens, the think block as rendered (ChatEncoder's REASONING part), in
  their own colour, apart from the answer tokens, trained or not (the empty block before a plain answer is masked
  unless --train_empty_think);
- the sequence length(s) in tokens and the vision tokens among them;
- DPO: the prompt, then the chosen and the rejected answer with their masks; GRPO: the prompt (all masked: nothing
  of it trains) and the record's extra columns (solution, ...), which reach the reward functions;
- the problems the start-up check found, in a box at the top and on each bad record (missing image, over-long...).

The page has no JavaScript and makes no request: images are embedded as data URIs, the CSS is inline, and every
text from the data file is escaped.
"""
from __future__ import annotations

import base64
import html
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlft.constants import IGNORE_INDEX, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START
from vlft.errors import DataError, Problem, VlftError
from vlft.stages import STAGES, stage_help
from vlft.utils import log

THINKING_FLAGS = ("enable_thinking", "preserve_thinking", "train_empty_think")  # a run's, used unless given here
THUMB_SIDE = 192  # longest side of a thumbnail in the page, pixels


@dataclass
class PreviewArguments:
    stage: str = field(default="sft", metadata={"help": stage_help() + ".", "choices": STAGES})  # read when parsing: every row
    num_records: int = field(default=20, metadata={"help": "Show the first N records of the file (not with --ids)."})
    ids: str | None = field(default=None, metadata={"help": "Show these records instead: their ids, comma-separated."})
    output: str = field(default="preview.html", metadata={"help": "HTML file to write (replaced if it exists)."})
    frames_per_video: int = field(default=4, metadata={"help": "Sampled frames of each video to show."})
    truncation_mode: str = field(
        default="keep_start", metadata={"help": "Stages that cut over-long answers (dpo): cut them from their end "
                                                "(keep_start, the stage's default) or leave the record out (drop).",
                                        "choices": ["keep_start", "drop"]})


# --- which records --------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The records to show: the first `num_records` by index, or those whose id is in `ids`."""

    num_records: int = 20
    ids: tuple[str, ...] = ()

    @classmethod
    def of(cls, args: PreviewArguments) -> Selection:
        if args.ids is not None:
            ids = tuple(dict.fromkeys(i.strip() for i in args.ids.split(",") if i.strip()))
            if not ids:
                raise VlftError(f"--ids {args.ids!r} names no record id; give ids separated by commas")
            return cls(ids=ids)
        if args.num_records < 1:
            raise VlftError(f"--num_records {args.num_records}: show at least 1 record")
        return cls(num_records=args.num_records)

    def wants(self, index: int | None, record_id: str | None) -> bool:
        if self.ids:
            return record_id is not None and record_id in self.ids
        return index is not None and index < self.num_records

    def parser(self, parse, raw: dict):
        """The stage's record parser, for the selected records only: the others are left out of preparation (no
        problem, no media decoded), so a preview of a large file costs what its shown records cost. The raw
        record of each selected one is kept in `raw` (index -> record) for the page."""
        def parse_selected(record, index: int, file: str):
            record_id = record.get("id") if isinstance(record, dict) else None
            if not self.wants(index, None if record_id is None else str(record_id)):
                return None, []
            raw[index] = record
            return parse(record, index, file)

        return parse_selected


# --- the data, through vlft's own path ------------------------------------------------------------------------


@dataclass
class Part:
    """One token sequence of a record (the SFT conversation; DPO's prompt, chosen, rejected; GRPO's prompt)."""

    name: str
    ids: list[int]
    labels: list[int]  # IGNORE_INDEX on masked tokens
    kinds: list[int] | None = None  # per token: data/encoding.py CONTEXT, REASONING or ANSWER (None: not known)


@dataclass
class Media:
    kind: str  # "image" or "video"
    grid: tuple[int, int, int]
    tokens: int  # vision tokens in the LLM sequence: t * h * w // merge**2
    thumbs: list[tuple[str, str]]  # (data URI, caption) per picture shown
    note: str = ""  # size, frames, fps


@dataclass
class RecordView:
    index: int
    id: str | None
    parts: list[Part] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)
    lengths: tuple[int, ...] = ()  # tokens of each sequence that trains (SFT: 1, DPO: chosen and rejected)
    sides: list[str] = field(default_factory=list)  # the completion sides those sequences end with (DPO, KTO)
    columns: dict = field(default_factory=dict)  # GRPO: the record's extra keys
    problems: list[Problem] = field(default_factory=list)
    raw: object = None  # the record as read (LLaVA form), shown for a bad record


@dataclass
class Preview:
    model: str
    data_path: str
    stage: str
    records: list[RecordView]
    problems: list[Problem]  # every problem of the shown records, and the file-level ones
    n_records: int  # records in the file
    settings: dict  # the media settings and length limit in force, shown in the header
    tokenizer: object = None  # the processor's tokenizer, to show token text


def _prepare(data_path: str, record_format, selection: Selection, raw: dict, **kwargs):
    """prepare_data on the selected records, bad ones skipped and listed. Returns (PreparedData or None, problems):
    None when no selected record is usable, which prepare_data reports without its list, so the check is run again
    with both stop policies on to get that list (cheap: it covers the selected records only)."""
    from dataclasses import replace

    from vlft.data.prepare import prepare_data

    selected = replace(record_format, parse=selection.parser(record_format.parse, raw))
    try:
        prepared = prepare_data(data_path, selected, skip_bad_samples=True, reject_overlong=False, **kwargs)
    except DataError:
        raise  # a file-level error (unreadable file, mixed formats): nothing to preview
    except VlftError:
        try:
            prepare_data(data_path, selected, skip_bad_samples=False, reject_overlong=True, **kwargs)
        except DataError as err:
            return None, err.problems
        raise
    return prepared, [*prepared.skipped, *prepared.overlong]


def conversation_parts(item: dict, encoder, sample, specs) -> list[Part]:
    """The one sequence of a conversation item (SFTDataset: `input_ids`, `labels`) with the labels that train and
    which tokens are reasoning (`_conversation_kinds`). `specs`: the record's (image, video) VisionSpecs from the
    start-up check. A vlft/stages.py `preview_parts` function."""
    ids = item["input_ids"].tolist()
    return [Part("conversation", ids, item["labels"].tolist(), _conversation_kinds(encoder, sample, specs, ids))]


def completion_sides(item: dict) -> list[str]:
    """The completion sides of a prompt + completions item, in item order: every S with `S_ids` and `S_mask`
    (DPO: chosen, rejected)."""
    return [key[:-4] for key in item if key.endswith("_ids") and f"{key[:-4]}_mask" in item]


def completion_parts(item: dict, encoder, sample, specs) -> list[Part]:
    """The prompt (`prompt_ids`) and each completion side of an item (`completion_sides`: `S_ids`, `S_mask` -> the
    labels that train; a side with its own prompt, `S_prompt_ids`, shows it first), with which tokens are reasoning
    (`_completion_kinds`, against the record's completions in side order). A prompt-only item (GRPO) is its prompt.
    A vlft/stages.py `preview_parts` function."""
    prompt = item["prompt_ids"].tolist()
    parts = [Part("prompt", prompt, [IGNORE_INDEX] * len(prompt))]
    completions = list(getattr(sample, "completions", ()) or ())
    for k, side in enumerate(completion_sides(item)):
        if f"{side}_prompt_ids" in item:  # an image-side pair's rejected sequence: its own pictures
            other = item[f"{side}_prompt_ids"].tolist()
            parts.append(Part(f"{side}-prompt", other, [IGNORE_INDEX] * len(other)))
        ids, mask = item[f"{side}_ids"].tolist(), item[f"{side}_mask"].tolist()
        kinds = _completion_kinds(encoder, sample.messages, completions[k], ids) if k < len(completions) else None
        parts.append(Part(side, ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], kinds))
    return parts


def trained_lengths(item: dict, prepared_lengths) -> tuple[int, ...]:
    """The lengths that train: per completion side, its prompt plus the side as the item holds it (after any
    keep_start cut); the prepared lengths for an item without sides."""
    sides = completion_sides(item)
    if not sides:
        return tuple(prepared_lengths)
    return tuple(len(item.get(f"{s}_prompt_ids", item["prompt_ids"])) + len(item[f"{s}_ids"]) for s in sides)


def _conversation_kinds(encoder, sample, specs, ids: list[int]) -> list[int] | None:
    """Per token of an SFT sequence: CONTEXT, REASONING or ANSWER, from the encoder that built it (`encode(...,
    parts=True)`, the same render and tokenisation). None when that encoding is not `ids` (it always is)."""
    encoded = encoder.encode(sample.messages, *specs, parts=True)
    return encoded.parts if encoded.input_ids == ids else None


def _completion_kinds(encoder, prompt: list[dict], completion, ids: list[int]) -> list[int] | None:
    """Per token of a preference completion (`ids`, as `encode_preference` made it, perhaps cut by keep_start):
    REASONING up to the answer, then ANSWER to its <|im_end|>, CONTEXT after. The completion is the text the
    template renders after the generation prompt in prompt + completion (`encode_preference`'s rule); with thinking
    on it starts inside the think block, with thinking off after it. None when that text does not give `ids`."""
    from vlft.data.encoding import ANSWER, CONTEXT, REASONING

    message = {"content": completion} if isinstance(completion, str) else dict(completion)
    message["role"] = "assistant"
    prompt_text = encoder.render(prompt, add_generation_prompt=True).text
    text, spans, _ = encoder.render([*prompt, message])
    if not text.startswith(prompt_text):
        return None
    start, span = len(prompt_text), spans[-1]
    encoded = encoder.tokenizer(text[start:], add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"][:len(ids)] != ids:
        return None
    answer, end = span.answer - start, span.end - start
    return [REASONING if e <= answer and s >= span.block - start else ANSWER if s >= answer and e <= end else CONTEXT
            for s, e in encoded["offset_mapping"][:len(ids)]]


def _data_uri(image, quality: int = 85) -> str:
    """A PIL image as a JPEG data URI, shrunk to THUMB_SIDE on its longest side."""
    image = image.copy()
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_media(path: str, grid, encoder, media, cache: dict, rejected: bool = False) -> Media:
    """The image as training sizes it (data/media.py fit_image: the same resize the dataset does)."""
    from PIL import Image

    from vlft.data.media import fit_image, load_image

    if path not in cache:
        image = load_image(path)
        fitted = fit_image(image, factor=encoder.patch_size * encoder.merge_size, min_pixels=media.image_min_pixels,
                           max_pixels=media.image_max_pixels)
        h, w = fitted.shape[1:]
        note = f"{Path(path).name}: {image.width}x{image.height} px, trained at {w}x{h}"
        cache[path] = (_data_uri(Image.fromarray(fitted.permute(1, 2, 0).numpy())), note)
    uri, note = cache[path]
    tokens = grid[0] * grid[1] * grid[2] // encoder.merge_size**2
    return Media("image", tuple(grid), tokens, [(uri, f"{_grid_text(grid)} grid")],
                 ("rejected sequence only: " if rejected else "") + note)


def _grid_text(grid) -> str:
    return " x ".join(str(int(g)) for g in grid)


def _video_media(source, grid, encoder, media, frames_per_video: int, rejected: bool = False) -> Media:
    """A few of the frames vlft samples from the video (data/video.py load_video, as the dataset calls it)."""
    import numpy as np
    from PIL import Image

    from vlft.data.video import load_video

    clip = load_video(source, **media.video_kwargs(encoder))
    real = len(clip.frames) - clip.padded
    picks = sorted({int(round(x)) for x in np.linspace(0, real - 1, min(frames_per_video, real))})
    thumbs = [(_data_uri(Image.fromarray(clip.frames[k])), f"frame {k + 1}/{len(clip.frames)}, t={clip.timestamps[k]:.2f} s")
              for k in picks]
    name = Path(source).name if isinstance(source, str) else f"{len(source)} frame images"
    note = (f"{name}: {len(clip.frames)} frames sampled at {clip.fps:.2f} fps of {clip.duration:.2f} s, "
            f"{clip.frames.shape[2]}x{clip.frames.shape[1]} px each" + (f", {clip.padded} padded" if clip.padded else ""))
    tokens = grid[0] * grid[1] * grid[2] // encoder.merge_size**2
    return Media("video", tuple(grid), tokens, thumbs, ("rejected sequence only: " if rejected else "") + note)


def build_preview(args: PreviewArguments, model_args, data_args, *, processor_path: str, family) -> Preview:
    """Run the data path on the selected records and collect what the page shows. `data_args` already holds the
    run's settings (see `main`); `processor_path` is where the processor (tokenizer, patch sizes) loads from."""
    from vlft.data.prepare import length_flag_of
    from vlft.data.reasoning import Thinking
    from vlft.models.loading import load_processor

    if not Path(data_args.data_path).exists():
        raise VlftError(f"--data_path {data_args.data_path}: file not found")
    selection = Selection.of(args)
    processor = load_processor(processor_path)
    media = data_args.media_settings(family)
    raw: dict = {}
    thinking = Thinking.from_args(data_args)  # the reasoning flags decide what the template renders and what trains
    stage = STAGES[args.stage]
    record_format = stage.record_format_for(data_args.max_seq_length, args)  # its own flags: args
    prepared, problems = _prepare(
        data_args.data_path, record_format, selection, raw, processor=processor, image_folder=data_args.image_folder,
        media=media, max_seq_length=data_args.max_seq_length, workers=data_args.check_workers,
        length_flag=length_flag_of(data_args), thinking=thinking)
    problems = [p for p in problems if p.index is None or selection.wants(p.index, p.record_id) or p.index in raw]
    if selection.ids:
        found = {str(r.get("id")) for r in raw.values() if isinstance(r, dict)} | {p.record_id for p in problems}
        missing = [i for i in selection.ids if i not in found]
        if missing:
            raise VlftError(f"--ids: no record with id {', '.join(map(repr, missing))} in {data_args.data_path}")

    views: dict[int, RecordView] = {}
    n_records = prepared.n_records if prepared else len(raw)
    if prepared is not None:
        dataset = stage.load("dataset")(prepared, processor, media=media, max_length=data_args.max_seq_length,
                                        thinking=thinking)  # items as training builds them
        parts_of = stage.load("preview_parts")
        encoder, cache = dataset.encoder, {}
        for i, sample in enumerate(prepared.samples):
            item = dataset[i]
            parts = parts_of(item, encoder, sample, (prepared.image_specs[i], prepared.video_specs[i]))
            view = RecordView(sample.index, sample.id, parts=parts, raw=raw.get(sample.index))
            view.lengths = trained_lengths(item, prepared.sequence_lengths[i])  # after any keep_start cut
            view.sides = completion_sides(item)
            for path, grid in zip(prepared.image_paths[i], item.get("image_grid_thw", [])):
                view.media.append(_image_media(path, grid.tolist(), encoder, media, cache))
            for source, grid in zip(prepared.video_sources[i], item.get("video_grid_thw", [])):
                view.media.append(_video_media(source, grid.tolist(), encoder, media, args.frames_per_video))
            if "rejected_media" in item:  # image-side pair: the pictures only the rejected sequence shows
                other = item["rejected_media"]
                for path, grid in zip(prepared.rejected_media[i][0], other.get("image_grid_thw", [])):
                    view.media.append(_image_media(path, grid.tolist(), encoder, media, cache, rejected=True))
                for source, grid in zip(prepared.rejected_media[i][1], other.get("video_grid_thw", [])):
                    view.media.append(_video_media(source, grid.tolist(), encoder, media, args.frames_per_video,
                                                   rejected=True))
            view.columns = dict(getattr(sample, "columns", {}))
            views[sample.index] = view
    for p in problems:
        if p.index is None:
            continue
        if p.index not in views:
            views[p.index] = RecordView(p.index, p.record_id, raw=raw.get(p.index))
        views[p.index].problems.append(p)
    settings = {name: getattr(media, name) for name in ("image_min_pixels", "image_max_pixels", "video_min_pixels",
                                                         "video_max_pixels", "video_max_total_pixels", "fps", "nframes")}
    settings[length_flag_of(data_args)] = data_args.max_seq_length
    return Preview(str(model_args.model_id), str(data_args.data_path), args.stage,
                   [views[k] for k in sorted(views)], problems, n_records, settings, processor.tokenizer)


# --- HTML -----------------------------------------------------------------------------------------------------


class TokenText:
    """Token ids -> the text each token shows, and which ids are special. Byte-level BPE splits some characters
    over several tokens: a token that ends inside a character shows nothing and the token that completes it
    shows the whole character, so the page never shows replacement characters that are not in the data."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special = set(tokenizer.all_special_ids) | {i for i, t in decoder.items() if getattr(t, "special", False)}
        ids = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD])
        self.vision_start, self.vision_end, self.image_pad, self.video_pad = ids
        self._single: dict[int, str] = {}

    def decode(self, ids: Sequence[int]) -> str:
        if len(ids) == 1:
            if ids[0] not in self._single:
                self._single[ids[0]] = self.tokenizer.decode(list(ids), skip_special_tokens=False)
            return self._single[ids[0]]
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        out, pending = [], []
        for i in ids:
            pending.append(i)
            text = self.decode(pending)
            if text.endswith("\ufffd") and len(pending) < 4 and i not in self.special:
                out.append("")
                continue
            out.append(text)
            pending = []
        return out


def _show(text: str) -> str:
    """Escaped token text with line breaks and tabs made visible."""
    return html.escape(text).replace("\t", "→\t").replace("\n", "↵\n")


def token_html(ids: Sequence[int], labels: Sequence[int], text: TokenText,
               kinds: Sequence[int] | None = None) -> tuple[str, dict]:
    """One token sequence as spans: `tok trained` (label != IGNORE_INDEX) or `tok masked`, plus `reasoning` or
    `answer` where `kinds` (data/encoding.py parts, one per token) says the token is in a think block or an answer,
    and `special` for the tokenizer's special tokens; each vision span (<|vision_start|> ... <|vision_end|>) becomes
    one `vision` block naming its pad-token count instead of its hundreds of pads. Returns (html, counts: tokens,
    trained, vision, reasoning = reasoning tokens, trained_reasoning = those of them trained)."""
    from vlft.data.encoding import ANSWER, REASONING

    out: list[str] = []
    counts = {"tokens": len(ids), "trained": 0, "vision": 0, "reasoning": 0, "trained_reasoning": 0}
    pieces = text.pieces(ids)
    i, numbers = 0, {"image": 0, "video": 0}
    while i < len(ids):
        tok = ids[i]
        if tok == text.vision_start:
            end, depth = i, 0  # the matching <|vision_end|>: Qwen3-VL nests one span per temporal patch of a video
            while end < len(ids):
                depth += (ids[end] == text.vision_start) - (ids[end] == text.vision_end)
                if depth == 0:
                    break
                end += 1
            block = ids[i:end + 1]
            pads = sum(t in (text.image_pad, text.video_pad) for t in block)
            kind = "video" if text.video_pad in block else "image"
            numbers[kind] += 1
            inner = text.decode([t for t in block if t not in (text.image_pad, text.video_pad, text.vision_start,
                                                                text.vision_end)])
            marks = f"; between the pads: {inner}" if inner.strip() else ""  # Qwen3-VL's "<t seconds>" timestamps
            counts["vision"] += pads
            counts["trained"] += sum(lab != IGNORE_INDEX for lab in labels[i:end + 1])  # never, but counted if so
            out.append(f'<span class="vision vision-{kind}" data-tokens="{len(block)}" data-pads="{pads}" '
                       f'title="{len(block)} tokens, {pads} of them &lt;|{kind}_pad|&gt;{html.escape(marks)}">'
                       f'{kind} {numbers[kind]} · {pads} tokens</span>')
            i = end + 1
            continue
        trained = labels[i] != IGNORE_INDEX
        counts["trained"] += trained
        if tok in (text.image_pad, text.video_pad):  # a pad outside a vision span (not in Qwen templates)
            counts["vision"] += 1
        kind = kinds[i] if kinds is not None else None
        counts["reasoning"] += kind == REASONING
        counts["trained_reasoning"] += trained and kind == REASONING
        classes = ("tok " + ("trained" if trained else "masked") + {REASONING: " reasoning", ANSWER: " answer"}.get(kind, "")
                   + (" special" if tok in text.special else ""))
        out.append(f'<span class="{classes}" title="id {tok}">{_show(pieces[i])}</span>')
        i += 1
    return "".join(out), counts


CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#1d1d1f;background:#fafafa;font-size:14px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:0 0 6px}h3{font-size:13px;margin:8px 0 4px;color:#555}
.meta{color:#555;margin-bottom:8px}.meta code{background:#eee;padding:0 3px}
.legend span{margin-right:12px}.legend .tok,.legend .vision{padding:1px 4px}
.problems{border:2px solid #c62828;background:#fff3f3;padding:8px 12px;margin:10px 0;border-radius:4px}
.problems ul{margin:4px 0;padding-left:20px}.problem{margin:2px 0}.hint{color:#555}
.record{background:#fff;border:1px solid #ddd;border-radius:4px;padding:10px 12px;margin:12px 0}
.record.bad{border-color:#c62828}
.stats{color:#444;margin:2px 0 6px}.stats b{color:#1d1d1f}
.media{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}
.thumb{margin:0;border:1px solid #ddd;padding:4px;background:#f4f4f4}
.thumb img{display:block;max-width:192px;max-height:192px}.frames{display:flex;gap:4px}
.thumb figcaption{font-size:12px;color:#333;max-width:400px}.frames figcaption{font-size:11px;color:#666}
.tokens{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-all;
line-height:1.7;border:1px solid #eee;padding:6px;background:#fcfcfc}
.tok{border-right:1px solid rgba(0,0,0,.12)}
.trained{background:#c8f0c8}.masked{background:#eceff3;color:#59606a}
.trained.reasoning{background:#cfe3ff;color:#0b3d91}.masked.reasoning{background:#eef3fb;color:#6b7fa6;font-style:italic}
.special{outline:1px solid #7b3fb3;color:#6a2ea3;font-weight:600}
.vision{background:#ffe2a8;border:1px solid #d18f00;border-radius:3px;padding:0 4px;color:#6b4700;font-weight:600}
table.columns{border-collapse:collapse}table.columns td,table.columns th{border:1px solid #ddd;padding:2px 6px;
text-align:left;vertical-align:top;font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap}
pre.raw{background:#f6f6f6;padding:6px;white-space:pre-wrap;font-size:12px}
"""


def _problem_li(p: Problem, with_record: bool = True) -> str:
    where = ""
    if with_record and p.index is not None:
        where = f"record {p.index}" + (f" (id {p.record_id!r})" if p.record_id is not None else "")
    if p.field:
        where += (", " if where else "") + f"field '{p.field}'"
    hint = f' <span class="hint">→ {html.escape(p.hint)}</span>' if p.hint else ""
    index = "" if p.index is None else f' data-index="{p.index}"'
    return f'<li class="problem"{index}><b>{html.escape(where)}</b>{": " if where else ""}{html.escape(p.message)}{hint}</li>'


def _media_html(items: list[Media]) -> str:
    if not items:
        return ""
    figures = []
    counters = {"image": 0, "video": 0}
    for m in items:
        counters[m.kind] += 1
        pictures = "".join(
            f'<figure class="frame-thumb"><img class="media-{"image" if m.kind == "image" else "frame"}" '
            f'src="{uri}" alt="{html.escape(caption)}">'
            + (f'<figcaption>{html.escape(caption)}</figcaption>' if m.kind == "video" else "") + "</figure>"
            for uri, caption in m.thumbs)
        figures.append(
            f'<figure class="thumb thumb-{m.kind}" data-grid="{_grid_text(m.grid)}" data-tokens="{m.tokens}">'
            f'<div class="frames">{pictures}</div><figcaption><b>{m.kind} {counters[m.kind]}</b>: grid (t x h x w) '
            f'{_grid_text(m.grid)}, <b>{m.tokens} vision tokens</b><br>{html.escape(m.note)}</figcaption></figure>')
    return f'<div class="media">{"".join(figures)}</div>'


def record_html(view: RecordView, text: TokenText) -> str:
    title = f"record {view.index}" + (f" · id {html.escape(repr(view.id))}" if view.id is not None else "")
    body = []
    if view.problems:
        verdict = ("left out of training by the start-up check" if not view.parts
                   else "has a problem")
        body.append(f'<div class="problems record-problems"><b>This record is {verdict}:</b><ul>'
                    + "".join(_problem_li(p, with_record=False) for p in view.problems) + "</ul></div>")
    if view.parts:
        blocks, total = [], {"tokens": 0, "trained": 0, "vision": 0, "reasoning": 0, "trained_reasoning": 0}
        for part in view.parts:
            spans, counts = token_html(part.ids, part.labels, text, part.kinds)
            for k in total:
                total[k] += counts[k]
            label = ("" if part.name == "conversation" else
                     f'<h3>{part.name} ({counts["tokens"]} tokens, {counts["trained"]} trained)</h3>')
            blocks.append(f'{label}<div class="tokens part-{part.name}" data-trained="{counts["trained"]}" '
                          f'data-reasoning="{counts["trained_reasoning"]}">{spans}</div>')
        if len(view.sides) > 1 and len(view.lengths) == len(view.sides):  # one sequence per completion side
            length = ", ".join(f"<b>{n}</b> tokens with the {side} answer" for n, side in zip(view.lengths, view.sides))
        else:
            length = f"<b>{view.lengths[0] if view.lengths else total['tokens']}</b> tokens"
        trains = (" (a prompt: the completions are generated, and trained, during the run)"
                  if all(p.name == "prompt" for p in view.parts) else "")
        reasoning = (f', <b class="reasoning-count">{total["trained_reasoning"]}</b> of them reasoning'
                     if total["reasoning"] else "")
        body.append(f'<div class="stats">{length} · <b>{total["vision"]}</b> vision tokens · '
                    f'<b class="trained-count">{total["trained"]}</b> trained tokens{reasoning}{trains}</div>')
        body.append(_media_html(view.media))
        body += blocks
        if view.columns:
            rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v, ensure_ascii=False))}</td></tr>"
                           for k, v in view.columns.items())
            body.append(f'<h3>columns for the reward functions</h3><table class="columns">{rows}</table>')
    elif view.raw is not None:
        body.append(f'<h3>the record as read</h3><pre class="raw">'
                    f'{html.escape(json.dumps(view.raw, indent=1, ensure_ascii=False, default=str))}</pre>')
    bad = " bad" if view.problems else ""
    id_attr = "" if view.id is None else f' data-id="{html.escape(view.id)}"'
    return (f'<section class="record{bad}" id="record-{view.index}" data-index="{view.index}"{id_attr}>'
            f'<h2>{title}</h2>{"".join(body)}</section>')


def page_html(preview: Preview) -> str:
    from vlft.data.encoding import REASONING

    text = TokenText(preview.tokenizer)
    settings = ", ".join(f"{k} {v}" for k, v in preview.settings.items() if v is not None)
    good = sum(bool(r.parts) for r in preview.records)
    meta = (f'<div class="meta">model <code>{html.escape(preview.model)}</code> · data <code>'
            f'{html.escape(preview.data_path)}</code> · stage <code>{preview.stage}</code><br>'
            f'{len(preview.records)} record(s) shown of {preview.n_records} in the file, {good} usable, '
            f'{len(preview.records) - good} left out by the start-up check · {html.escape(settings)}</div>')
    # the reasoning entries only where some record has a think block (a thinking template, or <think> text)
    thinks = any(p.kinds is not None and REASONING in p.kinds for r in preview.records for p in r.parts)
    reasoning = ('<span class="tok trained reasoning">reasoning, trained (think block)</span>'
                 '<span class="tok masked reasoning">think block, masked (empty, before a plain answer)</span>'
                 if thinks else "")
    legend = ('<div class="legend">legend: <span class="tok trained answer">trained (label = token)</span>'
              f'{reasoning}<span class="tok masked">masked (label -100)</span>'
              '<span class="tok masked special">special token</span>'
              '<span class="vision">vision span · N tokens</span> ↵ line break · hover a token for its id</div>')
    problems = ""
    if preview.problems:
        problems = (f'<section class="problems" id="problems"><h2>{len(preview.problems)} problem(s) found by the '
                    f'start-up check</h2><ul>{"".join(_problem_li(p) for p in preview.problems)}</ul></section>')
    records = "".join(record_html(r, text) for r in preview.records)
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            # no request of any kind: pictures are data URIs, the style is inline, and there is no script
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            'style-src \'unsafe-inline\'">'
            f'<title>vlft preview: {html.escape(Path(preview.data_path).name)}</title><style>{CSS}</style></head><body>'
            f'<h1>vlft preview</h1>{meta}{legend}{problems}{records}</body></html>\n')


# --- command --------------------------------------------------------------------------------------------------


def _model_and_settings(model_args, data_args, given: set[str]):
    """(processor path, family, data_args): for a run directory its base model and the media settings and length
    limit it trained with, and its reasoning flags (each unless given on this command line); otherwise the model
    itself."""
    from vlft.models.loading import load_family
    from vlft.predict import _media_from_run
    from vlft.run_dir import base_model_of, read_run_args

    model = Path(model_args.model_id)
    run_args = read_run_args(model) if model.is_dir() else {}
    if not run_args:
        return model_args.model_id, load_family(model_args.model_id), data_args
    base = base_model_of(model)
    # and its reasoning flags: they decide what the template renders and which tokens train
    data_args = _media_from_run(data_args, run_args, given, extra=THINKING_FLAGS)
    if not {"max_seq_length", "max_length"} & given and run_args.get("max_seq_length"):
        data_args.max_seq_length = int(run_args["max_seq_length"])
    # a run directory holds the processor the Trainer saved; an adapter run without one uses its base model's
    has_processor = any((model / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
    log(f"{model} is a run of {base}: using its media settings")
    return (str(model) if has_processor else base), load_family(base), data_args


def main(argv: list[str] | None = None) -> int:
    from vlft.config import DataArguments, ModelArguments, parse_command, validate

    (args, model_args, data_args), given = parse_command((PreviewArguments, ModelArguments, DataArguments),
                                                         list(argv or []), prog="vlft preview")
    if not model_args.model_id or not data_args.data_path:
        raise VlftError("vlft preview needs --model_id and --data_path")
    from vlft.data.mixture import single_data_path

    data_args.data_path = single_data_path(  # --num_records and --ids choose records of one file
        data_args.data_path, command="vlft preview", why="--num_records and --ids choose records by their place in it")
    if args.ids is not None and "num_records" in given:
        raise VlftError("--ids and --num_records both choose the records to show; give one of them")
    output = Path(args.output)
    if output.resolve() == Path(data_args.data_path).resolve():
        raise VlftError(f"--output {output} is the data file; choose another file")
    processor_path, family, data_args = _model_and_settings(model_args, data_args, given)
    validate(model_args, data_args, family=family)
    preview = build_preview(args, model_args, data_args, processor_path=processor_path, family=family)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page_html(preview), encoding="utf-8")
    bad = sum(bool(r.problems) for r in preview.records)
    log(f"preview of {len(preview.records)} record(s) ({bad} with problems) written to {output.resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
