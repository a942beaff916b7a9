"""Model inputs that the training data sends in a form the model does not take: packed rows and uint8 pixels.

These are data features, not fixes of a library: each lets one model instance (never a class or a module
global) accept what vlft's dataset and collator send, and leaves every other input untouched.

Packed sequences (`packed_positions`)
    Why: with `--packing` a row holds several records back to back. Qwen-VL's mRoPE positions must restart
    for every record and be computed per record (images and videos advance them by their grids), and
    attention must not cross records. transformers 5.2x builds a block-diagonal mask itself when the language
    model gets 4-row position ids ([text, t, h, w]) whose text row restarts at 0 and no attention mask (and no
    cache). The collator sends `pack_layout` (tokens, images, videos per record); `packed_positions` turns it
    into those position ids with the model's own `get_rope_index`, record by record, before the forward runs
    (tests/train/test_packing.py).

uint8 pixels, normalised on the device (`normalize_pixels_on_device`)
    Why: the training dataset sends images and video frames as uint8 patch rows (data/pixels.py: 4x fewer
    bytes through the DataLoader, shared memory and the host-to-device copy, and no float pass on the CPU).
    A forward pre-hook on the inner `Qwen*VLModel` turns uint8 `pixel_values` / `pixel_values_videos` into
    the processor's float32 values (its `image_mean`, `image_std`, `rescale_factor`) on whatever device they
    arrived; float inputs pass untouched, so `predict`, `generate` and callers that use the processor still
    work. The inner model, not the top-level one: PEFT calls the top-level `forward` directly, which skips
    that module's hooks, while the top-level forward calls the inner model as a module. The Trainer moves
    uint8 tensors to the device without casting them (only floating tensors follow the DeepSpeed dtype), and
    the vision tower casts the float32 result to its own dtype, as it does with the processor's output
    (tests/data/test_pixels.py).
"""
from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable

import torch

from vlft.models.patches import unwrap_model

# ---------------------------------------------------------------- packed sequences

_PACKED = "_vlft_packed_original_forward"  # on the inner Qwen*VLModel: the forward packed_positions wraps


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


def _packed_forward(self, *args, **kwargs):
    layout = kwargs.pop("pack_layout", None)
    if layout is None:
        return self.__dict__[_PACKED](*args, **kwargs)
    kwargs["position_ids"] = pack_position_ids(
        self, kwargs["input_ids"], layout, mm_token_type_ids=kwargs.get("mm_token_type_ids"),
        image_grid_thw=kwargs.get("image_grid_thw"), video_grid_thw=kwargs.get("video_grid_thw"),
        second_per_grid_ts=kwargs.get("second_per_grid_ts"))
    kwargs["attention_mask"] = None  # the mask comes from the text positions: block-diagonal
    kwargs["use_cache"] = False  # with a cache transformers would not look for packed sequences
    return self.__dict__[_PACKED](*args, **kwargs)


def packed_positions(model) -> bool:
    """Let the inner `Qwen*VLModel` accept `pack_layout` (see the module docstring). Idempotent."""
    inner = unwrap_model(model).model
    if _PACKED in inner.__dict__:
        return False
    original = inner.forward
    inner.__dict__[_PACKED] = original

    def forward(self, *args, **kwargs):
        return _packed_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, getattr(original, "__func__", original))
    forward._vlft_patch = "packed_positions"
    inner.forward = types.MethodType(forward, inner)
    return True


# ---------------------------------------------------------------- uint8 pixels

_PIXEL_NORM = "_vlft_pixel_norm"  # on the inner Qwen*VLModel: the hook handle of normalize_pixels_on_device


def normalize_pixels_on_device(model, image_norm: Callable, video_norm: Callable) -> bool:
    """Let the model take uint8 patch rows (see the module docstring); `image_norm` / `video_norm` map them to
    float32 (data/pixels.py: `PixelNorm`). Idempotent."""
    inner = unwrap_model(model).model
    if _PIXEL_NORM in inner.__dict__:
        return False

    def hook(module, args, kwargs):
        for key, norm in (("pixel_values", image_norm), ("pixel_values_videos", video_norm)):
            value = kwargs.get(key)
            if value is not None and value.dtype == torch.uint8:
                kwargs[key] = norm(value)
        return args, kwargs

    inner.__dict__[_PIXEL_NORM] = inner.register_forward_pre_hook(hook, with_kwargs=True)
    return True
