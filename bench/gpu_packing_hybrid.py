"""Packing on Qwen3.5's Gated DeltaNet layers on a GPU: packed rows against each record alone, through fla.

    python bench/gpu_packing_hybrid.py                          # qwen3_5 and qwen3_5_moe, rows of 2048, bf16, cuda
    python bench/gpu_packing_hybrid.py --families qwen3_5 --seq_len 4096
    python bench/gpu_packing_hybrid.py --device cpu --tiny      # plumbing only: tiny fp32 models, torch per record

On CUDA with flash-linear-attention (`fla`) installed, vlft's patch (vlft/models/patches/linear_attention.py) runs
the linear-attention layers of a packed batch through fla's varlen causal convolution and varlen delta rule, a
path the CPU test suite cannot run. This check builds gpu_check.py's randomly initialised Qwen2-VL-2B-sized model
with the family's own text fields (Qwen3.5's 3:1 linear to full attention, 16/32 linear heads of 128; 64 experts
for the MoE), in bf16 on the GPU; makes synthetic records of several lengths (random text ids, every other record
with one image of 64 tokens), packs them into rows of `--seq_len` (vlft.data.packing.plan_packs) and
compares, on the same weights:

- `alone`: each record in a batch of its own (no padding: the library's forward, fla's non-varlen kernels);
- `leaky`: the packed rows with vlft's packed position ids but without the patch (records share conv and state);
- `packed`: the packed rows through vlft.train.core.model_inputs, which applies the patch (fla's varlen kernels).

Reading the table: `logit rel` is the largest |logit difference| to `alone` over every record token, over the
largest |logit| of `alone`; `loss rel` the largest relative difference of a record's summed token loss; `grad cos`
the cosine between the gradients of the summed loss (all parameters, flattened) and those of `alone`. `packed` must
stay within bf16 rounding (logit rel < 5e-2, loss rel < 1e-2, grad cos > 0.99; tolerances set before any GPU run:
confirm them on the first one) and the script exits 1 otherwise; `leaky` is printed to show how far from `alone`
the check can see a missing boundary go (it is not gated: at random initialisation the state may fade fast).
Without a CUDA GPU, or without fla on one, the script says so and exits 2; `--device cpu --tiny` checks the plumbing
(the patch's per-record torch path, fp32: packed should match to ~1e-5).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing vlft
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check's model builder

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FAMILIES = ("qwen3_5", "qwen3_5_moe")
RECORD_LENGTHS = (900, 410, 1130, 260, 700, 520, 1500, 330)  # tokens; packed into rows of --seq_len
IMAGE_SIDE = 16  # patches per image side: 64 tokens after the 2 x 2 merge
MAX_LOGIT_REL, MAX_LOSS_REL, MIN_GRAD_COS = 5e-2, 1e-2, 0.99


def records(model, text_vocab: int, lengths, device: str, side: int = IMAGE_SIDE) -> list[dict]:
    """Synthetic records: random text; every other one holds an image of `side` x `side` patches (<vision_start>,
    its pad tokens, <vision_end>) after 8 tokens. Labels are the text after the image (or after the first 8 tokens)."""
    config, vision = model.config, model.config.vision_config
    merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    n_image = (side // merge) ** 2
    gen = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    out = []
    for i, length in enumerate(lengths):
        ids = torch.randint(0, text_vocab, (length,), generator=gen)
        record = {}
        end = 8
        if i % 2 == 0:
            end = 8 + 1 + n_image
            ids[8] = config.vision_start_token_id
            ids[9:end] = config.image_token_id
            ids[end] = config.vision_end_token_id
            record["pixel_values"] = torch.randn(side * side, 3 * temporal * patch * patch, generator=gen).to(dtype)
            record["image_grid_thw"] = torch.tensor([[1, side, side]])
        labels = ids.clone()
        labels[:end + 1] = -100
        record.update(input_ids=ids, labels=labels, mm_token_type_ids=(ids == config.image_token_id).long())
        out.append({k: v.to(device) for k, v in record.items()})
    return out


def batch_of(recs: list[dict], packs: list[list[int]] | None, pad_id: int) -> dict:
    """One row per pack (records back to back, right-padded to the longest row) with vlft's `pack_layout`;
    with `packs=None` a single record (recs[0]) as a batch of one."""
    if packs is None:
        return {k: v[None] if k in ("input_ids", "labels", "mm_token_type_ids") else v for k, v in recs[0].items()}
    rows = [[recs[i] for i in pack] for pack in packs]
    width = max(sum(len(r["input_ids"]) for r in row) for row in rows)
    device = recs[0]["input_ids"].device
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full_like(ids, -100)
    types = torch.zeros_like(ids)
    layout = torch.zeros((len(rows), max(len(p) for p in packs) + 1, 4), dtype=torch.long)
    pixels, grids = [], []
    for b, row in enumerate(rows):
        at = 0
        for s, rec in enumerate(row):
            n = len(rec["input_ids"])
            ids[b, at:at + n], labels[b, at:at + n] = rec["input_ids"], rec["labels"]
            types[b, at:at + n] = rec["mm_token_type_ids"]
            layout[b, s] = torch.tensor([n, 1 if "pixel_values" in rec else 0, 0, 1])
            if "pixel_values" in rec:
                pixels.append(rec["pixel_values"])
                grids.append(rec["image_grid_thw"])
            at += n
        if at < width:
            layout[b, len(row)] = torch.tensor([width - at, 0, 0, 0])  # the row's padding: a segment of its own
    batch = {"input_ids": ids, "labels": labels, "mm_token_type_ids": types, "pack_layout": layout}
    if pixels:
        batch.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids))
    return batch


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one record's logits [L, V] and labels [L], in fp32."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")


def run(model, batch: dict, lengths: list[int], packs: list[list[int]]) -> tuple[list[torch.Tensor], list[float]]:
    """Forward + backward of the records' summed loss (gradients accumulate in the parameters): each record's
    logits and loss, in record order. `packs` says which records (indices into `lengths`) each row holds."""
    labels = batch.pop("labels")
    logits = model(**batch).logits
    spans = {}
    for b, pack in enumerate(packs):
        at = 0
        for i in pack:
            spans[i] = (b, at, at + lengths[i])
            at += lengths[i]
    losses = {i: token_losses(logits[b, s:e], labels[b, s:e]) for i, (b, s, e) in spans.items()}
    sum(losses.values()).backward()
    return ([logits[b, s:e].detach() for _, (b, s, e) in sorted(spans.items())],
            [loss.item() for _, loss in sorted(losses.items())])


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def check_family(family: str, args) -> dict:
    from gpu_check import build

    from vlft.data.packing import plan_packs
    from vlft.models.patches import unwrap_model
    from vlft.train.core.model_inputs import model_inputs, pack_position_ids

    model, text_vocab = build(family, tiny=args.tiny, device=args.device)
    model.train()
    model.config.use_cache = False
    lengths = [min(n, args.seq_len) for n in RECORD_LENGTHS] if not args.tiny else [40, 23, 57, 31, 18, 45]
    recs = records(model, text_vocab, lengths, args.device, side=4 if args.tiny else IMAGE_SIDE)
    packs = plan_packs(lengths, args.seq_len)
    pad_id = model.config.text_config.pad_token_id or 0

    # alone: each record in a batch of its own; gradients accumulate over the records
    model.zero_grad(set_to_none=True)
    alone_logits, alone_losses = [], []
    for i in range(len(recs)):
        logits, losses = run(model, batch_of([recs[i]], None, pad_id), [lengths[i]], [[0]])
        alone_logits += logits
        alone_losses += losses
    alone_grads = grads(model)

    def compare(batch) -> dict:
        model.zero_grad(set_to_none=True)
        logits, losses = run(model, batch, lengths, packs)
        g = grads(model)
        scale = max(a.abs().max().item() for a in alone_logits)
        return dict(
            logit_rel=max((a.float() - p.float()).abs().max().item() for a, p in zip(alone_logits, logits)) / scale,
            loss_rel=max(abs(a - p) / abs(a) for a, p in zip(alone_losses, losses)),
            grad_cos=F.cosine_similarity(alone_grads.double(), g.double(), dim=0).item())

    packed = batch_of(recs, packs, pad_id)
    leaky = dict(packed)  # vlft's packed positions, but the linear-attention layers not patched yet
    layout = leaky.pop("pack_layout")
    leaky["position_ids"] = pack_position_ids(unwrap_model(model).model, leaky["input_ids"], layout,
                                              mm_token_type_ids=leaky["mm_token_type_ids"],
                                              image_grid_thw=leaky.get("image_grid_thw"))
    leaky.update(attention_mask=None, use_cache=False)
    leaky_figures = compare(leaky)
    packed_figures = compare(model_inputs(packed, model))  # applies the patch
    # the patch's own choice (linear_attention.py): fla's varlen kernels for CUDA tensors when fla imports
    path = "fla varlen" if args.device.startswith("cuda") and importlib.util.find_spec("fla") else "torch per record"
    ok = (packed_figures["logit_rel"] < MAX_LOGIT_REL and packed_figures["loss_rel"] < MAX_LOSS_REL
          and packed_figures["grad_cos"] > MIN_GRAD_COS)
    return dict(family=family, rows=len(packs), records=len(recs), path=path, leaky=leaky_figures,
                packed=packed_figures, ok=ok)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per packed row (default 2048; 128 with --tiny)")
    parser.add_argument("--device", default="cuda", help="cuda (fla's varlen kernels) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tiny offline models (fp32) instead of the mid-size ones")
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("gpu_packing_hybrid: no CUDA GPU here. This check runs fla's varlen kernels, which need one; "
                  "use --device cpu --tiny to check the script's plumbing.", file=sys.stderr)
            return 2
        if importlib.util.find_spec("fla") is None:
            print("gpu_packing_hybrid: flash-linear-attention is not installed (pip install flash-linear-attention); "
                  "without it the patch takes its per-record torch path, which the CPU tests already cover.",
                  file=sys.stderr)
            return 2
    elif not args.tiny:
        parser.error("--device cpu runs the tiny models only: add --tiny")
    rows = []
    for family in args.families:
        rows.append(check_family(family, args))
        print(f"{family}: done", file=sys.stderr, flush=True)
    import transformers

    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"{'tiny fp32' if args.tiny else 'mid-size bf16'} models, rows of {args.seq_len} tokens")
    header = f"{'family':<12} {'rows':>4} {'records':>7} {'linear path':<17} {'run':<7} {'logit rel':>9} " \
             f"{'loss rel':>9} {'grad cos':>9} ok"
    print(header)
    print("-" * len(header))
    for r in rows:
        for name in ("leaky", "packed"):
            f = r[name]
            ok = ("yes" if r["ok"] else "NO") if name == "packed" else "-"
            print(f"{r['family']:<12} {r['rows']:>4} {r['records']:>7} {r['path']:<17} {name:<7} "
                  f"{f['logit_rel']:>9.2e} {f['loss_rel']:>9.2e} {f['grad_cos']:>9.6f} {ok}")
    print(f"packed must keep logit rel < {MAX_LOGIT_REL:g}, loss rel < {MAX_LOSS_REL:g}, grad cos > {MIN_GRAD_COS:g}")
    failed = [r["family"] for r in rows if not r["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
