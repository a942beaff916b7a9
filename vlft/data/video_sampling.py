"""How many video frames to take, which ones, and at what size: the pure policy, no I/O (decoding is in video.py).

Sampling and pixel budgets follow qwen-vl-utils (`smart_nframes`, `fetch_video`), written anew:
- `fps` (default 2) or `nframes`, never both; the count is bounded by min_frames / max_frames and by the frames the
  video has, then rounded to a multiple of temporal_patch_size. Frames are spread evenly from the first frame to the
  last one, as qwen-vl-utils' `linspace(0, total - 1, n).round()` does for constant frame rate video; a decoder
  takes, for each wanted time, the decoded frame nearest to it.
- A video with fewer frames than one temporal patch (a single frame) is kept and its last frame repeated up to
  temporal_patch_size, as the Qwen processors pad a short frame list; `FramePlan.pad` counts the copies.
- Frame size: `frame_size`, with per-frame max = min(max_pixels, max(min(max_pixels, total_pixels / T *
  temporal_patch_size), 1.05 * min_pixels)). total_pixels therefore bounds (T / temporal_patch_size) * H * W, i.e.
  the video's tokens are at most total_pixels / factor**2, except that min_pixels wins when the two disagree (as in
  qwen-vl-utils). Unlike qwen-vl-utils, an explicit max_pixels is not capped at 768 * factor**2 (that is only the
  default).

`check_sampling` is the one check of the sampling flags: `DataArguments` (vlft/config.py) calls it when the flags are
parsed, and `sample_count` calls it again with the model's temporal patch size; its messages name the command-line
flags (--fps, --nframes, --video_min_frames, --video_max_frames, --frames_fps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlft.constants import DEFAULT_VIDEO_MAX_TOKENS, DEFAULT_VIDEO_MIN_TOKENS
from vlft.data.media import MAX_ASPECT_RATIO, MediaError
from vlft.errors import VlftError

# qwen_vl_utils.vision_process defaults
FPS = 2.0  # frames sampled per second of video when neither fps nor nframes is given
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
FRAMES_FPS = 2.0  # assumed recording rate (frames per second) of a folder or list of frame images
TEMPORAL_PATCH_SIZE = 2  # every Qwen-VL family's; the model's own value is passed where it is known


@dataclass(frozen=True)
class FramePlan:
    """Which frames to take: `len(targets)` distinct wanted times, then `pad` copies of the last frame."""

    nframes: int  # frames in the clip, padding included; a multiple of temporal_patch_size
    targets: tuple[float, ...]  # wanted times (seconds from the first frame), ascending
    pad: int
    fps: float  # effective sampled rate nframes / duration, in frames per second


def check_sampling(*, fps: float | None = None, nframes: int | None = None, min_frames: int = FPS_MIN_FRAMES,
                   max_frames: int = FPS_MAX_FRAMES, frames_fps: float = FRAMES_FPS,
                   temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> None:
    """Raise VlftError, naming the flags, for sampling settings no video could satisfy.

    max_frames must reach one temporal patch (temporal_patch_size frames), since the count is rounded down to a
    multiple of it: qwen-vl-utils' `smart_nframes` refuses the same settings.
    """
    if fps is not None and nframes is not None:
        raise VlftError(f"--fps {fps} and --nframes {nframes} both choose how many frames to sample; give only one")
    if fps is not None and not fps > 0:
        raise VlftError(f"--fps must be positive, got {fps}")
    if nframes is not None and nframes < 1:
        raise VlftError(f"--nframes must be at least 1, got {nframes}")
    if not frames_fps > 0:
        raise VlftError(f"--frames_fps must be positive, got {frames_fps}")
    if temporal_patch_size < 1:
        raise VlftError(f"temporal_patch_size must be at least 1, got {temporal_patch_size}")
    if min_frames < 1:
        raise VlftError(f"--video_min_frames must be at least 1, got {min_frames}")
    if max_frames < max(min_frames, temporal_patch_size):
        raise VlftError(f"--video_max_frames ({max_frames}) must be at least --video_min_frames ({min_frames}) and "
                        f"the model's temporal patch size ({temporal_patch_size} frames, the fewest a video can give)")


def sample_count(total_frames: int, duration: float, *, fps: float | None = None, nframes: int | None = None,
                 min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES,
                 temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[int, int]:
    """(frames to decode, copies of the last one to append). Their sum is a multiple of temporal_patch_size.

    duration in seconds. Never more frames than the video has: an `nframes` above that is lowered to the largest
    multiple that fits.
    """
    check_sampling(fps=fps, nframes=nframes, min_frames=min_frames, max_frames=max_frames,
                   temporal_patch_size=temporal_patch_size)
    tps = temporal_patch_size
    if total_frames < tps:  # too short for one temporal patch: all of it, then padding
        return total_frames, tps - total_frames
    if nframes is not None:
        n = max(tps, round(nframes / tps) * tps)
    else:
        rate = FPS if fps is None else fps
        lo = math.ceil(min_frames / tps) * tps
        hi = math.floor(min(max_frames, total_frames) / tps) * tps
        n = math.floor(min(max(duration * rate, lo), hi) / tps) * tps
    return min(n, total_frames // tps * tps), 0


def plan_frames(total_frames: int, duration: float, last_time: float, *, fps: float | None = None,
                nframes: int | None = None, min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES,
                temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> FramePlan:
    """Wanted times (seconds) spread evenly over [0, last_time], the first and last frame included."""
    real, pad = sample_count(total_frames, duration, fps=fps, nframes=nframes, min_frames=min_frames,
                             max_frames=max_frames, temporal_patch_size=temporal_patch_size)
    targets = tuple(float(t) for t in np.linspace(0.0, last_time, real)) if real > 1 else (0.0,)
    return FramePlan(nframes=real + pad, targets=targets, pad=pad, fps=(real + pad) / duration)


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frame numbers spread evenly over 0..total-1, qwen-vl-utils' `linspace(0, total - 1, n).round()`."""
    return [int(i) for i in np.linspace(0, total - 1, count).round()] if count > 1 else [0]


def frame_size(height: int, width: int, nframes: int, *, factor: int, min_pixels: int | None = None,
               max_pixels: int | None = None, total_pixels: int | None = None,
               temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[int, int]:
    """(height, width) in pixels shared by all frames of a clip of nframes frames (rule in the module docstring)."""
    min_p = DEFAULT_VIDEO_MIN_TOKENS * factor**2 if min_pixels is None else min_pixels
    max_p = DEFAULT_VIDEO_MAX_TOKENS * factor**2 if max_pixels is None else max_pixels
    if min_p > max_p:
        raise VlftError(f"--video_min_pixels ({min_p}) is larger than --video_max_pixels ({max_p}); lower it")
    cap = max_p if total_pixels is None else min(max_p, total_pixels / nframes * temporal_patch_size)
    cap = min(max_p, max(cap, int(min_p * 1.05)))
    return _qwen_vl_utils_resize(height, width, factor=factor, min_pixels=min_p, max_pixels=cap)


def _qwen_vl_utils_resize(height: int, width: int, *, factor: int, min_pixels: float,
                          max_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize`, the rule `fetch_video` sizes frames with, plus one clamp.

    Frames keep this rule rather than transformers' `smart_resize` (which images use, media.smart_size) because
    qwen-vl-utils is where Qwen's video recipe sizes frames, and the two differ for a side under factor / 2:
    qwen-vl-utils rounds it up to one patch row (factor) first, transformers rounds it to 0 and then scales the whole
    frame up to min_pixels. The clamp: where the pixel cap floors a very thin side to 0, keep one patch row, as
    transformers does (qwen-vl-utils would return a 0-pixel side).
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"frame size {width}x{height} (width x height) is empty")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"frame size {width}x{height} (width x height) has an aspect ratio over "
                         f"{MAX_ASPECT_RATIO}, Qwen-VL's limit; crop or pad the video")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def video_token_count(nframes: int, height: int, width: int, *, patch_size: int, merge_size: int,
                      temporal_patch_size: int) -> int:
    """Video pad tokens for frames already sized by frame_size (height, width multiples of patch_size * merge_size).

    A frame count that is not a multiple of temporal_patch_size is counted as the processors pad it (rounded up);
    load_video always returns multiples.
    """
    grid_t = -(-nframes // temporal_patch_size)
    return grid_t * (height // patch_size) * (width // patch_size) // merge_size**2
