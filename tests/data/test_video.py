"""Video sampling, sizing and decoding (vlft.data.video), on tiny videos written here with PyAV.

Frames carry their own index as a 4x4 grid of black/white blocks (16 bits), which survives compression and resizing,
so each test can read back exactly which source frames were decoded.
"""
import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils.vision_process import smart_nframes, smart_resize

from vlft.data.media import MediaError
from vlft.data.video import check_video, frame_paths, load_video, probe_video
from vlft.data.video_sampling import FPS_MAX_FRAMES, FPS_MIN_FRAMES, frame_size, sample_count, video_token_count
from vlft.errors import VlftError

EXAMPLES = Path(__file__).resolve().parents[2] / "data_examples" / "videos"
SMALL = dict(factor=28, min_pixels=28 * 28, max_pixels=4 * 28 * 28)  # 32x32 sources stay at 28x28


# --- helpers ---


def bits_frame(i: int, width: int = 32, height: int = 32) -> np.ndarray:
    a = np.zeros((height, width, 3), np.uint8)
    for b in range(16):
        if (i >> b) & 1:
            r, c = divmod(b, 4)
            a[r * height // 4:(r + 1) * height // 4, c * width // 4:(c + 1) * width // 4] = 255
    return a


def read_bits(frame: np.ndarray) -> int:
    h, w = frame.shape[:2]
    value = 0
    for b in range(16):
        r, c = divmod(b, 4)
        if frame[int((r + 0.5) * h / 4), int((c + 0.5) * w / 4)].mean() > 128:
            value |= 1 << b
    return value


def write_video(path: Path, n: int, fps: float = 8, size=(32, 32), *, pts_ms=None, rotation=None, codec="libx264",
                options=None, container_options=None, frame_fn=bits_frame) -> Path:
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        s.options = {"crf": "10", "g": "10", **(options or {})} if codec == "libx264" else dict(options or {})
        if rotation is not None:
            s.set_display_rotation(rotation)
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_fn(i, *size), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_audio(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    return path


def decoded_indices(clip) -> list[int]:
    return [read_bits(f) for f in clip.frames]


def assert_nearest(got: list[int], total: int, n: int) -> None:
    """Each decoded index is the one nearest to qwen-vl-utils' linspace(0, total - 1, n) (either side of a tie)."""
    wanted = np.linspace(0, total - 1, n) if n > 1 else np.zeros(1)
    assert len(got) == len(wanted)
    for g, w in zip(got, wanted):
        assert abs(g - w) <= 0.5 + 1e-6, (got, wanted.tolist())


# (frames, source fps)
VIDEOS = {"f2": (2, 8), "f9": (9, 3), "f16": (16, 8), "f30": (30, 30), "f45": (45, 15), "long": (240, 2)}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    return {name: write_video(folder / f"{name}.mp4", n, fps) for name, (n, fps) in VIDEOS.items()}


# --- sampling counts (pure) ---


@pytest.mark.parametrize("total", [2, 3, 5, 8, 16, 31, 120, 240, 1000, 2000])
@pytest.mark.parametrize("src_fps", [1, 2, 8, 25, 30])
@pytest.mark.parametrize("fps", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("bounds", [(FPS_MIN_FRAMES, FPS_MAX_FRAMES), (8, 16), (2, 4), (5, 11)])
def test_fps_count_matches_qwen_vl_utils(total, src_fps, fps, bounds):
    lo, hi = bounds
    ele = {"fps": fps, "min_frames": lo, "max_frames": hi}
    try:
        expected = smart_nframes(ele, total_frames=total, video_fps=src_fps)
    except ValueError:  # qwen-vl-utils gives up below 2 frames; we cannot get there with total >= 2
        pytest.fail("qwen-vl-utils refused a count")
    real, pad = sample_count(total, total / src_fps, fps=fps, min_frames=lo, max_frames=hi)
    assert (real, pad) == (expected, 0)
    assert real % 2 == 0 and 2 <= real <= total


@pytest.mark.parametrize("total", [2, 3, 9, 16, 240])
@pytest.mark.parametrize("nframes", [1, 2, 3, 4, 7, 16, 100, 1000])
def test_nframes_count(total, nframes):
    real, pad = sample_count(total, total / 2, nframes=nframes)
    if round(nframes / 2) * 2 <= total and nframes >= 2:
        assert real == smart_nframes({"nframes": nframes}, total_frames=total, video_fps=2)
    assert real == min(max(2, round(nframes / 2) * 2), total // 2 * 2)  # clamped to what the video has
    assert pad == 0 and real % 2 == 0


@pytest.mark.parametrize("tps", [1, 2, 3, 4])
def test_count_multiple_of_temporal_patch(tps):
    for total in range(1, 40):
        for kwargs in ({"fps": 2.0}, {"fps": 0.3}, {"nframes": 5}, {"nframes": 50}):
            real, pad = sample_count(total, total / 4, temporal_patch_size=tps, max_frames=max(tps, 768), **kwargs)
            assert (real + pad) % tps == 0 and real <= total
            assert pad == (tps - total if total < tps else 0)


def test_min_max_frames_honoured():
    assert sample_count(1000, 500.0, fps=2.0, max_frames=64) == (64, 0)
    assert sample_count(1000, 500.0, fps=2.0, max_frames=65) == (64, 0)  # rounded down to a multiple
    assert sample_count(1000, 1.0, fps=2.0, min_frames=16) == (16, 0)
    assert sample_count(1000, 1.0, fps=2.0, min_frames=15) == (16, 0)  # rounded up
    assert sample_count(10, 1.0, fps=2.0, min_frames=16) == (10, 0)  # never more than the video has


def test_fps_and_nframes_together_names_both_flags(videos):
    with pytest.raises(VlftError, match="--fps") as e:
        load_video(videos["f16"], fps=2.0, nframes=4, **SMALL)
    assert "--nframes" in str(e.value) and not isinstance(e.value, MediaError)


@pytest.mark.parametrize("kwargs, flag", [({"fps": 0}, "--fps"), ({"nframes": 0}, "--nframes"),
                                          ({"min_frames": 8, "max_frames": 4}, "--video_max_frames"),
                                          ({"max_frames": 1}, "--video_max_frames"),
                                          ({"min_frames": 0}, "--video_min_frames")])
def test_bad_sampling_settings(kwargs, flag):
    with pytest.raises(VlftError, match=flag):
        sample_count(100, 10.0, **kwargs)


def test_sampling_errors_name_the_real_flags(tmp_path):
    """--video_min_frames 1 --video_max_frames 1 cannot give one temporal patch (2 frames): the message names the
    flags a user can pass, from the command line (config.py) and from the loader alike, and no flag that is not one."""
    from vlft.config import DataArguments, parse_args

    with pytest.raises(VlftError) as e:
        parse_args((DataArguments,), ["--video_min_frames", "1", "--video_max_frames", "1"])
    message = str(e.value)
    assert "--video_max_frames (1)" in message and "--video_min_frames (1)" in message
    assert "temporal patch size (2 frames" in message
    assert "--max_frames" not in message and "--min_frames" not in message
    with pytest.raises(VlftError) as loader:
        load_video(tmp_path, min_frames=1, max_frames=1, **SMALL)
    assert str(loader.value) == message  # one check, one message
    with pytest.raises(VlftError, match="--frames_fps must be positive, got 0"):
        parse_args((DataArguments,), ["--frames_fps", "0"])
    with pytest.raises(VlftError, match=r"--fps 1.0 and --nframes 8 both choose"):
        parse_args((DataArguments,), ["--fps", "1", "--nframes", "8"])


# --- pixel budgets (pure) ---

SIZES = [(32, 32), (48, 64), (240, 320), (1080, 1920), (1920, 1080), (720, 1280), (100, 3000), (57, 91)]


@pytest.mark.parametrize("factor", [28, 32])
@pytest.mark.parametrize("nframes", [2, 4, 16, 64, 768])
@pytest.mark.parametrize("total_pixels", [None, 2048 * 28 * 28, 24576 * 28 * 28, 16384 * 32 * 32, 4096 * 32 * 32])
def test_frame_size_budgets(factor, nframes, total_pixels):
    min_p, max_p = 128 * factor**2, 768 * factor**2
    for h, w in SIZES:
        fh, fw = frame_size(h, w, nframes, factor=factor, total_pixels=total_pixels)
        assert fh % factor == 0 and fw % factor == 0
        assert fh * fw <= max_p
        per_frame_budget = max_p if total_pixels is None else total_pixels / nframes * 2
        if per_frame_budget >= min_p * 1.05:  # min_pixels wins otherwise, as in qwen-vl-utils
            assert nframes / 2 * fh * fw <= (total_pixels or math.inf)
        # qwen-vl-utils' fetch_video rule, with its own smart_resize
        qwen_total = total_pixels if total_pixels is not None else math.inf
        qwen_max = min(max_p, max(min(768 * factor**2, qwen_total / nframes * 2), int(min_p * 1.05)))
        assert (fh, fw) == tuple(max(factor, s) for s in smart_resize(h, w, factor, min_p, qwen_max)), (h, w)


@pytest.mark.parametrize("factor", [28, 32])
def test_frame_size_explicit_bounds(factor):
    fh, fw = frame_size(1080, 1920, 8, factor=factor, min_pixels=factor**2, max_pixels=100 * factor**2)
    assert fh * fw <= 100 * factor**2 and fh % factor == 0 and fw % factor == 0
    big = frame_size(1080, 1920, 8, factor=factor, min_pixels=factor**2, max_pixels=2000 * factor**2)
    assert big[0] * big[1] > 768 * factor**2  # an explicit max_pixels is not capped at qwen-vl-utils' default
    with pytest.raises(VlftError, match="min_pixels"):
        frame_size(100, 100, 4, factor=factor, min_pixels=200 * factor**2, max_pixels=100 * factor**2)


# --- decoding files ---


@pytest.mark.parametrize("name", list(VIDEOS))
@pytest.mark.parametrize("mode", [{}, {"fps": 1.0}, {"fps": 4.5}, {"nframes": 4}, {"nframes": 7}, {"nframes": 1000}])
def test_load_video_frames_and_timestamps(videos, name, mode):
    total, src_fps = VIDEOS[name]
    clip = load_video(videos[name], **mode, **SMALL)
    real, pad = sample_count(total, total / src_fps, **mode)
    n = clip.frames.shape[0]
    assert (n, pad) == (real, 0) and clip.padded == 0
    assert n % 2 == 0 and 2 <= n <= total
    assert clip.frames.shape[1:] == (28, 28, 3) and clip.frames.dtype == np.uint8
    got = decoded_indices(clip)
    assert_nearest(got, total, n)
    assert clip.timestamps == sorted(clip.timestamps) and len(set(clip.timestamps)) == n
    assert 0 <= clip.timestamps[0] and clip.timestamps[-1] <= clip.duration
    assert clip.timestamps == pytest.approx([i / src_fps for i in got], abs=1e-3)
    assert clip.indices == got
    assert clip.duration == pytest.approx(total / src_fps)
    assert clip.source_fps == pytest.approx(src_fps)
    assert clip.fps == pytest.approx(n / clip.duration)
    assert clip.second_per_grid_t() == pytest.approx(2 / clip.fps)


def test_long_video_decodes_only_what_it_keeps(videos):
    sparse = load_video(videos["long"], nframes=4, **SMALL)  # keyframe every 10 frames: each seek decodes <= 10
    assert_nearest(decoded_indices(sparse), 240, 4)
    assert sparse.decoded < 50
    dense = load_video(videos["long"], fps=2.0, **SMALL)  # every frame wanted: one sequential pass, no re-decoding
    assert dense.frames.shape[0] == 240 and decoded_indices(dense) == list(range(240))
    assert dense.decoded == 240


def test_mpeg4_and_matroska(tmp_path):
    for path in (write_video(tmp_path / "a.mp4", 24, 6, codec="mpeg4", options={"qscale": "2", "g": "6"}),
                 write_video(tmp_path / "a.mkv", 24, 6)):
        clip = load_video(path, nframes=6, **SMALL)
        assert_nearest(decoded_indices(clip), 24, 6)
        assert clip.timestamps == pytest.approx([i / 6 for i in decoded_indices(clip)], abs=1e-3)


def test_one_frame_video_is_padded(tmp_path):
    path = write_video(tmp_path / "one.mp4", 1, 8)
    info = probe_video(path)
    assert info.frames == 1
    for mode in ({}, {"nframes": 4}, {"fps": 0.5}):
        clip = load_video(path, **mode, **SMALL)
        assert clip.frames.shape[0] == 2 and clip.padded == 1
        assert decoded_indices(clip) == [0, 0] and np.array_equal(clip.frames[0], clip.frames[1])
        assert clip.timestamps == [0.0, 0.0] and clip.indices == [0, 0]
        assert clip.fps == pytest.approx(2 / clip.duration)
    assert load_video(path, temporal_patch_size=4, **SMALL).frames.shape[0] == 4


def test_two_frame_video(videos):
    clip = load_video(videos["f2"], nframes=8, **SMALL)
    assert decoded_indices(clip) == [0, 1] and clip.padded == 0


def test_variable_frame_rate_uses_pts(tmp_path):
    pts_ms = [0, 100, 150, 600, 1000, 1050, 1800, 2000, 2100, 2900]
    path = write_video(tmp_path / "vfr.mp4", len(pts_ms), 10, pts_ms=pts_ms, options={"bf": "0"})
    info = probe_video(path)
    assert info.frames == 10 and info.duration == pytest.approx(3.0, abs=0.01)
    for mode in ({"nframes": 4}, {"nframes": 6}, {}):
        clip = load_video(path, **mode, **SMALL)
        got = decoded_indices(clip)
        # timestamps are the frames' own pts, not index / fps
        assert clip.timestamps == pytest.approx([pts_ms[i] / 1000 for i in got], abs=1e-3)
        assert got == sorted(got)
        # each wanted time (spread evenly over the duration) took the frame nearest to it
        wanted = np.linspace(0, info.last_time, len(got))
        for w, g in zip(wanted, got):
            assert abs(pts_ms[g] / 1000 - w) == pytest.approx(min(abs(p / 1000 - w) for p in pts_ms), abs=1e-3)
    four = load_video(path, nframes=4, **SMALL)
    assert decoded_indices(four) == [0, 4, 6, 9]
    assert four.timestamps != pytest.approx([i / info.fps for i in [0, 4, 6, 9]], abs=0.05)


def marker_frame(i, width, height):
    a = np.full((height, width, 3), 255, np.uint8)
    a[: height // 3, : width // 3] = (255, 0, 0)  # red block in the stored frame's top-left corner
    return a


def test_rotation_metadata_is_applied(tmp_path):
    # stored 48 wide x 32 high; displayed turned a quarter counter-clockwise: 32 wide x 48 high, red at bottom-left
    path = write_video(tmp_path / "rot.mp4", 4, 4, size=(48, 32), rotation=90, frame_fn=marker_frame)
    info = probe_video(path)
    assert (info.rotation, info.width, info.height) == (90, 32, 48)
    clip = load_video(path, nframes=2, factor=16, min_pixels=16 * 16, max_pixels=48 * 32)
    frame = clip.frames[0]
    assert frame.shape == (48, 32, 3)
    bottom_left, top_left = frame[-6, 4], frame[4, 4]
    assert bottom_left[0] > 200 and bottom_left[1] < 60, bottom_left
    assert top_left.min() > 200, top_left
    assert check_video(path, nframes=2, factor=16, min_pixels=16 * 16, max_pixels=48 * 32).height == 48


@pytest.mark.parametrize("factor", [28, 32])
def test_pixel_budgets_on_decoded_frames(tmp_path, factor):
    path = write_video(tmp_path / "wide.mp4", 16, 8, size=(320, 240), frame_fn=lambda i, w, h: bits_frame(i, w, h))
    for kwargs in ({"max_pixels": 64 * factor**2, "min_pixels": 4 * factor**2},
                   {"total_pixels": 96 * factor**2, "min_pixels": 4 * factor**2},
                   {"min_pixels": 512 * factor**2, "max_pixels": 1024 * factor**2}):
        clip = load_video(path, nframes=8, factor=factor, **kwargs)
        t, h, w, _ = clip.frames.shape
        assert h % factor == 0 and w % factor == 0
        assert h * w <= kwargs.get("max_pixels", 768 * factor**2)
        assert h * w >= kwargs["min_pixels"]
        if "total_pixels" in kwargs:
            assert t / 2 * h * w <= kwargs["total_pixels"]
        assert_nearest(decoded_indices(clip), 16, 8)


# --- frame folders and lists ---


@pytest.fixture
def frame_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(10):  # natural order: frame_2 before frame_10
        Image.fromarray(bits_frame(i, 40, 32)).save(folder / f"frame_{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    return folder


def test_folder_of_frames(frame_folder):
    assert [p.name for p in frame_paths(frame_folder)][:3] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    clip = load_video(frame_folder, nframes=4, factor=16, min_pixels=256, max_pixels=40 * 32)
    assert decoded_indices(clip) == [0, 3, 6, 9] == clip.indices
    assert clip.frames.shape == (4, 32, 32, 3)
    assert clip.timestamps == [0.0, 1.5, 3.0, 4.5]  # assumed 2 frames per second
    assert clip.duration == 5.0 and clip.fps == pytest.approx(0.8) and clip.source_fps == 2.0
    every = load_video(frame_folder, factor=16, min_pixels=256, max_pixels=40 * 32)  # fps 2 at 2: all 10
    assert decoded_indices(every) == list(range(10))
    slow = load_video(frame_folder, frames_fps=1.0, fps=0.5, factor=16, min_pixels=256, max_pixels=40 * 32)
    assert slow.frames.shape[0] == 4 and slow.timestamps == [0.0, 3.0, 6.0, 9.0]  # 10 s at 0.5 fps -> 5 -> 4


def test_list_of_frames(frame_folder):
    paths = [frame_folder / f"frame_{i}.png" for i in (5, 1, 3)]  # taken in the order given
    clip = load_video([str(p) for p in paths], nframes=2, factor=16, min_pixels=256, max_pixels=40 * 32)
    assert decoded_indices(clip) == [4, 2]
    single = load_video(paths[:1], factor=16, min_pixels=256, max_pixels=40 * 32)
    assert single.frames.shape[0] == 2 and single.padded == 1 and decoded_indices(single) == [4, 4]


def test_frame_source_errors(tmp_path, frame_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match=str(empty)):
        load_video(empty, **SMALL)
    missing = frame_folder / "frame_99.png"
    with pytest.raises(MediaError, match=str(missing)):
        load_video([frame_folder / "frame_1.png", missing], **SMALL)


# --- broken files ---


def cut_matroska_before_frames(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: data.index(bytes.fromhex("1F43B675")) + 12])  # header, tracks, start of an empty cluster
    return dst


def noisy_frame(i, width, height):
    return np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_error_cases_name_the_file(tmp_path):
    valid = write_video(tmp_path / "valid.mp4", 16, 8)
    half = tmp_path / "half.mp4"
    half.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])  # index (moov) is at the end: lost
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    cases = {
        tmp_path / "missing.mp4": "does not exist",
        text: "not a video",
        half: "truncated",
        write_audio(tmp_path / "speech.m4a"): "no video stream",
        cut_matroska_before_frames(write_video(tmp_path / "m.mkv", 8, 8), tmp_path / "zero.mkv"): "no decodable frames",
    }
    for path, words in cases.items():
        for call in (load_video, check_video):
            with pytest.raises(MediaError, match=words) as e:
                call(path, **SMALL)
            assert str(path) in str(e.value)
        with pytest.raises(MediaError):
            probe_video(path)


def test_truncated_video_with_some_frames(tmp_path):
    # index at the front (faststart), noise frames so the data is large: half the bytes hold about half the frames
    valid = write_video(tmp_path / "fs.mp4", 40, 10, size=(64, 64), frame_fn=noisy_frame,
                        container_options={"movflags": "faststart"}, options={"crf": "30"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2])
    assert probe_video(cut).frames == 40  # the container still promises 40
    with pytest.raises(MediaError, match=r"truncated.* only [1-9]\d* of the 8 frames to sample") as e:
        load_video(cut, nframes=8, **SMALL)
    assert str(cut) in str(e.value)
    with pytest.raises(MediaError, match="truncated"):  # the last frame alone is enough to notice
        check_video(cut, nframes=8, thorough=False, **SMALL)


# --- check_video and token counts ---


@pytest.mark.parametrize("name", ["f9", "f45", "long"])
@pytest.mark.parametrize("mode", [{}, {"nframes": 6}, {"fps": 0.5, "total_pixels": 16 * 28 * 28}])
def test_check_video_agrees_with_load_video(videos, name, mode):
    kwargs = {**SMALL, **mode}
    clip = load_video(videos[name], **kwargs)
    for thorough in (True, False):
        check = check_video(videos[name], thorough=thorough, **kwargs)
        assert (check.nframes, check.height, check.width) == clip.frames.shape[:3]
        assert check.fps == pytest.approx(clip.fps) and check.duration == pytest.approx(clip.duration)


def test_check_video_on_frames(frame_folder):
    kwargs = dict(factor=16, min_pixels=256, max_pixels=40 * 32, nframes=6)
    clip = load_video(frame_folder, **kwargs)
    check = check_video(frame_folder, thorough=False, **kwargs)
    assert (check.nframes, check.height, check.width) == clip.frames.shape[:3]


def test_video_token_count_matches_processor(videos):
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64 * 16})
    for frames in (4, 6):
        clip = load_video(videos["f45"], nframes=frames, factor=16, min_pixels=16 * 16, max_pixels=48 * 32)
        out = processor(videos=[torch.from_numpy(clip.frames).permute(0, 3, 1, 2)], do_sample_frames=False,
                        do_resize=False, return_tensors="pt")
        grid = out["video_grid_thw"][0].tolist()
        expected = grid[0] * grid[1] * grid[2] // 4
        assert video_token_count(*clip.frames.shape[:3], patch_size=8, merge_size=2, temporal_patch_size=2) == expected
    assert video_token_count(3, 32, 32, patch_size=8, merge_size=2, temporal_patch_size=2) == 2 * 4 * 4 // 4


# --- the shipped examples ---


def test_data_examples():
    ball = load_video(EXAMPLES / "ball_left_right.mp4", nframes=4, factor=28, min_pixels=784, max_pixels=64 * 48)
    assert ball.frames.shape[0] == 4 and ball.duration == pytest.approx(2.0)
    xs = [np.nonzero(f[..., 0].astype(int) - f[..., 2] > 100)[1].mean() for f in ball.frames]  # red ball columns
    assert xs == sorted(xs) and xs[-1] - xs[0] > 20
    cycle = load_video(EXAMPLES / "color_cycle.mp4", nframes=6, factor=28, min_pixels=784, max_pixels=4 * 784)
    dominant = [int(np.argmax(f.reshape(-1, 3).mean(0))) for f in cycle.frames]
    assert dominant == [0, 0, 1, 1, 2, 2] and cycle.duration == pytest.approx(3.0)
    one = load_video(EXAMPLES / "one_frame.mp4", factor=28, min_pixels=784, max_pixels=4 * 784)
    assert one.frames.shape[0] == 2 and one.padded == 1
    square = load_video(EXAMPLES / "frames_square", factor=28, min_pixels=784, max_pixels=4 * 784)
    assert square.frames.shape[0] == 4 and square.timestamps == [0.0, 0.5, 1.0, 1.5]
    assert sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file()) < 60_000


def test_importing_does_not_need_av():
    import subprocess
    import sys

    code = "import sys, vlft.data.video; assert 'av' not in sys.modules, 'av imported at module level'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
