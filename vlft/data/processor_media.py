"""Training's media settings written into the processor, so that a run directory, every checkpoint-N and a merged
model serve at the resolution the model trained on (issue 14).

    media = data_args.media_settings(family)
    apply_media_settings(processor, media)  # in place; the Trainer then saves it with every checkpoint

vlft's data path never asks the processor for sizes: it takes pixel budgets and frame sampling from `MediaSettings`
and only the patch / merge / temporal patch sizes and the normalisation from the processor, which this module does
not change. What it changes is what `AutoProcessor.from_pretrained` of a saved directory does for everyone else
(plain transformers, vLLM, TGI...), which otherwise is the base model's pixel budgets.

What maps exactly, and what does not (transformers 5.24's Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors):

- Images, every family: `size = {shortest_edge: image_min_pixels, longest_edge: image_max_pixels}`. Exact: vlft
  sizes images with transformers' own `smart_resize` and resize kernel (data/media.py), so the grids and the
  pixels equal the processor's.
- Video frame size, Qwen2-VL and Qwen2.5-VL (`Qwen2VLVideoProcessor`, per-frame `size`):
  `size = {video_min_pixels, video_max_pixels}` and, for `video_max_total_pixels`, `cap_pixels_per_frame = True`
  with `max_video_tokens` chosen so that the processor's total budget `int(max_video_tokens * factor**2 * 0.9)`
  equals `video_max_total_pixels` exactly. The processor then caps each frame at
  `max(min(max_pixels, total * tps // T), int(1.05 * min_pixels))` where vlft (qwen-vl-utils) uses
  `min(max_pixels, max(min(max_pixels, total / T * tps), int(1.05 * min_pixels)))`: the same, except that the
  processor floors the quotient (a bound that can only move the rescale factor by under one pixel of budget) and
  lets `1.05 * min_pixels` win over `max_pixels` when the two cross.
- Video frame size, Qwen3-VL (`Qwen3VLVideoProcessor`, whose `size` bounds the pixels of all frames together):
  `cap_pixels_per_frame = True`, `max_video_tokens * factor**2 = video_max_pixels` and
  `longest_edge = video_max_total_pixels * tps` make its per-frame cap `max(min(max_pixels, total * tps // T),
  int(1.05 * min_pixels))`, as above. `shortest_edge = video_min_pixels` gives that floor exactly, but the same
  number is also the processor's lower bound on the whole clip (T * h * w), where vlft bounds each frame: frames
  that vlft scales *up* to `video_min_pixels` (videos smaller than the per-frame minimum) come out smaller here.
- Frame sizing below one patch row: frames follow qwen-vl-utils' `smart_resize` in vlft (data/video_sampling.py),
  which keeps a side under factor / 2 at one patch row; the processors round it to 0 first. Only frames thinner
  than half a patch row differ.
- Frame sampling: `do_sample_frames = True`, `fps` (`--fps`, default 2) or `num_frames` (`--nframes`, rounded to
  the temporal patch as vlft rounds it), `min_frames` rounded up and `max_frames` rounded down to the temporal
  patch (as vlft bounds the count). The frame *count* then equals vlft's for Qwen2-VL / Qwen2.5-VL when the
  container's duration is frames / fps (constant frame rate); Qwen3-VL's sampler does not round the count to the
  temporal patch (it pads the last frame instead), so an odd count gives one more temporal patch there. The frame
  *choice* differs for Qwen2-VL / Qwen2.5-VL: transformers takes `arange(0, N, N / n)`, vlft (qwen-vl-utils) takes
  `linspace(0, N - 1, n).round()`, Qwen3-VL's own rule, so equal counts give equal frames there. An `--nframes`
  above a video's frame count is lowered by vlft and refused by the processor; a video shorter than one temporal
  patch (one frame) is kept and padded by vlft, while the processors fail on it (Qwen2-VL's sampler counts 0
  frames and divides by it; Qwen3-VL's takes the frame and its resize refuses fewer frames than a temporal patch).
- No counterpart: `--frames_fps` (the rate vlft assumes for a folder or list of frame images: transformers does
  not sample frame lists at all). With `do_sample_frames = True` a caller that hands the processor frames it
  sampled itself passes `do_sample_frames=False`, as one must for any Qwen3-VL processor already.

The exact settings travel next to the processor too (vlft_args.json in a run, `MEDIA_FILE` in a merged model), and
vlft's own predict uses those, not the processor: it reproduces training exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from vlft.data.prepare import MediaSettings
from vlft.data.video_sampling import FPS
from vlft.errors import VlftError

# the MediaSettings fields, which are also the DataArguments (command-line) names of the media flags
MEDIA_FIELDS = tuple(f.name for f in dataclasses.fields(MediaSettings))


def _size(shortest: int, longest: int):
    from transformers.image_utils import SizeDict

    return SizeDict(shortest_edge=int(shortest), longest_edge=int(longest))


def _set_pixel_bounds(processor, shortest: int, longest: int) -> None:
    """`size`, and the older `min_pixels` / `max_pixels` attributes where an instance still carries them (saved
    with it, they would override `size` when it is loaded again)."""
    processor.size = _size(shortest, longest)
    for name, value in (("min_pixels", shortest), ("max_pixels", longest)):
        if name in vars(processor):
            setattr(processor, name, int(value))


def _solve(target: int, product) -> int | float:
    """The smallest number x (an int where one fits) with target <= product(x) < target + 1, `product` computing as
    the processor computes (its float rounding included): a budget that is one pixel off changes which frames get
    rescaled."""
    x = 1.0
    while product(x) < target:  # bracket, then bisect down to adjacent floats
        x *= 2
    lo, hi = 0.0, x
    while math.nextafter(lo, math.inf) < hi:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if product(mid) < target else (lo, mid)
    n = math.ceil(hi)
    return n if product(n) < target + 1 else hi


def _sampling(vp, media: MediaSettings) -> None:
    tps = vp.temporal_patch_size
    vp.do_sample_frames = True
    if media.nframes is not None:
        vp.num_frames, vp.fps = max(tps, round(media.nframes / tps) * tps), None
    else:
        vp.num_frames, vp.fps = None, FPS if media.fps is None else media.fps
    vp.min_frames = math.ceil(media.video_min_frames / tps) * tps
    vp.max_frames = max(tps, media.video_max_frames // tps * tps)


def _video_bounds(media: MediaSettings, factor: int) -> tuple[int, int]:
    from vlft.constants import DEFAULT_VIDEO_MAX_TOKENS, DEFAULT_VIDEO_MIN_TOKENS

    low = DEFAULT_VIDEO_MIN_TOKENS * factor**2 if media.video_min_pixels is None else media.video_min_pixels
    high = DEFAULT_VIDEO_MAX_TOKENS * factor**2 if media.video_max_pixels is None else media.video_max_pixels
    return low, high


def _per_frame_video(vp, media: MediaSettings) -> None:
    """Qwen2VLVideoProcessor (Qwen2-VL, Qwen2.5-VL): `size` bounds each frame."""
    factor = vp.patch_size * vp.merge_size
    low, high = _video_bounds(media, factor)
    _set_pixel_bounds(vp, low, high)
    if media.video_max_total_pixels is None:
        vp.cap_pixels_per_frame = False
    else:  # total budget = int(max_video_tokens * factor * factor * 0.9) in the processor
        vp.cap_pixels_per_frame = True
        vp.max_video_tokens = _solve(media.video_max_total_pixels, lambda x: x * factor * factor * 0.9)
    _sampling(vp, media)


def _per_clip_video(vp, media: MediaSettings) -> None:
    """Qwen3VLVideoProcessor: `size` bounds all frames together; with the cap, each frame gets
    max(min(max_video_tokens * factor**2, longest_edge // T), int(1.05 * shortest_edge))."""
    factor = vp.patch_size * vp.merge_size
    tps = vp.temporal_patch_size
    low, high = _video_bounds(media, factor)
    if media.video_max_total_pixels is not None:
        longest = media.video_max_total_pixels * tps
    else:  # no total budget: longest_edge // T must never bind, for any count the sampler can give
        longest = high * (max(media.video_max_frames, media.nframes or 0, tps) + tps)
    _set_pixel_bounds(vp, low, longest)
    vp.cap_pixels_per_frame = True
    vp.max_video_tokens = _solve(high, lambda x: x * factor * factor)
    _sampling(vp, media)


# video processor class -> how training's settings are written into it (see the module docstring)
VIDEO_PROCESSORS = {"Qwen2VLVideoProcessor": _per_frame_video, "Qwen3VLVideoProcessor": _per_clip_video}


def apply_media_settings(processor, media: MediaSettings):
    """Write `media` (training's pixel budgets and frame sampling) into `processor`'s image and video processors, in
    place; returns the processor. What maps exactly and what cannot is in the module docstring.

    Raises VlftError for a video processor class vlft has no mapping for (a new family: add it to
    VIDEO_PROCESSORS rather than save a processor that serves at other sizes than training's)."""
    _set_pixel_bounds(processor.image_processor, media.image_min_pixels, media.image_max_pixels)
    vp = getattr(processor, "video_processor", None)
    if vp is not None:
        apply = VIDEO_PROCESSORS.get(type(vp).__name__)
        if apply is None:
            raise VlftError(f"vlft cannot write its video settings into a {type(vp).__name__}; known: "
                            f"{', '.join(VIDEO_PROCESSORS)}")
        apply(vp, media)
    return processor


def media_record(media: MediaSettings) -> dict:
    """The settings as the JSON a merged model carries (keys: the media flags' names)."""
    return dataclasses.asdict(media)


def write_media_record(directory: str | os.PathLike, media: MediaSettings, extra: dict | None = None) -> Path:
    """Write MEDIA_FILE (vlft/run_dir.py) into `directory`, with `extra` flags that decide prompts too (the
    reasoning flags training set: predict renders prompts as training did); returns its path."""
    from vlft.run_dir import MEDIA_FILE

    path = Path(directory) / MEDIA_FILE
    path.write_text(json.dumps({**media_record(media), **(extra or {})}, indent=2, sort_keys=True))
    return path


def media_settings_from_args(args: dict, family) -> MediaSettings | None:
    """The media settings recorded in a run's vlft_args.json or a merged model's MEDIA_FILE, unset pixel budgets
    filled with `family`'s defaults as training filled them; None when `args` records none (a run saved before vlft
    recorded media settings)."""
    from vlft.config import DataArguments

    given = {name: args[name] for name in MEDIA_FIELDS if args.get(name) is not None}
    if not given:
        return None
    return DataArguments(**given).media_settings(family)
