"""Decode cost of vlft's load_video against decoding the whole file, on a long video.

    .venv/bin/python bench/video_decode.py            # 10 min, 30 fps, 320x240; cached in $TMPDIR/vlft_bench
    .venv/bin/python bench/video_decode.py --nframes 16 64 --repeat 3

Writes the video once (H.264 superfast, about 10 s on 2 cores), then runs each method in a fresh Python process so
that peak memory (VmHWM, the resident high-water mark: what the OOM killer sees) belongs to that method alone:

- ours:  load_video(nframes=N): seeks to the keyframe before each wanted frame and decodes forward.
- naive: decode every frame to RGB into memory, then pick N (what torchvision.io.read_video does, the
  qwen-vl-utils fallback when neither torchcodec nor decord is installed).

A second, short table times the two ways to resize a decoded frame to the model's size (swscale bicubic via
`VideoFrame.reformat`, which load_video uses, against RGB conversion then PIL bicubic) and their mean difference.

How to read the table: `wall s` is the whole call (open, probe, decode, resize); `decoded` counts frames the decoder
produced; `kept/s` is useful (returned) frames per second of wall time; `decoded/s` is raw decoder throughput;
`peak MB` is the process high-water mark and `+MB` the part above the same process right after imports (the
method's own memory). Both methods also check that they returned the frames the sampling rule asks for (each frame
carries its index as black blocks in a white strip).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FPS, SECONDS = 320, 240, 30, 600
BITS = 16  # index bits drawn in the top strip, 16 px per bit
FACTOR, MIN_PIXELS, MAX_PIXELS = 28, 4 * 28 * 28, 320 * 240


def make_video(path: Path) -> None:
    import av

    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    background = np.stack([xx * 255 // WIDTH, yy * 255 // HEIGHT, np.full_like(xx, 96)], -1).astype(np.uint8)
    background[:16] = 255
    tmp = path.with_suffix(".part")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "superfast", "crf": "26"}  # keyframe every 250 frames (x264's default)
        for i in range(FPS * SECONDS):
            a = background.copy()
            x, y = (i * 3) % (WIDTH - 40), 16 + (i * 2) % (HEIGHT - 56)
            a[y:y + 40, x:x + 40] = (250, 250, 250)  # a moving square, so frames differ as in real video
            for b in range(BITS):
                if (i >> b) & 1:
                    a[2:14, b * 16 + 2:b * 16 + 14] = 0
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)


def read_index(frame: np.ndarray) -> int:
    h, w = frame.shape[:2]
    y = int(8 * h / HEIGHT)
    return sum(1 << b for b in range(BITS) if frame[y, int((b * 16 + 8) * w / WIDTH)].mean() < 128)


def peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024**2


def run_ours(path: Path, nframes: int) -> dict:
    from vlft.data.video import load_video

    clip = load_video(path, nframes=nframes, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return {"frames": clip.frames, "decoded": clip.decoded}


def run_naive(path: Path, nframes: int) -> dict:
    import av
    from PIL import Image

    from vlft.data.video import frame_size

    with av.open(str(path)) as container:
        everything = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    idx = np.linspace(0, len(everything) - 1, nframes).round().astype(int)
    h, w = frame_size(HEIGHT, WIDTH, nframes, factor=FACTOR, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    frames = np.stack([np.asarray(Image.fromarray(everything[i]).resize((w, h), Image.Resampling.BICUBIC)) for i in idx])
    return {"frames": frames, "decoded": len(everything)}


def child(method: str, path: Path, nframes: int) -> None:
    import av  # noqa: F401  (imports before the baseline, so +MB is the method's own memory)

    import vlft.data.video  # noqa: F401

    base = peak_mb()
    start = time.perf_counter()
    out = (run_ours if method == "ours" else run_naive)(path, nframes)
    wall = time.perf_counter() - start
    got = [read_index(f) for f in out["frames"]]
    wanted = np.linspace(0, FPS * SECONDS - 1, nframes)
    correct = all(abs(g - x) <= 0.5 + 1e-6 for g, x in zip(got, wanted))
    print(json.dumps({"method": method, "nframes": nframes, "wall": wall, "decoded": out["decoded"], "peak": peak_mb(),
                      "base": base, "correct": correct, "shape": list(out["frames"].shape)}))


def measure(method: str, path: Path, nframes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--child", method, "--video", str(path), "--nframes", str(nframes)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resize_table(path: Path) -> None:
    import av
    from PIL import Image

    from vlft.data.video import frame_size

    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    print(f"\nresize one decoded {WIDTH}x{HEIGHT} frame (ms, best of 50)      swscale  PIL   mean |diff|")
    for factor, min_pixels, max_pixels, label in [(28, 4 * 784, 48 * 784, "down"), (28, 4 * 784, 320 * 240, "near"),
                                                  (32, 512 * 1024, 768 * 1024, "up")]:
        h, w = frame_size(HEIGHT, WIDTH, 16, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        ways = {"swscale": lambda w=w, h=h: frame.reformat(width=w, height=h, format="rgb24",
                                                           interpolation="BICUBIC").to_ndarray(),
                "pil": lambda w=w, h=h: np.asarray(Image.fromarray(frame.to_ndarray(format="rgb24")).resize(
                    (w, h), Image.Resampling.BICUBIC))}
        best, out = {}, {}
        for name, way in ways.items():
            times = []
            for _ in range(50):
                start = time.perf_counter()
                out[name] = way()
                times.append(time.perf_counter() - start)
            best[name] = min(times) * 1000
        diff = np.abs(out["swscale"].astype(int) - out["pil"]).mean()
        print(f"  {label:<5} to {w}x{h:<33} {best['swscale']:>7.2f} {best['pil']:>5.2f} {diff:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vlft_bench"), help="folder for the video")
    parser.add_argument("--nframes", type=int, nargs="+", default=[16], help="frames to sample (one row each)")
    parser.add_argument("--methods", nargs="+", default=["ours", "naive"], choices=["ours", "naive"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is shown")
    parser.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.video), args.nframes[0])
        return

    path = Path(args.cache) / f"long_{SECONDS}s_{FPS}fps_{WIDTH}x{HEIGHT}.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        make_video(path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    print(f"video: {path} ({SECONDS} s, {FPS} fps, {WIDTH}x{HEIGHT}, {FPS * SECONDS} frames, "
          f"{path.stat().st_size / 1e6:.1f} MB), {os.cpu_count()} CPUs\n")
    header = f"{'method':<7} {'N':>4} {'wall s':>8} {'decoded':>8} {'kept/s':>8} {'decoded/s':>10} {'peak MB':>8} " \
             f"{'+MB':>7}  frames ok"
    print(header)
    print("-" * len(header))
    for nframes in args.nframes:
        for method in args.methods:
            r = min((measure(method, path, nframes) for _ in range(args.repeat)), key=lambda r: r["wall"])
            print(f"{method:<7} {nframes:>4} {r['wall']:>8.2f} {r['decoded']:>8} {nframes / r['wall']:>8.1f} "
                  f"{r['decoded'] / r['wall']:>10.0f} {r['peak']:>8.0f} {r['peak'] - r['base']:>7.0f}  "
                  f"{'yes' if r['correct'] else 'NO'} {tuple(r['shape'])}")
    resize_table(path)


if __name__ == "__main__":
    main()
