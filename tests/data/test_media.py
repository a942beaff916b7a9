import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageFile
from qwen_vl_utils import smart_resize

from vlft.data.media import MediaError, fit_image, image_token_count, load_image, resolve_media_path, smart_size
from vlft.errors import VlftError
from vlft.models.registry import get_family

# Qwen2-VL's default image budgets (3136 and 12845056 pixels)
DEFAULT_IMAGE_MIN_PIXELS, DEFAULT_IMAGE_MAX_PIXELS = (get_family("qwen2_vl").default_pixel_budgets()[k]
                                                  for k in ("image_min_pixels", "image_max_pixels"))

EXAMPLES = Path(__file__).resolve().parents[2] / "data_examples" / "images"


def close(pixel, expected, tol=24):
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


# --- paths ---


def test_resolve_media_path(tmp_path):
    data_file = str(tmp_path / "sets" / "train.json")
    assert resolve_media_path("/abs/a.png", "/images", data_file) == Path("/abs/a.png")
    assert resolve_media_path("sub/a.png", "/images", data_file) == Path("/images/sub/a.png")
    assert resolve_media_path("sub/a.png", None, data_file) == tmp_path / "sets" / "sub" / "a.png"
    assert resolve_media_path("a.png", "", data_file) == tmp_path / "sets" / "a.png"
    assert resolve_media_path("a.png", None, "train.json") == Path("a.png")


# --- sizes ---

SIDES = [1, 2, 7, 13, 14, 15, 27, 28, 29, 56, 100, 224, 333, 480, 500, 640, 1080, 1920, 3000, 4032, 8000, 20000]
BOUNDS = [
    (DEFAULT_IMAGE_MIN_PIXELS, DEFAULT_IMAGE_MAX_PIXELS),
    (4 * 28 * 28, 256 * 28 * 28),
    (256 * 28 * 28, 1280 * 28 * 28),
    (32 * 32, 16384 * 32 * 32),
    (3136, 4 * 3136),
    (100 * 100, 100 * 100),
]


@pytest.mark.parametrize("factor", [16, 28, 32])
@pytest.mark.parametrize("min_pixels, max_pixels", BOUNDS)
def test_smart_size_matches_qwen_vl_utils_and_the_processor(factor, min_pixels, max_pixels):
    """qwen-vl-utils' rule wherever no side rounds to 0 patches; there it keeps one patch row for that side while
    transformers' image processor (whose rule smart_size is) scales the whole image up to min_pixels, and the
    processor is what inference runs: checked against the processor's own grid on those sizes."""
    checked = thin = 0
    processor = transformers.Qwen2VLImageProcessor(patch_size=factor // 2, merge_size=2, min_pixels=min_pixels,
                                                   max_pixels=max_pixels)
    for height, width in itertools.product(SIDES, SIDES):
        if max(height, width) / min(height, width) > 200:
            continue
        got = smart_size(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        if round(min(height, width) / factor) > 0:
            expected = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
            # qwen_vl_utils floors a very thin side to 0 under a small max_pixels; we keep one patch row instead
            expected = tuple(max(factor, side) for side in expected)
            assert got == expected, (height, width)
        else:
            img = Image.new("RGB", (width, height), (90, 120, 150))
            grid = processor(images=[img], return_tensors="pt")["image_grid_thw"][0].tolist()
            assert [1, got[0] // (factor // 2), got[1] // (factor // 2)] == grid, (height, width)
            thin += 1
        checked += 1
    assert checked > 300 and thin > 10


def test_smart_size_properties():
    h, w = smart_size(1080, 1920, factor=28, min_pixels=3136, max_pixels=1280 * 28 * 28)
    assert h % 28 == 0 and w % 28 == 0 and 3136 <= h * w <= 1280 * 28 * 28
    assert abs(w / h - 1920 / 1080) < 0.05


def test_aspect_ratio_limit():
    assert smart_size(10, 2000, factor=28, min_pixels=3136, max_pixels=12845056)  # exactly 200 is fine
    with pytest.raises(MediaError, match="2001x10"):
        smart_size(10, 2001, factor=28, min_pixels=3136, max_pixels=12845056)


def test_bad_sizes_and_bounds():
    with pytest.raises(MediaError):
        smart_size(0, 10, factor=28, min_pixels=3136, max_pixels=12845056)
    with pytest.raises(VlftError, match="min_pixels"):
        smart_size(100, 100, factor=28, min_pixels=5000, max_pixels=4000)


PROCESSOR_BOUNDS = dict(min_pixels=3136, max_pixels=64 * 64 * 16)


@pytest.fixture(scope="module")
def processor():
    return transformers.Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, **PROCESSOR_BOUNDS)


def processor_tokens(processor, img):
    return int(processor(images=[img], return_tensors="pt")["image_grid_thw"].prod()) // 4


@pytest.mark.parametrize("height, width", [(16, 16), (33, 47), (100, 100), (480, 640), (1080, 1920), (7, 5), (500, 17)])
def test_image_token_count_matches_processor(processor, height, width):
    img = Image.new("RGB", (width, height), (10, 20, 30))
    count = image_token_count(height, width, patch_size=8, merge_size=2, **PROCESSOR_BOUNDS)
    assert count == processor_tokens(processor, img)


@pytest.mark.parametrize("height, width", [(480, 640), (3, 600), (1, 150), (10, 1000)])
def test_processor_keeps_fitted_images_and_agrees_on_count(processor, height, width):
    # The dataset fits images before the processor sees them, so this is the count that training gets. For a
    # side under factor/2 (3x600) it differs from the processor's count on the raw image: the processor rounds
    # that side to 0 and then scales the whole image up, while Qwen-VL's own rule keeps it at one patch row.
    img = fit_image(Image.new("RGB", (width, height)), factor=16, **PROCESSOR_BOUNDS)
    _, fitted_h, fitted_w = img.shape
    count = image_token_count(height, width, patch_size=8, merge_size=2, **PROCESSOR_BOUNDS)
    assert count == processor_tokens(processor, img) == (fitted_h // 8) * (fitted_w // 8) // 4


def test_fit_image():
    img = Image.effect_noise((56, 28), 64).convert("RGB")
    same = fit_image(img, factor=28, min_pixels=28 * 28, max_pixels=10**6)
    assert same.dtype == torch.uint8 and same.shape == (3, 28, 56)
    assert torch.equal(same.permute(1, 2, 0), torch.from_numpy(np.array(img)))  # already fits: pixels untouched
    resized = fit_image(img, factor=28, min_pixels=4 * 56 * 28, max_pixels=10**6)
    assert resized.shape == (3, 56, 112)
    big = fit_image(Image.new("RGB", (1000, 700)), factor=32, min_pixels=3136, max_pixels=256 * 32 * 32)
    _, h, w = big.shape
    assert w % 32 == 0 and h % 32 == 0 and w * h <= 256 * 32 * 32


# --- loading ---


@pytest.mark.parametrize(
    "name, size, probes",
    [
        ("red_square.png", (56, 48), {(28, 24): (255, 0, 0), (1, 1): (0, 0, 255)}),
        ("green_circle.png", (48, 48), {(24, 24): (0, 200, 0), (0, 0): (255, 255, 255), (47, 47): (255, 255, 255)}),
        ("blue_triangle.gif", (40, 56), {(20, 36): (0, 0, 255), (1, 1): (255, 255, 255)}),
        ("gray_gradient.png", (64, 32), {(0, 5): (0, 0, 0), (32, 5): (128, 128, 128), (63, 5): (252, 252, 252)}),
        ("yellow_cmyk.jpg", (48, 40), {(24, 20): (255, 255, 0), (2, 2): (0, 0, 0)}),
        # stored 40x64 and turned by EXIF: displayed 64x40 with the arrow tip at the top centre
        ("rotated_arrow.jpg", (64, 40), {(32, 8): (0, 0, 0), (32, 30): (0, 0, 0), (4, 20): (255, 255, 255)}),
        ("cat_sketch.png", (64, 64), {(32, 50): (240, 140, 30), (1, 1): (255, 255, 255)}),
    ],
)
def test_example_images(name, size, probes):
    img = load_image(EXAMPLES / name)
    assert img.mode == "RGB" and img.size == size
    for xy, colour in probes.items():
        assert close(img.getpixel(xy), colour), (xy, img.getpixel(xy))


def test_exif_example_is_stored_sideways():
    with Image.open(EXAMPLES / "rotated_arrow.jpg") as raw:
        assert raw.size == (40, 64) and raw.getexif()[0x0112] == 6


def test_example_images_are_tiny():
    # 7 colour modes / file quirks, and count_1..5 for the GRPO counting demo
    assert len(list(EXAMPLES.iterdir())) == 12
    assert all(path.stat().st_size < 3000 for path in EXAMPLES.iterdir())


def test_transparency_goes_on_white(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))
    la.putpixel((4, 4), (100, 255))
    la.save(tmp_path / "la.png")
    keyed = Image.new("P", (8, 8), 0)
    keyed.putpalette([0, 0, 0, 255, 0, 0])
    keyed.putpixel((4, 4), 1)
    keyed.save(tmp_path / "keyed.gif", transparency=0)
    for name, centre in [("la.png", (100, 100, 100)), ("keyed.gif", (255, 0, 0))]:
        img = load_image(tmp_path / name)
        assert img.mode == "RGB"
        assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((4, 4)) == centre


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")
    img = load_image(tmp_path / "deep.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (128, 128, 128)


@pytest.fixture
def truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-2000])
    return path


def test_truncated_image(truncated_png):
    with pytest.raises(MediaError, match="truncated") as info:
        load_image(truncated_png)
    assert str(truncated_png) in str(info.value)


def test_truncated_image_fails_even_if_pil_is_set_lenient(truncated_png, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(truncated_png) as img:
        img.load()  # the lenient setting alone would let this broken file through
    with pytest.raises(MediaError):
        load_image(truncated_png)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_text_file_named_png(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("not an image")
    with pytest.raises(MediaError, match="not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_image(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(MediaError, match="does not exist") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(MediaError, match="directory"):
        load_image(tmp_path)
