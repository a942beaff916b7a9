"""Per-token log-probs of completion tokens from one forward of the model's library `forward`, for the stages
that score completions (DPO pairs, GRPO rollouts): only the logits followed by a completion token are built."""
from __future__ import annotations

import torch

from vlft.constants import IGNORE_INDEX

# batch keys of vlft's stages that are not model arguments
NON_MODEL_KEYS = ("labels", "pair_index", "image_pairs", "video_pairs", "advantages", "ref_per_token_logps",
                  "old_per_token_logps", "record")
MEDIA_PAIRS = (("image", "pixel_values", "image_grid_thw", "image_pairs"),
          ("video", "pixel_values_videos", "video_grid_thw", "video_pairs"))


def encode_vision_once(model, inputs: dict) -> dict:
    """The batch with each pair's pictures encoded once: the vision tower runs on the chosen rows' images and
    videos (plus any dummy media), and its outputs are given to the model's forward twice, once for the chosen
    rows and once for the rejected rows, through the library's public `mm_encoder_outputs` argument
    (transformers >= 5.2x; Qwen3-VL's deepstack features included). The grids stay complete (2n + dummies), so
    mRoPE positions and Qwen2.5-VL's `second_per_grid_ts` are those of the plain batch.

    Exact: the tower encodes every image (video) on its own (attention within one picture), so the features of
    a picture do not depend on what else is in the batch; the gradient of a feature used twice is the sum of
    both uses, which is what the plain path accumulates over its two encodings (tests/train/
    test_dpo_vision_once.py compares loss and gradients). Returns a new dict; batches without media pass."""
    inputs = dict(inputs)
    inner = None
    encoded = {}
    for kind, pixels_key, grid_key, pairs_key in MEDIA_PAIRS:
        pixels, grid = inputs.get(pixels_key), inputs.get(grid_key)
        if pixels is None or pairs_key not in inputs:
            continue
        n = int(inputs[pairs_key])
        if inner is None:
            from vlft.models.patches import unwrap_model

            bare = model
            while hasattr(bare, "module"):  # DDP / DeepSpeed engine around the model
                bare = bare.module
            inner = unwrap_model(bare).model
        rows = grid.prod(-1)
        first, second = int(rows[:n].sum()), int(rows[:2 * n].sum())
        unique_pixels = torch.cat([pixels[:first], pixels[second:]])
        unique_grid = torch.cat([grid[:n], grid[2 * n:]])
        encode = inner.get_image_features if kind == "image" else inner.get_video_features
        out = encode(unique_pixels, unique_grid, return_dict=True)
        out.pooler_output = _twice(out.pooler_output, n)
        if getattr(out, "deepstack_features", None) is not None:
            out.deepstack_features = [_twice(level, n) for level in out.deepstack_features]
        encoded[kind] = out
        del inputs[pixels_key]
    if encoded:
        inputs["mm_encoder_outputs"] = encoded
    return inputs


def _twice(parts, n: int) -> tuple:
    """Per-picture outputs [the n shared ones, extras] -> [the n, the n again, extras]."""
    return tuple(parts[:n]) * 2 + tuple(parts[n:])


def completion_log_probs(model, inputs: dict, *, vision_once: bool = False,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion tokens of a preference batch, from one forward of `model`.

    inputs: the model's keyword arguments plus `labels` [N, L] (token ids on the completion tokens,
        IGNORE_INDEX elsewhere; `pair_index` is ignored).
    vision_once: encode each pair's pictures once (`encode_vision_once`; needs the collator's `image_pairs`).
    temperature: the logits are divided by it first (GRPO: the log-probs of the sampling distribution, as TRL).
    Returns (log_probs [N, M], mask [N, M]): nats in float32 (or the logits' dtype if wider), and 0/1; aligned:
    column m is the log-prob of the token at column `kept[m] + 1` given everything before it, where `kept` are
    the M positions (ascending) whose next token is a completion token in at least one row. Only those positions'
    logits are built (the model's `logits_to_keep` takes the index tensor): the prompt's and the vision tokens'
    never are."""
    labels = inputs["labels"]
    if vision_once:
        inputs = encode_vision_once(model, inputs)
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    kept = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()[:, 0]
    if kept.numel() == 0:  # nothing to learn in this batch (e.g. every GRPO completion masked): the forward still
        kept = torch.tensor([labels.shape[1] - 2], device=labels.device)  # runs (collectives), every mask is 0
    logits = model(**model_kwargs, use_cache=False, logits_to_keep=kept).logits
    targets = labels[:, kept + 1]
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    rows = []
    for b in range(logits.shape[0]):  # one row at a time: the float32 copy of [M, vocab] logits is the peak
        row = logits[b].to(torch.promote_types(logits.dtype, torch.float32))
        if temperature != 1.0:
            row = row / temperature
        rows.append(row.gather(-1, safe[b, :, None])[:, 0] - torch.logsumexp(row, dim=-1))
    per_token = torch.stack(rows) * mask
    return per_token, mask.long()
