"""Image files -> RGB images at the size the Qwen-VL vision encoder will see."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from vlft.data.pixels import image_to_tensor, resize
from vlft.errors import VlftError

MAX_ASPECT_RATIO = 200  # Qwen-VL's limit; beyond it one side would shrink below a single patch


class MediaError(VlftError):
    """An image (or later a video) that cannot be used."""


def resolve_media_path(path: str, image_folder: str | None, data_file: str) -> Path:
    """Relative paths are relative to --image_folder, or to the data file's folder when it is not given."""
    p = Path(path)
    if p.is_absolute():
        return p
    base = Path(image_folder) if image_folder else Path(data_file).parent
    return base / p


def smart_size(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's target (height, width) in pixels for an image: multiples of factor, pixel count within bounds,
    aspect ratio kept.

    The rule is transformers' own `smart_resize` (models/qwen2_vl/image_processing_qwen2_vl.py), the one the
    image processors apply at inference, so token counts and pixels agree with them. Its ValueError (aspect ratio
    over 200) becomes a MediaError naming the size; the checks it lacks (an empty image, bounds the wrong way round)
    come first. Video frames follow qwen-vl-utils' variant instead (video_sampling.frame_size).
    """
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if height <= 0 or width <= 0:
        raise MediaError(f"image size {width}x{height} (width x height) is empty")
    if min_pixels > max_pixels:
        raise VlftError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels}); lower it")
    try:
        h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:  # transformers' only refusal: the aspect ratio
        raise MediaError(f"image size {width}x{height} (width x height) has an aspect ratio over "
                         f"{MAX_ASPECT_RATIO}, Qwen-VL's limit; crop or pad it (transformers: {e})") from e
    if h <= 0 or w <= 0:  # a side under factor / 2 with min_pixels 0: no patch at all
        raise MediaError(f"image size {width}x{height} (width x height) fits no {factor}x{factor} patch under "
                         f"min_pixels {min_pixels}; raise the image min_pixels")
    return h, w


def image_grid(height: int, width: int, *, patch_size: int, merge_size: int, min_pixels: int,
               max_pixels: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of an image of this original size once fitted with factor patch_size * merge_size."""
    h, w = smart_size(height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels)
    return 1, h // patch_size, w // patch_size


def image_token_count(height: int, width: int, *, patch_size: int, merge_size: int, min_pixels: int,
                      max_pixels: int) -> int:
    """Image pad tokens for an image of this original size, once fitted with factor patch_size * merge_size."""
    t, h, w = image_grid(height, width, patch_size=patch_size, merge_size=merge_size, min_pixels=min_pixels,
                         max_pixels=max_pixels)
    return t * h * w // merge_size**2


_STRICT_LOCK = threading.Lock()


@contextmanager
def _strict_decoding():
    # Another library may have set this global to True; a half-decoded image would then train as grey noise.
    # Restored afterwards so we never change what the rest of the process sees. In the usual case (False)
    # nothing is touched, so threads decoding in parallel (the data check) never serialise on the lock.
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _STRICT_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turn it upright per EXIF, and convert it to RGB."""
    path = Path(path)
    with _media_errors(path), _strict_decoding(), Image.open(path) as img:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    return _to_rgb(img)


# EXIF orientations that turn the image by a quarter (transpose, rotate 270, transverse, rotate 90): the displayed
# width is the stored height (EXIF 2.32 tag 0x0112; Pillow ImageOps.exif_transpose's table)
_SIDEWAYS_ORIENTATIONS = frozenset({5, 6, 7, 8})


def probe_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) in pixels of the image `load_image(path)` returns (upright per EXIF), checked to decode
    more cheaply than load_image does it (JPEG: 1.3-2.6x faster here, the larger the image the more; PNG: the same).

    Every byte of compressed data is still decoded, since that is what finds a truncated or corrupt file;
    what is skipped is the work that only makes pixels. A JPEG is decoded with Pillow's `draft` at 1/8 scale
    (JpegImagePlugin.draft sets libjpeg's scale_denom, the scaled IDCT): libjpeg still reads and entropy-decodes
    the whole stream, every scan of a progressive file included, but writes 1/64 of the pixels. The size is
    read before `draft`, which shrinks `img.size`. Other formats have no such shortcut (PNG is inflate, then
    unfiltering) and are fully decoded; for all, the RGB conversion and the EXIF transpose copy are skipped:
    only the orientation tag matters for the size (5-8 swap the sides). The EXIF block is parsed as load_image
    parses it (`getexif`), so a broken one fails both.

    Raises MediaError where load_image does, with the same messages: missing file, a directory, not an image,
    decompression bomb, truncated or corrupt. Pillow's global LOAD_TRUNCATED_IMAGES is ignored, as there.
    """
    path = Path(path)
    with _media_errors(path), _strict_decoding(), Image.open(path) as img:
        width, height = img.size
        # no-op for formats without a draft mode; (1, 1) at least, or Pillow divides by zero on a side under 8
        img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return (width, height) if orientation in _SIDEWAYS_ORIENTATIONS else (height, width)


@contextmanager
def _media_errors(path: Path):
    """Pillow's and the OS's failures while opening and decoding an image -> one MediaError naming the file."""
    try:
        yield
    except FileNotFoundError as e:
        raise MediaError(f"image {path} does not exist") from e
    except IsADirectoryError as e:
        raise MediaError(f"image {path} is a directory, not an image file") from e
    except UnidentifiedImageError as e:
        raise MediaError(f"image {path} is not an image file Pillow can read (unknown or broken format)") from e
    except Image.DecompressionBombError as e:
        raise MediaError(f"image {path} is too large to decode safely: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"image {path} is truncated or corrupt and could not be decoded: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # transparent pixels often hold black; on white they look as the image was meant to be seen
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        # Pillow clips wide grey values to 255 instead of scaling, which turns 16-bit scans white
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or values.max() > 255:
            values = values / 257
        grey = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8))
        return grey.convert("RGB")
    return img.convert("RGB")


def fit_image(img: Image.Image, *, factor: int, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """The image as a uint8 [3, H, W] tensor at smart_size, resized with the Qwen-VL processors' own kernel
    (torchvision bicubic, antialiased), so that training sees the pixels inference will see."""
    h, w = smart_size(img.height, img.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return resize(image_to_tensor(img), h, w)
