"""Video files, folders of frames or lists of frame images -> uint8 RGB frames sampled and sized as Qwen-VL expects.

    clip = load_video("clip.mp4", fps=2.0, factor=28, total_pixels=20480 * 28 * 28)
    clip.frames         # [T, H, W, 3] uint8 RGB, T a multiple of temporal_patch_size, H and W multiples of factor
    clip.timestamps     # seconds from the first frame, one per frame (from pts: right for variable frame rate)
    clip.fps            # effective sampled rate T / duration: Qwen2.5-VL's second_per_grid_ts = 2 / clip.fps
    clip.indices        # source frame numbers (timestamp * source_fps): Qwen3-VL's VideoMetadata.frames_indices

Which frames and what size is the pure policy of video_sampling.py (qwen-vl-utils' rules); this module decodes.

Decoding (PyAV, imported only here, so image-only installs never need it) touches only what it keeps: for each
wanted time it seeks to the keyframe before it and decodes forward, unless the stream's index shows no keyframe
between the current position and the wanted time, in which case decoding simply continues (dense sampling decodes
the file once, sequentially). Memory is the output array plus the decoder's few reference frames and one full-size
RGB frame, whatever the video's length.

Resizing: every frame (video file, frame folder, frame list) is converted to RGB at its stored size, turned upright,
then resized by pixels.resize, the processors' own kernel (torchvision bicubic, antialiased, on uint8), so that the
pixels equal those of the model's video processor given the same frames, bit for bit
(tests/data/test_video_pixels.py). Resizing in swscale while converting (`VideoFrame.reformat`, used before) is
faster but differs from the processor's pixels (by under one level on average).

Why hand-written seeking rather than a library reader: bench/video_decode.py, 320x240 H.264 at 30 fps (keyframe
every 250 frames), frames resized to 308x224; ms per video, best of 5, 2 shared CPU cores, so
figures move by +-50% between runs:

    decoder          dense: 20 s, 128 frames   sparse: 600 s, 16 frames   folder: 300 JPEGs, 16 frames
    ours (PyAV)                 270                        377                       37
    hf-pyav                     439                      6 195                       n/a
    naive (all)                 638                     34 999                       n/a
    qwen-vl-utils               fails (*)                  fails (*)                155 (other size: resizes twice)
    torchcodec 0.17             fails (**)                 fails (**)                n/a

hf-pyav is transformers.video_utils.load_video(backend="pyav"), which decodes every frame up to the last wanted one;
naive decodes the whole file. Frames of both equal ours bit for bit once resized with our kernel. Dense sampling
costs the same either way (we decode sequentially too); seeking pays on sparse sampling of long videos (16x here).
(*) qwen_vl_utils.fetch_video: decord is not installed (not tried) and its torchvision backend calls torchvision.io.read_video,
which torchvision 0.29 no longer has. (**) torchcodec's wheel needs the system's FFmpeg shared libraries
(libavutil.so.56-60), absent on a clean machine (PyAV bundles its own), so it cannot be a dependency.

Rotation: the display matrix (phone videos) is applied, so frames come out as a player shows them (qwen-vl-utils'
decord and torchvision readers do not apply it). Flips in that matrix and non-square sample aspect ratios are
ignored.

Truncation: a file that ends before a wanted frame raises MediaError, judged against the container's complete
index where it has one (mp4, mov) and otherwise against its stated duration. MPEG-TS states no duration of its own
(FFmpeg estimates it from what is there), so a cut .ts file reads as a shorter video.

A folder of frames (image files sorted naturally by name: 2.png before 10.png) or a list of image paths is treated
as a video recorded at `frames_fps` frames per second (default 2, qwen-vl-utils' assumption for frame lists), then
sampled by the same rules; only the chosen images are read.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlft.data.media import MediaError, load_image
from vlft.data.pixels import image_to_tensor, resize
from vlft.data.video_sampling import (
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAMES_FPS,
    check_sampling,
    frame_indices,
    frame_size,
    plan_frames,
    sample_count,
)
from vlft.errors import VlftError

FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
_SEEK_GAP_S = 1.0  # without a usable index, seek when the next wanted frame is further ahead than this
_EPS = 1e-6


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video stream, checked against its first decoded frame."""

    path: str
    duration: float  # seconds
    fps: float  # average frame rate of the source
    frames: int  # frame count
    frames_estimated: bool  # True when the count is duration * fps, not a number the container stores
    width: int  # as displayed, i.e. after rotation
    height: int
    rotation: int  # degrees counter-clockwise applied to stored frames to show them upright: 0, 90, 180 or 270
    start: float  # time of the first frame in seconds; timestamps elsewhere are relative to it
    codec: str

    @property
    def last_time(self) -> float:
        """Expected time of the last frame, relative to the first (exact for constant frame rate)."""
        return max(0.0, self.duration - 1.0 / self.fps) if self.frames > 1 else 0.0


@dataclass
class VideoClip:
    """Sampled frames ready for a Qwen-VL video processor (pass do_sample_frames=False: they are sampled already)."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    timestamps: list[float]  # seconds from the first frame of the source, one per frame (padding repeats the last)
    indices: list[int]  # source frame numbers, round(timestamp * source_fps); the frame index itself for frame folders
    fps: float  # effective sampled fps = T / duration
    source_fps: float
    duration: float  # seconds
    padded: int = 0  # copies of the last frame appended to reach temporal_patch_size
    decoded: int = 0  # frames the decoder produced (a cost measure: far below the source count for sparse sampling)

    def second_per_grid_t(self, temporal_patch_size: int = 2) -> float:
        """Qwen2.5-VL's `second_per_grid_ts` entry for this video."""
        return temporal_patch_size / self.fps


@dataclass(frozen=True)
class VideoCheck:
    """What load_video would return, without the frames: enough to count tokens."""

    nframes: int
    height: int
    width: int
    fps: float  # effective sampled fps
    duration: float
    source_fps: float
    indices: tuple[int, ...] = ()  # source frame numbers (Qwen3-VL's timestamps are computed from them)


# --- PyAV ---


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a declared dependency
        raise VlftError("video support needs PyAV: pip install av") from e
    return av


def _open(path: Path):
    av = _av()
    if not path.exists():
        raise MediaError(f"video {path} does not exist")
    try:
        return av.open(str(path), metadata_errors="replace")
    except av.FFmpegError as e:
        raise MediaError(f"video {path} could not be opened: it is not a video file, or it is truncated or corrupt "
                         f"(FFmpeg: {_ffmpeg_reason(e)})") from e
    except OSError as e:
        raise MediaError(f"video {path} could not be read: {e}") from e


def _ffmpeg_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


class _Cursor:
    """Walks one video stream forward and hands out the decoded frame nearest to each wanted time.

    It seeks only when a keyframe lies between the last decoded frame and the wanted time (known from the stream's
    index when the container has one, otherwise guessed from the gap), so dense sampling decodes sequentially.
    Holds at most two decoded frames.
    """

    def __init__(self, container, stream):
        self.av = _av()
        self.container = container
        self.stream = stream
        self.tb = float(stream.time_base) if stream.time_base else 1e-6
        self.entries = stream.index_entries
        self.frames: Iterator | None = None
        self.prev: tuple[float, Any] | None = None  # last frame before the wanted time
        self.cur: tuple[float, Any] | None = None  # first frame at or after it
        self.eof = False
        self.error: str | None = None  # why decoding stopped early, if it did
        self.decoded = 0
        self.max_dts: int | None = None  # highest packet dts demuxed, to tell a cut file from a finished one
        self.read_to: int | None = None  # highest packet timestamp demuxed since the last seek
        self.delay = 0  # pts - dts of keyframes (B-frame reordering), in time_base units: the index holds dts
        self.rate = 25.0  # for frames without pts; set by the probe
        self.start = 0.0
        self.index_complete = False  # the index lists every frame (mp4, mov), not only some keyframes

    def _packets(self):
        for packet in self.container.demux(self.stream):
            if packet.size and packet.dts is not None:
                self.max_dts = packet.dts if self.max_dts is None else max(self.max_dts, packet.dts)
            stamp = packet.dts if packet.dts is not None else packet.pts
            if packet.size and stamp is not None:
                self.read_to = stamp if self.read_to is None else max(self.read_to, stamp)
            yield from packet.decode()

    def next(self) -> tuple[float, Any] | None:
        if self.eof:
            return None
        if self.frames is None:
            self.frames = self._packets()
        try:
            frame = next(self.frames, None)
        except self.av.FFmpegError as e:
            self.error, frame = _ffmpeg_reason(e), None
        if frame is None:
            self.eof = True
            return None
        self.decoded += 1
        last = self.cur or self.prev
        if frame.pts is not None and frame.time_base is not None:
            t = float(frame.pts * frame.time_base)
        else:  # raw streams may lack pts: count frames instead
            t = last[0] + 1.0 / self.rate if last else self.start
        return t, frame

    def position(self) -> float | None:
        last = self.cur or self.prev
        return last[0] if last else None

    def _should_seek(self, t: float) -> bool:
        pos = self.position()
        if pos is None:
            pos = self.start  # nothing decoded yet: the demuxer is at the start of the file
        if t <= pos + _EPS:
            return False
        n = len(self.entries)
        # Trust the index where it lists every frame (mp4) or reaches past t; matroska reads its index on the first
        # seek and otherwise lists only the keyframes demuxed so far. Seek only when the keyframe that shows t has
        # not been read yet: otherwise decoding on is never slower.
        if n > 1 and (self.index_complete or self.entries[n - 1].timestamp * self.tb >= t):
            k = self.entries.search_timestamp(int(t / self.tb) - self.delay, backward=True)
            if k >= 0:
                read_to = self.read_to if self.read_to is not None else self.entries[0].timestamp
                return self.entries[k].timestamp > read_to
        return t - pos > _SEEK_GAP_S

    def _seek(self, t: float) -> None:
        # Demuxers differ in whether they seek by pts or dts; when the first frame decoded is past the wanted time
        # (a keyframe whose dts precedes it but whose pts follows it, or a cut file), step back and seek again.
        offset, first = t, None
        for _ in range(8):
            try:
                # FFmpeg's demuxers seek by pts here (mov corrects its dts index), unlike search_timestamp above
                self.container.seek(int(offset / self.tb), stream=self.stream, backward=True)
            except self.av.FFmpegError as e:
                self.error, self.eof = _ffmpeg_reason(e), True
                return
            self.frames, self.prev, self.cur, self.eof, self.error, self.read_to = None, None, None, False, None, None
            first = self.next()
            if offset <= self.start or (first is not None and first[0] <= t + _EPS):
                break
            offset -= max(1.0, 2 * (first[0] - t)) if first else max(1.0, offset - self.start) / 2
        self.cur = first

    def nearest(self, t: float) -> tuple[float, Any] | None:
        """The decoded frame nearest to absolute time t (None if there are no frames at all)."""
        if self._should_seek(t):
            self._seek(t)
        while True:
            if self.cur is None:
                self.cur = self.next()
                if self.cur is None:
                    break
            if self.cur[0] >= t - _EPS:
                break
            self.prev, self.cur = self.cur, None
        options = [f for f in (self.prev, self.cur) if f is not None]
        return min(options, key=lambda f: abs(f[0] - t)) if options else None

    def reached_index_end(self) -> bool | None:
        """Whether the demuxer read the last packet the container's index lists (None: no full index)."""
        if not self.index_complete or self.max_dts is None:
            return None
        return self.max_dts >= self.entries[len(self.entries) - 1].timestamp


def _video_stream(container, path: Path):
    cover = _av().stream.Disposition.attached_pic  # an audio file's cover art shows up as a one-frame video stream
    streams = [s for s in container.streams.video if not s.disposition & cover]
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        has = f"only {', '.join(kinds)} streams" if kinds else "no streams"
        raise MediaError(f"video {path} has no video stream ({has}); is it an audio file?")
    return streams[0]


def _probe(container, path: Path) -> tuple[VideoInfo, _Cursor]:
    stream = _video_stream(container, path)
    cursor = _Cursor(container, stream)
    tb = stream.time_base
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / 1_000_000
    else:
        duration = 0.0
    frames = stream.frames or 0
    cursor.rate = fps or 25.0
    cursor.start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    if len(cursor.entries) and stream.start_time is not None:
        cursor.delay = max(0, stream.start_time - cursor.entries[0].timestamp)

    first = cursor.next()
    if first is None:
        why = f" (FFmpeg: {cursor.error})" if cursor.error else ""
        raise MediaError(f"video {path} has no decodable frames{why}; it is empty, truncated or corrupt")
    cursor.cur = first
    cursor.start = first[0]
    rotation = round(first[1].rotation / 90) * 90 % 360
    height, width = first[1].height, first[1].width
    if rotation in (90, 270):
        height, width = width, height

    estimated = False
    if frames <= 0 or duration <= 0 or fps <= 0:
        if duration > 0 and fps > 0:
            frames, estimated = max(1, round(duration * fps)), True
        elif frames > 0 and fps > 0:
            duration = frames / fps
        else:
            frames, duration = _count_frames(container, stream, path)
            fps = frames / duration
            cursor.frames, cursor.prev, cursor.cur, cursor.eof, cursor.read_to = None, None, None, False, None
            container.seek(0, stream=stream, backward=True)
    cursor.index_complete = len(cursor.entries) >= max(2, frames) and not estimated
    info = VideoInfo(path=str(path), duration=duration, fps=fps, frames=frames, frames_estimated=estimated,
                     width=width, height=height, rotation=rotation, start=cursor.start, codec=stream.codec_context.name)
    return info, cursor


def _count_frames(container, stream, path: Path) -> tuple[int, float]:
    """Frame count and duration when the container states neither: read every packet (timestamps), no decoding."""
    av = _av()
    container.seek(0, stream=stream, backward=True)
    count, first, end = 0, None, None
    try:
        for packet in container.demux(stream):
            if not packet.size:
                continue
            count += 1
            if packet.pts is not None:
                t = float(packet.pts * packet.time_base)
                first = t if first is None else min(first, t)
                stop = t + float((packet.duration or 0) * packet.time_base)
                end = stop if end is None else max(end, stop)
    except av.FFmpegError as e:
        raise MediaError(f"video {path} could not be read to its end (FFmpeg: {_ffmpeg_reason(e)}); it is truncated "
                         "or corrupt") from e
    if count == 0:
        raise MediaError(f"video {path} has no frames")
    if first is None or end is None or end <= first:
        return count, count / 25.0  # no timing at all: FFmpeg's own default rate
    return count, end - first


def probe_video(path: str | Path) -> VideoInfo:
    """Duration, frame rate, frame count, size and rotation from stream metadata (the first frame is decoded to check
    the file and read its rotation; the whole stream's packets are read only when the container gives no length)."""
    path = Path(path)
    av = _av()
    with _open(path) as container:
        try:
            return _probe(container, path)[0]
        except av.FFmpegError as e:
            raise MediaError(f"video {path} could not be read (FFmpeg: {_ffmpeg_reason(e)}); it is truncated or "
                             "corrupt") from e


def _grab(cursor: _Cursor, info: VideoInfo, targets: Sequence[float], path: Path,
          what: str = "frames to sample") -> Iterator[tuple[float, Any]]:
    """Yield (time relative to the first frame, av.VideoFrame) nearest to each target; raise if the file ends first."""
    frame_s = 1.0 / info.fps
    tol = 3 * frame_s + 0.01 * info.duration  # how far before the stated end a stream without a full index may stop
    rel = 0.0
    for i, t in enumerate(targets):
        got = cursor.nearest(info.start + t)
        if got is not None:
            rel = got[0] - info.start
        if got is None or (cursor.eof and t - rel > 1.5 * frame_s):  # the stream ended before this wanted time
            index_end = cursor.reached_index_end()
            if got is None or cursor.error or index_end is False or (index_end is None and t - rel > tol):
                why = f" (FFmpeg: {cursor.error})" if cursor.error else ""
                raise MediaError(
                    f"video {path} is truncated or corrupt: decoding stopped at {rel:.2f} s of the {info.duration:.2f} "
                    f"s its container states{why}, so only {i} of the {len(targets)} {what} could be read; "
                    "re-encode or replace the file")
        yield rel, got[1]


def _fit(image: torch.Tensor, height: int, width: int, out: np.ndarray) -> None:
    """Write the uint8 [3, h, w] frame into out [height, width, 3] with the processors' resize kernel
    (pixels.resize: torchvision bicubic, antialiased, on uint8), the one kernel every frame and image goes through."""
    out[...] = resize(image, height, width).permute(1, 2, 0).numpy()


def _to_array(frame, height: int, width: int, rotation: int, out: np.ndarray) -> None:
    """Write the frame as displayed (turned upright) into out [height, width, 3]: decode to RGB at its stored size,
    turn it, then resize. Resizing after turning keeps the kernel's passes on the displayed axes, as a processor
    given the upright frame resizes it."""
    rgb = frame.to_ndarray(format="rgb24")
    if rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, rotation // 90))
    _fit(torch.from_numpy(rgb).permute(2, 0, 1), height, width, out)


def _decode_file(path: Path, *, keep: bool, every: bool, fps, nframes, min_frames, max_frames, min_pixels,
                 max_pixels, total_pixels, factor, temporal_patch_size) -> tuple[VideoClip, int]:
    av = _av()
    with _open(path) as container:
        try:
            info, cursor = _probe(container, path)
            plan = plan_frames(info.frames, info.duration, info.last_time, fps=fps, nframes=nframes,
                               min_frames=min_frames, max_frames=max_frames, temporal_patch_size=temporal_patch_size)
            try:
                height, width = frame_size(info.height, info.width, plan.nframes, factor=factor, min_pixels=min_pixels,
                                           max_pixels=max_pixels, total_pixels=total_pixels,
                                           temporal_patch_size=temporal_patch_size)
            except MediaError as e:
                raise MediaError(f"video {path}: {e}") from e
            targets = plan.targets if every or len(plan.targets) < 3 else (plan.targets[0], plan.targets[-1])
            frames = np.empty((plan.nframes if keep else 0, height, width, 3), np.uint8)
            times = []
            what = "frames to sample" if len(targets) == len(plan.targets) else "frames checked (first and last)"
            for i, (t, frame) in enumerate(_grab(cursor, info, targets, path, what)):
                times.append(t)
                if keep:
                    _to_array(frame, height, width, info.rotation, frames[i])
        except av.FFmpegError as e:  # seeking/decoding failures the cursor did not absorb
            raise MediaError(f"video {path} could not be decoded (FFmpeg: {_ffmpeg_reason(e)}); it is truncated or "
                             "corrupt") from e
    if keep and plan.pad:
        frames[len(times):] = frames[len(times) - 1]
    times += [times[-1]] * plan.pad
    clip = VideoClip(frames=frames, timestamps=times, indices=[round(t * info.fps) for t in times], fps=plan.fps,
                     source_fps=info.fps, duration=info.duration, padded=plan.pad, decoded=cursor.decoded)
    return clip, plan.nframes


# --- frame folders and lists ---


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The frame images of a folder (sorted naturally by file name) or of a list, as given."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        paths = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")),
                       key=lambda p: _natural_key(p.name))
        if not paths:
            raise MediaError(f"video folder {folder} holds no frame images ({', '.join(sorted(FRAME_SUFFIXES))})")
        return paths
    paths = [Path(p) for p in source]
    if not paths:
        raise MediaError("video frame list is empty")
    return paths


def _decode_frames(paths: list[Path], *, keep: bool, every: bool, frames_fps: float, fps, nframes, min_frames,
                   max_frames, min_pixels, max_pixels, total_pixels, factor, temporal_patch_size) -> tuple[VideoClip, int]:
    total = len(paths)
    duration = total / frames_fps
    real, pad = sample_count(total, duration, fps=fps, nframes=nframes, min_frames=min_frames, max_frames=max_frames,
                             temporal_patch_size=temporal_patch_size)
    indices = frame_indices(total, real)
    chosen = indices if every or len(indices) < 3 else [indices[0], indices[-1]]
    first = load_image(paths[chosen[0]])
    try:
        height, width = frame_size(first.height, first.width, real + pad, factor=factor, min_pixels=min_pixels,
                                   max_pixels=max_pixels, total_pixels=total_pixels,
                                   temporal_patch_size=temporal_patch_size)
    except MediaError as e:
        raise MediaError(f"video frame {paths[chosen[0]]}: {e}") from e
    frames = np.empty((real + pad if keep else 0, height, width, 3), np.uint8)
    for k, i in enumerate(chosen):
        img = first if k == 0 else load_image(paths[i])
        if keep:  # frames of other sizes are stretched to the first one's size: a video has one size
            _fit(image_to_tensor(img), height, width, frames[k])
    if keep and pad:
        frames[real:] = frames[real - 1]
    chosen += [chosen[-1]] * pad
    clip = VideoClip(frames=frames, timestamps=[i / frames_fps for i in chosen], indices=chosen,
                     fps=(real + pad) / duration, source_fps=frames_fps, duration=duration, padded=pad,
                     decoded=len(set(chosen)))
    return clip, real + pad


# --- public entry points ---


def _load(source, *, keep: bool, every: bool, frames_fps: float, **kw) -> tuple[VideoClip, int]:
    check_sampling(fps=kw["fps"], nframes=kw["nframes"], min_frames=kw["min_frames"], max_frames=kw["max_frames"],
                   frames_fps=frames_fps, temporal_patch_size=kw["temporal_patch_size"])  # before touching any file
    if isinstance(source, (list, tuple)):
        return _decode_frames(frame_paths(source), keep=keep, every=every, frames_fps=frames_fps, **kw)
    path = Path(source)
    if path.is_dir():
        return _decode_frames(frame_paths(path), keep=keep, every=every, frames_fps=frames_fps, **kw)
    return _decode_file(path, keep=keep, every=every, **kw)


def load_video(source: str | Path | Sequence[str | Path], *, fps: float | None = None, nframes: int | None = None,
               min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES, min_pixels: int | None = None,
               max_pixels: int | None = None, total_pixels: int | None = None, factor: int,
               temporal_patch_size: int = 2, frames_fps: float = FRAMES_FPS) -> VideoClip:
    """Sample and size a video for a Qwen-VL model (rules in the module docstring).

    source: a video file, a folder of frame images, or a list of frame image paths (both taken as a video at
    `frames_fps`). fps or nframes (default fps=2); min/max_frames bound the fps count; min/max_pixels bound each frame
    (defaults 128 and 768 * factor**2); total_pixels bounds the whole clip; factor is patch_size * merge_size (28 for
    Qwen2/2.5-VL, 32 for Qwen3-VL). Raises MediaError for a file that cannot be used, VlftError for bad settings.
    """
    return _load(source, keep=True, every=True, frames_fps=frames_fps, fps=fps, nframes=nframes,
                 min_frames=min_frames, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels,
                 total_pixels=total_pixels, factor=factor, temporal_patch_size=temporal_patch_size)[0]


def check_video(source: str | Path | Sequence[str | Path], *, fps: float | None = None, nframes: int | None = None,
                min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES, min_pixels: int | None = None,
                max_pixels: int | None = None, total_pixels: int | None = None, factor: int,
                temporal_patch_size: int = 2, frames_fps: float = FRAMES_FPS, thorough: bool = True) -> VideoCheck:
    """The frame count and size load_video would produce, for a start-up data check; keeps no frames.

    Decodes every frame that would be sampled (thorough=True), or only the first and last (faster; still catches
    missing, unreadable and cut files, not damage in the middle). Same arguments and errors as load_video.
    """
    clip, nframes = _load(source, keep=False, every=thorough, frames_fps=frames_fps, fps=fps, nframes=nframes,
                 min_frames=min_frames, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels,
                 total_pixels=total_pixels, factor=factor, temporal_patch_size=temporal_patch_size)
    return VideoCheck(nframes=nframes, height=clip.frames.shape[1], width=clip.frames.shape[2],
                      fps=clip.fps, duration=clip.duration, source_fps=clip.source_fps, indices=tuple(clip.indices))
