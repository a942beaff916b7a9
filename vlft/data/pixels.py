"""Images and video frames -> the patch rows a Qwen-VL vision tower reads, kept as uint8 until the device.

A Qwen-VL processor resizes with torchvision (bicubic, antialiased), rescales and normalises to float32,
then cuts the image into rows of `channels x temporal_patch_size x patch_size**2` values (an image is
repeated `temporal_patch_size` times). We do the same steps in the same order with the same kernels, with
one change: normalisation can wait. Patch rows stay uint8 through the DataLoader workers, the collator, the
shared-memory hop to the training process and the copy to the GPU, and `PixelNorm` turns them into the
processor's float32 values there (train/core/model_inputs.py: `model_inputs`, called by the trainer). That is 4x fewer bytes
on every one of those hops, and no float pass over tens of megabytes per record on a CPU core; the values
the model sees are bit for bit those of the processor (tests/data/test_pixels.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PixelNorm:
    """A processor's rescale + normalise, applied to uint8 patch rows [N, channels * rest]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def of(cls, processor) -> PixelNorm:
        """From an image or video processor's own settings."""
        return cls(mean=tuple(np.atleast_1d(processor.image_mean).tolist()),
                   std=tuple(np.atleast_1d(processor.image_std).tolist()),
                   rescale_factor=float(processor.rescale_factor), do_rescale=bool(processor.do_rescale),
                   do_normalize=bool(processor.do_normalize))

    @functools.cached_property
    def _constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel float32 mean and std, with the rescale folded in when both steps are on; built once."""
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        if self.do_rescale:
            mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
        return mean, std

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 rows, computed as transformers' torchvision processors do: with both steps on, one fused
        (x - mean / rescale) / (std / rescale) in float32, the per-channel constants built the same way."""
        x = rows.to(torch.float32)
        if self.do_normalize:
            mean, std = (t.to(rows.device, non_blocking=True) for t in self._constants)
            channels = x.view(x.shape[0], len(self.mean), -1)  # row layout: channel outermost
            return channels.sub_(mean[:, None]).div_(std[:, None]).view(rows.shape)
        if self.do_rescale:
            return x * self.rescale_factor
        return x


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 [3, H, W] tensor (channels-last in memory, as torchvision's uint8
    resize kernels prefer it)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [..., C, H, W] to (height, width) with the processors' kernel: torchvision bicubic, antialiased."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    from torchvision.transforms.v2 import functional as tvF

    return tvF.resize(image, [height, width], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)


def patchify(frames: torch.Tensor, *, patch_size: int, merge_size: int,
             temporal_patch_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[T, C, H, W] (an image: T = 1) -> rows [grid_t * grid_h * grid_w, C * temporal_patch_size * patch_size**2]
    and the grid (grid_t, grid_h, grid_w), as the processors return `pixel_values` and `*_grid_thw`.

    Row order and row layout are those of transformers' Qwen-VL processors: merge windows of merge x merge
    patches in raster order, each row channel-major, then time, then the patch's pixels. T is padded to a
    multiple of temporal_patch_size with copies of the last frame. H and W must be multiples of
    patch_size * merge_size (sizes from `smart_size` are)."""
    t, c, h, w = frames.shape
    factor = patch_size * merge_size
    if h % factor or w % factor:
        raise ValueError(f"frame size {w}x{h} is not a multiple of patch_size * merge_size = {factor}")
    if pad := -t % temporal_patch_size:
        tail = frames[-1:].expand(pad, -1, -1, -1)
        frames = tail.expand(temporal_patch_size, -1, -1, -1) if t == 1 else torch.cat([frames, tail])
        t += pad
    if frames.stride(-1) != 1:
        frames = frames.contiguous()
    gt, gh, gw, m, p = t // temporal_patch_size, h // patch_size, w // patch_size, merge_size, patch_size
    out = torch.empty((gt * gh * gw, c * temporal_patch_size * p * p), dtype=frames.dtype)
    src, dst, last = frames, out, p
    if frames.element_size() == 1 and p % 2 == 0 and all(s % 2 == 0 for s in frames.stride()[:-1]):
        # the gather moves runs of `p` bytes; as pairs of pixels it moves half as many elements
        src, dst, last = frames.view(torch.int16), out.view(torch.int16), p // 2
    src = src.view(gt, temporal_patch_size, c, gh // m, m, p, gw // m, m, last).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    dst.view(gt, gh // m, gw // m, m, m, c, temporal_patch_size, p, last).copy_(src)
    return out, (gt, gh, gw)
