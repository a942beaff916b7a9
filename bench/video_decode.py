"""Decode cost of vlft's load_video against maintained readers: one table, decoder x case -> ms per video.

    .venv/bin/python bench/video_decode.py                 # videos cached in $TMPDIR/vlft_bench
    .venv/bin/python bench/video_decode.py --repeat 3 --decoders ours torchcodec

Cases (320x240 H.264, x264 superfast, keyframe every 250 frames, 30 fps; each frame carries its index as black
blocks in a white strip):
- dense:  a 20 s clip (600 frames), 128 frames sampled: most GOPs hold several wanted frames.
- sparse: a 600 s video (18000 frames), 16 frames sampled: one wanted frame every 37 s.
- folder: 300 JPEG frames, 16 sampled.

Decoders (each gets the same frame numbers, qwen-vl-utils' linspace rule):
- ours:        vlft.data.video.load_video (PyAV; seeks only where the index says a keyframe lies between).
- torchcodec:  torchcodec VideoDecoder.get_frames_at(indices) (exact seeking in FFmpeg), then our resize.
- qwen-vl-utils: qwen_vl_utils.fetch_video with its torchcodec backend (decord is not installed here; its
  torchvision backend needs torchvision.io.read_video, removed from torchvision); for the folder, the sampled frame
  paths as a list (it reads every image it is given and resizes each twice: PIL, then torchvision).
- hf-pyav:     transformers.video_utils.load_video(backend="pyav"): decodes every frame up to the last wanted one.
- naive:       decode every frame to RGB, then pick (what torchvision.io.read_video did).

`ms` is the best of --repeat calls (open, probe, decode, resize to the model's size) in one process; `frames`
says whether the returned frames are those the sampling rule asks for (read from the index strip), and `= ours`
whether its frames, resized with our kernel (or by the reader itself for qwen-vl-utils), equal load_video's bit for
bit (else the largest difference, in levels).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FPS = 320, 240, 30
BITS = 16  # index bits drawn in the top strip, 16 px per bit
FACTOR, MIN_PIXELS, MAX_PIXELS = 28, 4 * 28 * 28, 320 * 240
CASES = {"dense": (20, 128), "sparse": (600, 16), "folder": (10, 16)}  # case: (seconds at 30 fps, frames sampled)
DECODERS = ["ours", "torchcodec", "qwen-vl-utils", "hf-pyav", "naive"]


def draw(i: int, background: np.ndarray) -> np.ndarray:
    a = background.copy()
    x, y = (i * 3) % (WIDTH - 40), 16 + (i * 2) % (HEIGHT - 56)
    a[y:y + 40, x:x + 40] = (250, 250, 250)  # a moving square, so frames differ as in real video
    for b in range(BITS):
        if (i >> b) & 1:
            a[2:14, b * 16 + 2:b * 16 + 14] = 0
    return a


def make_video(path: Path, seconds: int, folder: bool = False) -> None:
    import av
    from PIL import Image

    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    background = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, np.full_like(xx, 96)], -1).astype(np.uint8)
    background[:16] = 255
    if folder:
        path.mkdir(parents=True)
        for i in range(FPS * seconds):
            Image.fromarray(draw(i, background)).save(path / f"{i}.jpg", quality=90)
        return
    tmp = path.with_suffix(".part")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "superfast", "crf": "26"}  # keyframe every 250 frames (x264's default)
        for i in range(FPS * seconds):
            for packet in stream.encode(av.VideoFrame.from_ndarray(draw(i, background), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)


def read_index(frame: np.ndarray) -> int:
    h, w = frame.shape[:2]
    y = int(8 * h / HEIGHT)
    return sum(1 << b for b in range(BITS) if frame[y, int((b * 16 + 8) * w / WIDTH)].mean() < 128)


def fit(frames, h: int, w: int) -> np.ndarray:
    """[N, H, W, 3] or [N, 3, H, W] uint8 full-size frames -> [N, h, w, 3] with vlft's kernel (pixels.resize)."""
    import torch

    from vlft.data.pixels import resize

    t = torch.as_tensor(np.asarray(frames))
    if t.shape[-1] == 3:
        t = t.permute(0, 3, 1, 2)
    return resize(t, h, w).permute(0, 2, 3, 1).numpy()


def run(decoder: str, source: Path, nframes: int, size: tuple[int, int]):
    """The decoder's frames [N, h, w, 3] uint8 for the frame numbers load_video takes (None: not applicable)."""
    from vlft.data.video import frame_paths, load_video
    from vlft.data.video_sampling import frame_indices

    h, w = size
    folder = source.is_dir()
    if decoder == "ours":
        return load_video(source, nframes=nframes, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).frames
    if decoder == "qwen-vl-utils":
        from qwen_vl_utils import fetch_video

        ele = {"nframes": nframes, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
        if folder:
            paths = frame_paths(source)
            ele["video"] = [str(paths[i]) for i in frame_indices(len(paths), nframes)]
        else:
            ele["video"] = str(source)
        video = fetch_video(ele, image_patch_size=FACTOR // 2)
        return video.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    if folder:
        return None
    if decoder == "torchcodec":
        from torchcodec.decoders import VideoDecoder

        decoder_ = VideoDecoder(str(source))
        total = decoder_.metadata.num_frames
        return fit(decoder_.get_frames_at(indices=frame_indices(total, nframes)).data, h, w)
    if decoder == "hf-pyav":
        from transformers.video_utils import load_video as hf_load_video

        def pick(metadata, **kwargs):
            return np.array(frame_indices(metadata.total_num_frames, nframes))

        video, _ = hf_load_video(str(source), backend="pyav", sample_indices_fn=pick)
        return fit(video, h, w)
    import av

    with av.open(str(source)) as container:
        everything = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return fit(np.stack([everything[i] for i in frame_indices(len(everything), nframes)]), h, w)


def table(paths: dict[str, Path], decoders: list[str], repeat: int) -> None:
    from vlft.data.video_sampling import frame_indices

    header = f"{'decoder':<14}" + "".join(f"{case + ' ms':>12} {'frames':>7} {'= ours':>7}" for case in CASES)
    print(header)
    print("-" * len(header))
    ours: dict[str, np.ndarray] = {}
    for decoder in decoders:
        cells = []
        for case, (seconds, nframes) in CASES.items():
            size = ours[case].shape[1:3] if case in ours else None
            best, frames = float("inf"), None
            for _ in range(repeat):
                start = time.perf_counter()
                try:
                    frames = run(decoder, paths[case], nframes, size or (0, 0))
                except Exception as e:  # a reader that cannot do this case: say why in the cell
                    frames = f"{type(e).__name__}"
                    break
                best = min(best, time.perf_counter() - start)
                if frames is None or best > 20:  # slow readers: one run is enough to rank them
                    break
            if decoder == "ours":
                ours[case] = frames
            if frames is None or isinstance(frames, str):
                cells.append(f"{frames or 'n/a':>12} {'':>7} {'':>7}")
                continue
            wanted = frame_indices(FPS * seconds, nframes)
            ok = len(frames) == nframes and all(read_index(f) == x for f, x in zip(frames, wanted))
            if frames.shape != ours[case].shape:
                same = "size"
            else:
                diff = int(np.abs(frames.astype(int) - ours[case]).max())
                same = "yes" if diff == 0 else f"{diff}"
            cells.append(f"{best * 1000:>12.0f} {'yes' if ok else 'NO':>7} {same:>7}")
        print(f"{decoder:<14}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vlft_bench"), help="folder for videos")
    parser.add_argument("--decoders", nargs="+", default=DECODERS, choices=DECODERS)
    parser.add_argument("--repeat", type=int, default=3, help="calls per cell; the fastest is shown")
    args = parser.parse_args()
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchcodec")
    paths = {}
    for case, (seconds, _) in CASES.items():
        folder = case == "folder"
        path = Path(args.cache) / (f"frames_{seconds}s_{FPS}fps_{WIDTH}x{HEIGHT}" if folder else
                                   f"long_{seconds}s_{FPS}fps_{WIDTH}x{HEIGHT}.mp4")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            make_video(path, seconds, folder=folder)
            print(f"wrote {path} in {time.perf_counter() - start:.1f} s")
        paths[case] = path
    print(f"{WIDTH}x{HEIGHT} at {FPS} fps; dense {CASES['dense']}, sparse {CASES['sparse']}, folder {CASES['folder']} "
          f"(seconds, frames sampled); {os.cpu_count()} CPUs, best of {args.repeat}\n")
    if args.decoders[0] != "ours":
        args.decoders = ["ours", *[d for d in args.decoders if d != "ours"]]  # the others are compared with it
    table(paths, args.decoders, args.repeat)


if __name__ == "__main__":
    main()
