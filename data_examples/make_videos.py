"""Write the tiny example videos (H.264 in mp4, yuv420p) and a folder of frames that load_video must handle.

    python data_examples/make_videos.py

Writes data_examples/videos/; deterministic (single-threaded x264, fixed settings), so rerunning it with the same
PyAV build leaves git clean. Everything together stays well under 60 KB.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "videos"
WIDTH, HEIGHT = 64, 48


def write_mp4(name: str, frames: list[np.ndarray], fps: int) -> None:
    path = OUT / name
    # bitexact keeps library version strings out of the file; one thread makes x264's output reproducible
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "28", "preset": "medium", "threads": "1", "flags": "+bitexact"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def drawn(draw: Callable[[ImageDraw.ImageDraw], None], size=(WIDTH, HEIGHT)) -> np.ndarray:
    img = Image.new("RGB", size, (255, 255, 255))
    draw(ImageDraw.Draw(img))
    return np.asarray(img)


def ball_left_right() -> None:
    """A red ball crossing from left to right: 2 s at 8 fps."""
    frames = []
    for i in range(16):
        x = 4 + i * (WIDTH - 20) // 15
        frames.append(drawn(lambda d, x=x: d.ellipse((x, 16, x + 15, 31), fill=(220, 20, 20))))
    write_mp4("ball_left_right.mp4", frames, fps=8)


def color_cycle() -> None:
    """One second each of red, green, blue: 3 s at 6 fps."""
    colours = [(230, 30, 30), (30, 200, 30), (30, 30, 230)]
    frames = [np.full((HEIGHT, WIDTH, 3), colours[i // 6], np.uint8) for i in range(18)]
    write_mp4("color_cycle.mp4", frames, fps=6)


def one_frame() -> None:
    """A video of a single frame: shorter than one temporal patch, so it is padded."""
    write_mp4("one_frame.mp4", [drawn(lambda d: d.rectangle((20, 12, 43, 35), fill=(240, 200, 0)))], fps=8)


def frames_square() -> None:
    """Four PNG frames of a blue square moving down, named so that only natural sorting orders them (2 before 10)."""
    folder = OUT / "frames_square"
    folder.mkdir(exist_ok=True)
    for k, number in enumerate((1, 2, 10, 11)):
        img = Image.fromarray(drawn(lambda d, y=4 + k * 8: d.rectangle((24, y, 39, y + 15), fill=(30, 60, 220))))
        img.save(folder / f"frame_{number}.png", optimize=True)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for make in (ball_left_right, color_cycle, one_frame, frames_square):
        make()
    files = sorted(p for p in OUT.rglob("*") if p.is_file())
    for path in files:
        print(f"{path.relative_to(OUT)}: {path.stat().st_size} bytes")
    print(f"total: {sum(p.stat().st_size for p in files)} bytes")


if __name__ == "__main__":
    main()
