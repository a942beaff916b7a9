"""Per-token log-probs of completion tokens from one forward of the model's library `forward`, for the stages
that score completions (DPO pairs, GRPO rollouts): only the logits followed by a completion token are built."""
from __future__ import annotations

import torch

from vlft.constants import IGNORE_INDEX

# batch keys of vlft's stages that are not model arguments
NON_MODEL_KEYS = ("labels", "pair_index", "image_copy_of", "video_copy_of", "advantages", "ref_per_token_logps",
                  "old_per_token_logps", "sampling_logps", "record")
# (kind, pixels key, grid key, the preference collator's key saying which pictures repeat which: data/dpo.py)
MEDIA_COPIES = (("image", "pixel_values", "image_grid_thw", "image_copy_of"),
                ("video", "pixel_values_videos", "video_grid_thw", "video_copy_of"))


def picture_sources(inputs: dict, copies_key: str, grid_key: str) -> list[int]:
    """For each picture of one kind in a preference batch (the rows of inputs[grid_key]), the index of the picture
    whose features it takes: `copies_key` (data/dpo.py: PreferenceCollator) covers the pictures of the 2B rows, any
    distributed dummy media after them are their own. [] when the batch has no picture of that kind."""
    grid = inputs.get(grid_key)
    if grid is None:
        return []
    copy_of = inputs[copies_key].tolist() if copies_key in inputs else []
    return copy_of + list(range(len(copy_of), grid.shape[0]))


def encode_vision_once(model, inputs: dict) -> dict:
    """The batch with each distinct picture encoded once: the vision tower runs on the pictures that
    `image_copy_of` / `video_copy_of` (data/dpo.py: PreferenceCollator) mark as their own (the chosen rows', an
    image-side pair's rejected ones, any dummy media), and each repeated picture (a rejected row showing the
    prompt's pictures) gets the features of the one it repeats, all given to the model's forward through the
    library's public `mm_encoder_outputs` argument (transformers >= 5.2x; Qwen3-VL's deepstack features included).
    The grids stay complete, so mRoPE positions and Qwen2.5-VL's `second_per_grid_ts` are those of the plain batch.

    Exact: the tower encodes every image (video) on its own (attention within one picture), so the features of
    a picture do not depend on what else is in the batch; the gradient of a feature used twice is the sum of
    both uses, which is what the plain path accumulates over its two encodings (tests/train/
    test_dpo_vision_once.py compares loss and gradients). Returns a new dict, or `inputs` itself when the batch has
    no pictures."""
    sources = {kind: picture_sources(inputs, copies_key, grid_key)  # itself: encoded
               for kind, pixels_key, grid_key, copies_key in MEDIA_COPIES if inputs.get(pixels_key) is not None}
    if not sources:
        return inputs  # no pictures
    # even when nothing repeats, the pictures go through the same calls: under ZeRO-3 every process must run the
    # same module calls in the same order (their parameter gathers are collectives), whatever its batch holds
    from vlft.models.patches import unwrap_model

    bare = model
    while hasattr(bare, "module"):  # DDP / DeepSpeed engine around the model
        bare = bare.module
    inner = unwrap_model(bare).model
    inputs = dict(inputs)
    encoded = {}
    for kind, pixels_key, grid_key, _ in MEDIA_COPIES:
        if kind not in sources:
            continue
        # every kind goes through mm_encoder_outputs once one does (the forward takes pixels or features, not both)
        pixels, grid, source = inputs.pop(pixels_key), inputs[grid_key], sources[kind]
        unique = [j for j, s in enumerate(source) if s == j]
        ends = grid.prod(-1).cumsum(0).tolist()
        unique_pixels = torch.cat([pixels[(ends[j - 1] if j else 0):ends[j]] for j in unique])
        encode = inner.get_image_features if kind == "image" else inner.get_video_features
        out = encode(unique_pixels, grid[unique], return_dict=True)
        slot = {j: k for k, j in enumerate(unique)}
        order = [slot[s] for s in source]  # each picture's features: those of the picture it repeats
        out.pooler_output = tuple(out.pooler_output[k] for k in order)
        if getattr(out, "deepstack_features", None) is not None:
            out.deepstack_features = [tuple(level[k] for k in order) for level in out.deepstack_features]
        encoded[kind] = out
    inputs["mm_encoder_outputs"] = encoded
    return inputs


def completion_columns(labels: torch.Tensor) -> torch.Tensor:
    """The positions `kept` [M] (ascending) whose next token is a completion token (label != IGNORE_INDEX) in at
    least one row of `labels` [N, L]: column m of `completion_log_probs` scores the token at `kept[m] + 1`, so a
    per-position tensor X [N, L] aligned with the input ids lines up with its output as X[:, kept + 1]. A batch with
    no completion token gets one column (its mask is 0 there): the forward still runs (collectives)."""
    kept = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()[:, 0]
    if kept.numel() == 0:  # nothing to learn in this batch (e.g. every GRPO completion masked)
        kept = torch.tensor([labels.shape[1] - 2], device=labels.device)
    return kept


def completion_log_probs(model, inputs: dict, *, vision_once: bool = False,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion tokens of a preference batch, from one forward of `model`.

    inputs: the model's keyword arguments plus `labels` [N, L] (token ids on the completion tokens,
        IGNORE_INDEX elsewhere; `pair_index` is ignored).
    vision_once: encode each distinct picture once (`encode_vision_once`; reads the collator's `image_copy_of`).
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
    kept = completion_columns(labels)
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
