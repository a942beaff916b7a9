"""A vlft batch -> the keyword arguments of the model's own (library) forward, on the device.

Two data features of vlft reach the model here, through its public arguments, not through a replaced forward
(so `generate` and every other caller meet the library's forward unchanged):

uint8 pixels (`pixel_values`, `pixel_values_videos`)
    The training dataset sends images and video frames as uint8 patch rows (data/pixels.py: 4x fewer bytes
    through the DataLoader workers, shared memory and the host-to-device copy, and no float pass on the CPU).
    They are normalised here, on the device, into exactly the processor's float32 values (its `image_mean`,
    `image_std`, `rescale_factor`); the vision tower casts them to its own dtype as it does with the
    processor's output. Float inputs pass untouched.

Packed rows (`pack_layout`)
    With `--packing` a row holds several records back to back. Qwen-VL's mRoPE positions must restart for every
    record and be computed per record (images and videos advance them by their grids), and attention must not
    cross records. transformers 5.2x builds a block-diagonal causal mask itself when the language model gets
    4-row position ids ([text, t, h, w]) whose text row restarts at 0, no attention mask and no cache. The
    collator sends `pack_layout` (tokens, images, videos, is_record per segment); it becomes those position ids,
    computed with the model's own `get_rope_index`, record by record. Linear-attention (Gated DeltaNet) layers
    read no mask: on the first packed batch the model gets vlft's patch that makes them split their rows at the
    same restarts of the text positions (models/patches/linear_attention.py; a no-op for models without them).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from vlft.models.patches import separate_packed_records, unwrap_model


def model_inputs(inputs: dict, model, *, image_norm: Callable | None = None,
                 video_norm: Callable | None = None) -> dict:
    """Turn a batch of vlft's collators (already on the device) into the model's forward arguments: uint8
    pixels normalised with `image_norm` / `video_norm` (data/pixels.py: PixelNorm), and `pack_layout` replaced
    by per-record `position_ids` [4, B, L] (with `attention_mask=None`, `use_cache=False`). Returns a new dict;
    a batch with neither passes through unchanged."""
    inputs = dict(inputs)
    inputs.pop("record", None)  # dataset indices of the batch's records: for error messages, not for the model
    for key, norm in (("pixel_values", image_norm), ("pixel_values_videos", video_norm)):
        value = inputs.get(key)
        if value is not None and value.dtype == torch.uint8:
            if norm is None:
                raise ValueError(f"{key} are uint8 but no normalisation was given for them")
            inputs[key] = norm(value)
    layout = inputs.pop("pack_layout", None)
    if layout is not None:
        separate_packed_records(model)  # once per model: Gated DeltaNet layers keep the records apart too
        inputs["position_ids"] = pack_position_ids(
            unwrap_model(model).model, inputs["input_ids"], layout, mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"))
        inputs["attention_mask"] = None  # the mask comes from the text positions: block-diagonal
        inputs["use_cache"] = False  # with a cache transformers would not look for packed sequences
    return inputs


def pack_position_ids(inner, input_ids, layout, *, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                      second_per_grid_ts=None) -> torch.Tensor:
    """[4, B, L] position ids for packed rows: text positions restarting at 0 per record, then the model's
    own mRoPE (t, h, w) positions computed for each record alone."""
    accepted = inspect.signature(inner.get_rope_index).parameters
    batch, length = input_ids.shape
    out = torch.zeros((4, batch, length), dtype=torch.long, device=input_ids.device)
    image_at = video_at = 0
    for b in range(batch):
        start = 0
        for n_tokens, n_images, n_videos, _ in layout[b].tolist():
            if n_tokens == 0:
                break
            end = start + n_tokens
            out[0, b, start:end] = torch.arange(n_tokens, device=input_ids.device)
            kwargs = {"attention_mask": torch.ones((1, n_tokens), dtype=torch.long, device=input_ids.device)}
            if mm_token_type_ids is not None:
                kwargs["mm_token_type_ids"] = mm_token_type_ids[b:b + 1, start:end]
            if n_images:
                kwargs["image_grid_thw"] = image_grid_thw[image_at:image_at + n_images]
            if n_videos:
                kwargs["video_grid_thw"] = video_grid_thw[video_at:video_at + n_videos]
                if second_per_grid_ts is not None:
                    kwargs["second_per_grid_ts"] = second_per_grid_ts[video_at:video_at + n_videos]
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
            rope, _ = inner.get_rope_index(input_ids[b:b + 1, start:end], **kwargs)
            out[1:, b, start:end] = rope[:, 0]
            image_at += n_images
            video_at += n_videos
            start = end
    return out
