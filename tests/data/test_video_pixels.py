"""Video pixels against each family's own video processor, bit for bit.

load_video samples and sizes the frames; the processor is given the same sampled frames, decoded here separately at
their stored size and not resized (do_sample_frames=False), with the same pixel budget, and resizes them itself. Its
`pixel_values_videos` must equal our normalised uint8 patch rows exactly (torch.equal), and its grid ours: the same
size rule, the same resize kernel (torchvision bicubic, antialiased, on uint8), the same layout. Sources are a real
encoded file (H.264 and MPEG-4 Part 2, sizes that are not multiples of the patch factor) and a folder of frames.
"""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from conftest import FAMILIES
from PIL import Image

from vlft.data.pixels import PixelNorm, patchify
from vlft.data.video import frame_paths, load_video
from vlft.models.loading import load_processor


@pytest.fixture(scope="module", params=FAMILIES)
def video_processor(request, tiny_model_factory):
    return load_processor(str(tiny_model_factory(request.param))).video_processor


def textured(i: int, width: int, height: int) -> np.ndarray:
    """Gradients, noise and a moving bar: a kernel that is off by one tap or one rounding shows up."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x * 3 + y + 9 * i) % 256], -1)
    base[:, (7 * i) % width:(7 * i) % width + 5] = 255
    return np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)


def write_video(path, codec: str, n: int, width: int, height: int, fps: int = 10):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "g": "5"}
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(textured(i, width, height), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def all_frames(path) -> list[np.ndarray]:
    """Every frame of the file as RGB at its stored size: what a reader hands the processor before it resizes."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def budget(vp, nframes: int, min_pixels: int, max_pixels: int) -> dict:
    """The processor's `size` for per-frame bounds min_pixels..max_pixels: Qwen3-VL's video smart_resize bounds the
    pixels of all frames together (t * h * w), Qwen2/2.5-VL's those of each frame."""
    per_video = type(vp).__name__.startswith("Qwen3")
    scale = nframes if per_video else 1
    return {"shortest_edge": min_pixels * scale, "longest_edge": max_pixels * scale}


def assert_processor_equal(vp, clip, sampled: np.ndarray, min_pixels: int, max_pixels: int) -> None:
    kwargs = dict(patch_size=vp.patch_size, merge_size=vp.merge_size, temporal_patch_size=vp.temporal_patch_size)
    rows, grid = patchify(torch.from_numpy(clip.frames).permute(0, 3, 1, 2), **kwargs)
    t = len(sampled)
    ref = vp(videos=[torch.from_numpy(sampled).permute(0, 3, 1, 2)], do_sample_frames=False, do_resize=True,
             size=budget(vp, t, min_pixels, max_pixels), cap_pixels_per_frame=False, return_tensors="pt")
    assert ref["video_grid_thw"].tolist() == [list(grid)]
    assert tuple(clip.frames.shape[1:3]) != sampled.shape[1:3]  # the processor did resize: the kernel is compared
    assert torch.equal(PixelNorm.of(vp)(rows), ref["pixel_values_videos"])


# (codec, width, height, min_pixels, max_pixels): down- and upscaling, sizes off the 16-pixel factor
FILES = [("libx264", 98, 70, 256, 48 * 32), ("mpeg4", 130, 94, 256, 64 * 48), ("libx264", 58, 42, 64 * 64, 96 * 96)]


@pytest.mark.parametrize("codec, width, height, min_pixels, max_pixels", FILES)
@pytest.mark.parametrize("nframes", [4, 6])
def test_video_file_pixels_equal_the_processor(video_processor, tmp_path, codec, width, height, min_pixels,
                                               max_pixels, nframes):
    vp = video_processor
    path = write_video(tmp_path / f"clip_{codec}.mp4", codec, 13, width, height)
    factor = vp.patch_size * vp.merge_size
    clip = load_video(path, nframes=nframes, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    raw = all_frames(path)
    assert len(raw) == 13 and clip.frames.shape[0] == nframes
    sampled = np.stack([raw[i] for i in clip.indices])
    assert_processor_equal(vp, clip, sampled, min_pixels, max_pixels)


def test_rotated_video_pixels_equal_the_processor(video_processor, tmp_path):
    """A phone video's display matrix: the processor is given the upright frames, and so resizes upright ones."""
    vp = video_processor
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 98, 70, "yuv420p"
        stream.set_display_rotation(90)
        for i in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(textured(i, 98, 70), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = load_video(path, nframes=4, factor=vp.patch_size * vp.merge_size, min_pixels=256, max_pixels=64 * 48)
    assert clip.frames.shape[1] > clip.frames.shape[2]  # shown upright: taller than wide
    upright = [np.ascontiguousarray(np.rot90(f, 1)) for f in all_frames(path)]
    sampled = np.stack([upright[i] for i in clip.indices])
    assert_processor_equal(vp, clip, sampled, 256, 64 * 48)


@pytest.mark.parametrize("sizes", [[(75, 53)], [(75, 53), (80, 50)]], ids=["one_size", "mixed_sizes"])
def test_frame_folder_pixels_equal_the_processor(video_processor, tmp_path, sizes):
    """Frames of another size than the first are resized to the first one's target size, by the same kernel; the
    processor cannot take mixed sizes, so those frames are compared one by one against it."""
    vp = video_processor
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(9):
        width, height = sizes[i % len(sizes)]
        Image.fromarray(textured(i, width, height)).save(folder / f"{i + 1}.png")
    clip = load_video(folder, nframes=4, factor=vp.patch_size * vp.merge_size, min_pixels=256, max_pixels=48 * 32)
    paths = frame_paths(folder)
    frames = [np.array(Image.open(paths[i]).convert("RGB")) for i in clip.indices]
    if len(sizes) == 1:
        assert_processor_equal(vp, clip, np.stack(frames), 256, 48 * 32)
        return
    from vlft.data.pixels import resize

    h, w = clip.frames.shape[1:3]
    for got, frame in zip(clip.frames, frames):
        expected = resize(torch.from_numpy(frame).permute(2, 0, 1), h, w).permute(1, 2, 0)
        assert torch.equal(torch.from_numpy(got), expected)
    first_size = [k for k, i in enumerate(clip.indices) if i % 2 == 0]
    assert_processor_equal(vp, type(clip)(**{**clip.__dict__, "frames": clip.frames[first_size[:2]]}),
                           np.stack([frames[k] for k in first_size[:2]]), 256, 48 * 32)
