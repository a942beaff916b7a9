"""The start-up data check: every record is converted, every image decoded and every record
tokenised before the model is loaded, so a bad sample stops the run in seconds, not hours in.

    vlft check-data --model_id DIR --data_path data.json --image_folder images/
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vlft.data.formats import load_records
from vlft.data.llava import Sample, parse_record
from vlft.data.media import MediaError, image_token_count, load_image, resolve_media_path
from vlft.data.sft import SFTEncoder
from vlft.errors import DataError, Problem, VlftError
from vlft.utils import log


@dataclass
class CheckedData:
    samples: list[Sample]
    image_paths: list[list[str]]  # resolved, parallel to samples
    lengths: list[int]  # tokens per sample, vision tokens included
    n_records: int
    skipped: list[Problem] = field(default_factory=list)  # invalid records left out (--skip_bad_samples)
    overlong: list[Problem] = field(default_factory=list)  # records longer than max_seq_length, left out

    def summary(self) -> str:
        text = f"{len(self.samples)} of {self.n_records} records usable"
        if self.skipped:
            text += f"; {len(self.skipped)} problem(s) skipped"
        if self.overlong:
            text += f"; {len(self.overlong)} over --max_seq_length dropped"
        if self.lengths:
            s = sorted(self.lengths)
            text += f"; tokens per record min {s[0]} / median {s[len(s) // 2]} / max {s[-1]}"
        return text


def _probe(path: str, *, patch_size: int, merge_size: int, min_pixels: int, max_pixels: int) -> int | MediaError:
    """Decode the whole image (catches truncation) and return its number of vision tokens."""
    try:
        img = load_image(path)
        return image_token_count(img.height, img.width, patch_size=patch_size, merge_size=merge_size,
                                 min_pixels=min_pixels, max_pixels=max_pixels)
    except MediaError as err:
        return err


def check_sft_data(data_path: str, *, processor, image_folder: str | None, image_min_pixels: int,
                   image_max_pixels: int, max_seq_length: int, reject_overlong: bool = False,
                   skip_bad_samples: bool = False, workers: int = 4) -> CheckedData:
    file = str(data_path)
    records = load_records(data_path)
    problems: list[Problem] = []
    parsed: list[Sample] = []
    for index, record in enumerate(records):
        sample, found = parse_record(record, index, file)
        problems += found
        if sample is not None:
            parsed.append(sample)

    resolved = {s.index: [str(resolve_media_path(p, image_folder, file)) for p in s.images] for s in parsed}
    unique = sorted({p for paths in resolved.values() for p in paths})
    encoder = SFTEncoder(processor)
    budget = dict(patch_size=encoder.patch_size, merge_size=encoder.merge_size,
                  min_pixels=image_min_pixels, max_pixels=image_max_pixels)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL releases the GIL while decoding
        probed = dict(zip(unique, pool.map(lambda p: _probe(p, **budget), unique)))

    samples, image_paths, lengths, overlong = [], [], [], []
    for sample in parsed:
        paths = resolved[sample.index]
        counts, bad = [], False
        for j, path in enumerate(paths):
            result = probed[path]
            if isinstance(result, MediaError):
                bad = True
                missing = not Path(path).exists()
                hint = ("fix the path in the record, or --image_folder that relative paths resolve against" if missing
                        else "replace the file or remove the record")
                problems.append(Problem(file, sample.index, f"image[{j}]", str(result), hint, sample.id))
            else:
                counts.append(result)
        if bad:
            continue
        n_tokens = len(encoder.encode(sample.messages, counts).input_ids)
        if n_tokens > max_seq_length:
            overlong.append(Problem(
                file, sample.index, "", f"{n_tokens} tokens (vision tokens included) > --max_seq_length {max_seq_length}",
                "raise --max_seq_length, lower --image_max_pixels, or split the conversation", sample.id))
            continue
        samples.append(sample)
        image_paths.append(paths)
        lengths.append(n_tokens)

    problems.sort(key=lambda p: (p.index if p.index is not None else -1))
    if problems and not skip_bad_samples:
        header = f"{len(problems)} problem(s) in {file}:"
        if unique and all(isinstance(probed[p], MediaError) and not Path(p).exists() for p in unique):
            base = image_folder or str(Path(file).parent)
            header = (f"none of the {len(unique)} image files was found under {base}: is --image_folder right?\n"
                      + header)
        raise DataError(problems, header=header)
    if overlong and reject_overlong:
        raise DataError(overlong, header=f"{len(overlong)} record(s) in {file} exceed --max_seq_length "
                                         "(--reject_overlong is set):")
    checked = CheckedData(samples, image_paths, lengths, len(records), skipped=problems, overlong=overlong)
    for p in problems[:10]:
        log(f"skipped: {p}")
    for p in overlong[:10]:
        log(f"dropped: {p}")
    if not samples:
        raise VlftError(f"no usable records left in {file} ({checked.summary()})")
    return checked


def main(argv: list[str] | None = None) -> int:
    from vlft.config import DataArguments, ModelArguments, parse_args
    from vlft.models.loading import load_processor

    model_args, data_args = parse_args((ModelArguments, DataArguments), argv or [], prog="vlft check-data")
    if not model_args.model_id or not data_args.data_path:
        raise VlftError("vlft check-data needs --model_id and --data_path")
    if not Path(data_args.data_path).exists():
        raise VlftError(f"--data_path {data_args.data_path}: file not found")
    processor = load_processor(model_args.model_id)
    checked = check_sft_data(
        data_args.data_path, processor=processor, image_folder=data_args.image_folder,
        image_min_pixels=data_args.image_min_pixels, image_max_pixels=data_args.image_max_pixels,
        max_seq_length=data_args.max_seq_length, reject_overlong=data_args.reject_overlong,
        skip_bad_samples=data_args.skip_bad_samples, workers=data_args.check_workers,
    )
    log(checked.summary())
    return 0
