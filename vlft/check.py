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
from vlft.data.media import MediaError, image_grid, load_image, resolve_media_path
from vlft.data.sft import MediaSettings, SFTEncoder, VisionSpec
from vlft.data.video import check_video
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
    video_sources: list[list] = field(default_factory=list)  # resolved videos, parallel to samples

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


def _probe_image(path: str, encoder: SFTEncoder, media: MediaSettings) -> VisionSpec | MediaError:
    """Decode the whole image (catches truncation) and return the grid it will have."""
    try:
        img = load_image(path)
        return VisionSpec(image_grid(img.height, img.width, patch_size=encoder.patch_size, merge_size=encoder.merge_size,
                                     min_pixels=media.image_min_pixels, max_pixels=media.image_max_pixels))
    except MediaError as err:
        return err


def _probe_video(source, encoder: SFTEncoder, media: MediaSettings) -> VisionSpec | MediaError:
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


def check_sft_data(data_path: str, *, processor, image_folder: str | None, media: MediaSettings, max_seq_length: int,
                   reject_overlong: bool = False, skip_bad_samples: bool = False, workers: int = 4,
                   require_answer: bool = True) -> CheckedData:
    file = str(data_path)
    records = load_records(data_path)
    problems: list[Problem] = []
    parsed: list[Sample] = []
    for index, record in enumerate(records):
        sample, found = parse_record(record, index, file, require_answer=require_answer)
        problems += found
        if sample is not None:
            parsed.append(sample)

    images = {s.index: [str(resolve_media_path(p, image_folder, file)) for p in s.images] for s in parsed}
    videos = {s.index: [_resolve_video(v, image_folder, file) for v in s.videos] for s in parsed}
    unique_images = sorted({p for paths in images.values() for p in paths})
    unique_videos = sorted({v for sources in videos.values() for v in sources}, key=str)
    encoder = SFTEncoder(processor)
    if unique_videos and getattr(processor, "video_processor", None) is None:
        raise VlftError(f"{file} has video records but the processor of this model has no video processor")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL and PyAV release the GIL while decoding
        probed = dict(zip(unique_images, pool.map(lambda p: _probe_image(p, encoder, media), unique_images)))
        probed.update(zip(unique_videos, pool.map(lambda v: _probe_video(v, encoder, media), unique_videos)))

    samples, image_paths, video_sources, lengths, overlong = [], [], [], [], []
    for sample in parsed:
        specs: dict[str, list[VisionSpec]] = {"image": [], "video": []}
        bad = False
        for kind, sources in (("image", images[sample.index]), ("video", videos[sample.index])):
            for j, source in enumerate(sources):
                result = probed[source]
                if isinstance(result, MediaError):
                    bad = True
                    hint = (f"fix the path in the record, or --image_folder that relative {kind} paths resolve against"
                            if _missing(source) else f"replace the {kind} or remove the record")
                    problems.append(Problem(file, sample.index, f"{kind}[{j}]", str(result), hint, sample.id))
                else:
                    specs[kind].append(result)
        if bad:
            continue
        n_tokens = len(encoder.encode(sample.messages, specs["image"], specs["video"]).input_ids)
        if n_tokens > max_seq_length:
            overlong.append(Problem(
                file, sample.index, "", f"{n_tokens} tokens (vision tokens included) > --max_seq_length {max_seq_length}",
                "raise --max_seq_length, lower the pixel budgets or frame counts, or split the conversation",
                sample.id))
            continue
        samples.append(sample)
        image_paths.append(images[sample.index])
        video_sources.append([list(v) if isinstance(v, tuple) else v for v in videos[sample.index]])
        lengths.append(n_tokens)

    problems.sort(key=lambda p: (p.index if p.index is not None else -1))
    if problems and not skip_bad_samples:
        header = f"{len(problems)} problem(s) in {file}:"
        everything = [*unique_images, *unique_videos]
        if everything and all(isinstance(probed[m], MediaError) and _missing(m) for m in everything):
            base = image_folder or str(Path(file).parent)
            header = (f"none of the {len(everything)} media files was found under {base}: is --image_folder right?\n"
                      + header)
        raise DataError(problems, header=header)
    if overlong and reject_overlong:
        raise DataError(overlong, header=f"{len(overlong)} record(s) in {file} exceed --max_seq_length "
                                         "(--reject_overlong is set):")
    checked = CheckedData(samples, image_paths, lengths, len(records), skipped=problems, overlong=overlong,
                          video_sources=video_sources)
    for p in problems[:10]:
        log(f"skipped: {p}")
    for p in overlong[:10]:
        log(f"dropped: {p}")
    if not samples:
        raise VlftError(f"no usable records left in {file} ({checked.summary()})")
    return checked


def main(argv: list[str] | None = None) -> int:
    from vlft.config import DataArguments, ModelArguments, parse_args
    from vlft.models.loading import load_family, load_processor

    model_args, data_args = parse_args((ModelArguments, DataArguments), argv or [], prog="vlft check-data")
    if not model_args.model_id or not data_args.data_path:
        raise VlftError("vlft check-data needs --model_id and --data_path")
    if not Path(data_args.data_path).exists():
        raise VlftError(f"--data_path {data_args.data_path}: file not found")
    processor = load_processor(model_args.model_id)
    media = data_args.media_settings(load_family(model_args.model_id))  # pixel defaults in the family's units
    checked = check_sft_data(
        data_args.data_path, processor=processor, image_folder=data_args.image_folder,
        media=media, max_seq_length=data_args.max_seq_length, reject_overlong=data_args.reject_overlong,
        skip_bad_samples=data_args.skip_bad_samples, workers=data_args.check_workers,
    )
    log(checked.summary())
    return 0
