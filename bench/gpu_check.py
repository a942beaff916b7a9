"""Liger on a GPU: loss, peak memory and step time of one training step with and without `apply_liger`.

    python bench/gpu_check.py                                   # every family, 2 x 2048 tokens, bf16, cuda
    python bench/gpu_check.py --families qwen2_vl --seq_len 4096
    python bench/gpu_check.py --device cpu --tiny               # plumbing check: tiny models, torch kernels

The families are those of vlft's family table (vlft/models/families/) whose Liger is not refused. For each it
builds a randomly initialised model offline from a config: a Qwen2-VL-2B-sized language model (hidden 1536,
28 layers, 12 heads of 128, 2 KV heads, MLP 8960, vocabulary 151,936) with the family's own text fields
(mRoPE kind, layer kinds, experts: the family descriptor's tiny-build fields at these widths, the experts
and linear-attention heads set to released-like sizes: 64 experts of 512, top 8, Qwen3.5's 3:1 linear to full
attention with 16/32 heads of 128; MoE models route with `output_router_logits` and the library's default
coefficient, so the load-balancing term is compared too), and the vision tower of the family's smallest
release with its depth cut to 8 blocks. It makes one fixed synthetic batch (random text ids, one image per
sequence with its pad tokens, `pixel_values` and `image_grid_thw`, labels on the text after the image), and
runs forward + backward on the same weights first unpatched, then with Liger's kernels. Nothing is
downloaded; no tokenizer is needed.

How to read the table: `loss` must agree to a relative 1e-3 (the script exits 1 otherwise); `grad`
is the relative difference of the total gradient norm (bf16 kernels differ in rounding; expect about
1e-3, it is reported, not gated); `peak` is torch.cuda.max_memory_allocated over the timed steps (weights
and gradients included), `saved` its drop with Liger, mostly the logits that the fused cross-entropy never
materialises; `step` is the median time of a forward + backward. With `--device cpu` the torch reference
kernels stand in for Liger's (which need a GPU) and no memory is reported.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing vlft

import torch  # noqa: E402

from vlft.models.patches import TORCH_KERNELS, apply_kernels, apply_liger  # noqa: E402
from vlft.models.registry import FAMILIES as FAMILY_TABLE  # noqa: E402

FAMILIES = tuple(name for name, family in FAMILY_TABLE.items() if family.refusal("liger") is None)
# Qwen2/3's special token ids (Qwen3.5's vocabulary is larger and holds them too); regular BPE tokens lie below 151643.
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
TEXT_VOCAB = 151643
EOS, PAD = 151645, 151643
MAX_LOSS_REL_DIFF = 1e-3
VISION_DEPTH = 8
HIDDEN, LAYERS, HEADS, HEAD_DIM = 1536, 28, 12, 128
# released-like sizes for what the tiny-build fields keep tiny (set only where the family has the field)
MID_EXPERTS = dict(num_experts=64, num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512)
MID_LINEAR_ATTENTION = dict(linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                            linear_num_value_heads=32)
FULL_ATTENTION_EVERY = 4  # Qwen3.5: three linear-attention layers to one full-attention layer


def _cut_vision(vision: dict, llm_width: int, text_hidden: int) -> dict:
    """A released vision_config with its depth cut to VISION_DEPTH (block index lists rescaled into the new depth)
    and its projection into the LLM (the field that held the release's LLM width) set to `llm_width`."""
    depth = vision["depth"]
    cut = {key: sorted({min(VISION_DEPTH - 1, i * VISION_DEPTH // depth) for i in value})
           for key, value in vision.items() if isinstance(value, list) and all(isinstance(i, int) for i in value)}
    out = next(key for key in ("out_hidden_size", "hidden_size") if vision.get(key) == text_hidden)
    return {**vision, **cut, "depth": VISION_DEPTH, out: llm_width}


def mid_config(family: str):
    """A Qwen2-VL-2B-sized language model with the family's own text fields, on the vision tower of the family's
    smallest release (depth cut to 8). See the module docstring."""
    import transformers

    fam = FAMILY_TABLE[family]
    text = dict(vocab_size=151936, hidden_size=HIDDEN, intermediate_size=8960, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                hidden_act="silu", initializer_range=0.02, bos_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD)
    text.update(fam.tiny.text(HIDDEN, LAYERS, HEADS, HEAD_DIM))  # mRoPE kind, layer kinds, experts
    text.update({key: value for key, value in {**MID_EXPERTS, **MID_LINEAR_ATTENTION}.items() if key in text})
    if "linear_attention" in text.get("layer_types", ()):
        text["layer_types"] = ["full_attention" if (i + 1) % FULL_ATTENTION_EVERY == 0 else "linear_attention"
                               for i in range(LAYERS)]
    release_text, release_vision, _ = next(iter(fam.presets.values()))  # the smallest release
    vision = _cut_vision(release_vision, HIDDEN, release_text["hidden_size"])
    config_class = getattr(transformers, fam.model_class).config_class
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=False, attn_implementation="sdpa",
                        **QWEN_IDS)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(family: str, *, tiny: bool, device: str):
    """(model, text vocabulary size): weights created directly on `device` (bf16 there, fp32 for tiny)."""
    import transformers

    torch.manual_seed(0)
    if tiny:
        from vlft.models.tiny import build_model, build_tokenizer

        tokenizer = build_tokenizer(family)
        return build_model(family, tokenizer).to(device), tokenizer.vocab_size
    config = mid_config(family)
    with default_dtype(torch.bfloat16), torch.device(device):
        model = getattr(transformers, FAMILY_TABLE[family].model_class)(config)
    return model, TEXT_VOCAB


def make_batch(model, *, batch_size: int, seq_len: int, text_vocab: int, device: str) -> dict:
    """Per sequence: 8 text tokens, <vision_start>, the image's pad tokens, <vision_end>, text to seq_len;
    labels on the text after the image."""
    config, vision = model.config, model.config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    side = min(16, math.isqrt(seq_len // 4)) * merge  # patches per image side: 256 image tokens at 2048
    n_image = (side // merge) ** 2
    start = 8
    end = start + 1 + n_image  # position of <vision_end>
    if end + 2 > seq_len:
        raise SystemExit(f"--seq_len {seq_len} is too short for an image of {n_image} tokens")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text_vocab, (batch_size, seq_len), generator=gen)
    ids[:, start] = config.vision_start_token_id
    ids[:, start + 1:end] = config.image_token_id
    ids[:, end] = config.vision_end_token_id
    labels = ids.clone()
    labels[:, :end + 1] = -100
    dtype = next(model.parameters()).dtype
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(batch_size * side * side, 3 * temporal * patch * patch, generator=gen).to(dtype),
        "image_grid_thw": torch.tensor([[1, side, side]] * batch_size),
    }
    # transformers >= 5.2x builds mRoPE positions from it; older versions do not take it
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        batch["mm_token_type_ids"] = (ids == config.image_token_id).long()
    return {key: value.to(device) for key, value in batch.items()}


def measure(model, batch, *, steps: int, device: str) -> dict:
    """One warm-up step (Triton compiles there), then `steps` timed forward + backward passes."""
    cuda = device.startswith("cuda")

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        return out

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    result = {
        "loss": out.loss.item(),
        "logits": out.logits is not None,
        "grad_norm": torch.linalg.vector_norm(torch.stack(grads)).item(),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan,
        "step_s": statistics.median(times),
    }
    model.zero_grad(set_to_none=True)
    return result


def check_family(family: str, args) -> dict:
    model, text_vocab = build(family, tiny=args.tiny, device=args.device)
    model.train()
    text_config = model.config.text_config
    if getattr(text_config, "num_experts", None):  # route with the load-balancing term: the fused loss must add it
        text_config.output_router_logits, text_config.router_aux_loss_coef = True, 0.001
    model.config.use_cache = False
    batch = make_batch(model, batch_size=args.batch_size, seq_len=args.seq_len, text_vocab=text_vocab, device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    plain = measure(model, batch, steps=args.steps, device=args.device)
    if args.device.startswith("cuda"):
        if not apply_liger(model):
            raise SystemExit("apply_liger did not apply on a CUDA model")
        kernels = "liger"
    else:  # Liger's kernels need a GPU: the same patching code with the torch reference kernels
        apply_kernels(model, TORCH_KERNELS)
        kernels = "torch"
    fused = measure(model, batch, steps=args.steps, device=args.device)
    del model, batch
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    loss_diff = abs(fused["loss"] - plain["loss"]) / abs(plain["loss"])
    return dict(family=family, params=n_params, kernels=kernels, plain=plain, fused=fused, loss_diff=loss_diff,
                grad_diff=abs(fused["grad_norm"] - plain["grad_norm"]) / plain["grad_norm"],
                ok=loss_diff < MAX_LOSS_REL_DIFF and math.isfinite(fused["loss"]) and not fused["logits"])


def print_table(rows: list[dict], args) -> None:
    import transformers

    print(f"\ntorch {torch.__version__}, transformers {transformers.__version__}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
          f"{'tiny' if args.tiny else 'mid-size'} models, batch {args.batch_size} x {args.seq_len} tokens")
    header = (f"{'family':<13} {'params':>7} {'kernels':>7} {'loss plain':>11} {'loss fused':>11} {'loss rel':>9} "
              f"{'grad rel':>9} {'peak plain':>11} {'peak fused':>11} {'saved':>6} {'step plain':>11} {'step fused':>11} ok")
    print(header)
    print("-" * len(header))
    for r in rows:
        p, f = r["plain"], r["fused"]
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.1f}M"
        if math.isfinite(p["peak_gib"]):
            peaks = f"{p['peak_gib']:>8.2f}GiB {f['peak_gib']:>8.2f}GiB {1 - f['peak_gib'] / p['peak_gib']:>6.1%}"
        else:
            peaks = f"{'-':>11} {'-':>11} {'-':>6}"
        print(f"{r['family']:<13} {params:>7} {r['kernels']:>7} {p['loss']:>11.6f} {f['loss']:>11.6f} "
              f"{r['loss_diff']:>9.1e} {r['grad_diff']:>9.1e} {peaks} "
              f"{p['step_s'] * 1e3:>9.0f}ms {f['step_s'] * 1e3:>9.0f}ms {'yes' if r['ok'] else 'NO'}")
    print(f"loss rel must be < {MAX_LOSS_REL_DIFF:g}; 'fused' ran without materialising logits.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default 2048; 128 with --tiny)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode, after one warm-up step")
    parser.add_argument("--device", default="cuda", help="cuda (Liger) or cpu (torch reference kernels)")
    parser.add_argument("--tiny", action="store_true", help="the tiny offline models (fp32) instead of the mid-size ones")
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --device cpu --tiny to check the script's plumbing")
    rows = []
    for family in args.families:
        rows.append(check_family(family, args))
        print(f"{family}: done", file=sys.stderr, flush=True)
    print_table(rows, args)
    failed = [r["family"] for r in rows if not r["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
