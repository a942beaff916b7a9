"""probe_image_size (the data check's cheap decode) against load_image (what training decodes): the same size, and a
MediaError on every damaged file load_image refuses."""
import io

import numpy as np
import pytest
from PIL import Image

from vlft.data.media import MediaError, load_image, probe_image_size


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [height, width, 3]: smooth gradients plus noise, so that JPEG and PNG compress as they do photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                     127.5 + 127.5 * np.sin((x + y) / 23.0)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def good_images() -> dict[str, bytes]:
    """name -> file bytes, one per format and colour mode the data check meets (size 160x120 unless named)."""
    rgb = Image.fromarray(photo(160, 120))
    grey = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(photo(160, 120, seed=1)[..., 0]))
    deep = Image.fromarray(photo(160, 120)[..., 0].astype(np.uint16) * 257)  # I;16
    files = {
        "baseline.jpg": _encode(rgb, "JPEG", quality=90),
        "progressive.jpg": _encode(rgb, "JPEG", quality=90, progressive=True),
        "grey.jpg": _encode(grey, "JPEG", quality=90),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "subsampled_444.jpg": _encode(rgb, "JPEG", quality=95, subsampling=0),
        "rotated6.jpg": _encode(rgb, "JPEG", quality=90, exif=_exif(6)),
        "rgb.png": _encode(rgb, "PNG"),
        "rgba.png": _encode(rgba, "PNG"),
        "grey16.png": _encode(deep, "PNG"),
        "palette.gif": _encode(rgb.convert("P"), "GIF"),
        "lossy.webp": _encode(rgb, "WEBP", quality=80),
        "lossless.webp": _encode(rgba, "WEBP", lossless=True),
        "rgb.bmp": _encode(rgb, "BMP"),
        "raw.tif": _encode(rgb, "TIFF"),
        "deflate.tif": _encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "jpeg_in.tif": _encode(rgb, "TIFF", compression="jpeg"),
    }
    return files


def damaged(name: str, data: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    """Variants of one good file: cut at several points, bytes overwritten in the data and in the header."""
    n = len(data)
    out = {f"cut{pct}_{name}": data[: n * pct // 100] for pct in (10, 50, 90)}
    out[f"cut_last2_{name}"] = data[:-2]
    out[f"cut_last1_{name}"] = data[:-1]
    for where in (30, 50, 70):
        start = n * where // 100
        zeros = bytearray(data)
        zeros[start:start + 64] = bytes(64)
        out[f"zeros{where}_{name}"] = bytes(zeros)
        noise = bytearray(data)
        noise[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        out[f"noise{where}_{name}"] = bytes(noise)
    for lo, hi in ((0, 4), (4, 40)):
        head = bytearray(data)
        head[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
        out[f"head{lo}_{name}"] = bytes(head)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Paths of damaged files (plus an empty file, a text file, a directory, a missing path)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    paths = []
    for name, data in good_images().items():
        for bad_name, bad in damaged(name, data, rng).items():
            path = root / bad_name
            path.write_bytes(bad)
            paths.append(path)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image\n")
    (root / "folder.jpg").mkdir()
    paths += [root / "empty.jpg", root / "text.jpg", root / "folder.jpg", root / "missing.jpg"]
    return paths


def _outcome(fn, path):
    try:
        return fn(path)
    except MediaError as e:
        return e


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Truncated File Read")  # Pillow, on the damaged TIFFs
def test_probe_refuses_every_file_load_image_refuses(corpus):
    refused = accepted = 0
    missed = []
    for path in corpus:
        full = _outcome(load_image, path)
        probe = _outcome(probe_image_size, path)
        if isinstance(full, MediaError):
            refused += 1
            if not isinstance(probe, MediaError):
                missed.append(path.name)
            else:  # same kind of message: both name the file and say the same thing about it
                assert str(probe) == str(full)
        else:
            accepted += 1
            assert not isinstance(probe, MediaError), (path.name, probe)
            assert probe == (full.height, full.width), path.name
    assert not missed, f"load_image refuses, the probe accepts: {missed}"
    assert refused >= 100 and accepted >= 1, (refused, accepted)  # the corpus is not vacuous either way


def test_probe_errors_name_the_kind(corpus, tmp_path):
    by_name = {p.name: p for p in corpus}
    for name, kind in [("empty.jpg", "not an image"), ("text.jpg", "not an image"), ("folder.jpg", "directory"),
                       ("missing.jpg", "does not exist"), ("cut50_baseline.jpg", "truncated or corrupt"),
                       ("cut50_progressive.jpg", "truncated or corrupt"), ("cut90_rgb.png", "truncated or corrupt")]:
        with pytest.raises(MediaError, match=kind) as info:
            probe_image_size(by_name[name])
        assert str(by_name[name]) in str(info.value)


def test_probe_refuses_a_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # over twice the limit: Pillow's error
    for fn in (load_image, probe_image_size):
        with pytest.raises(MediaError, match="too large"):
            fn(path)


def test_probe_ignores_a_lenient_pillow(corpus, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    cut = next(p for p in corpus if p.name == "cut90_baseline.jpg")
    with pytest.raises(MediaError, match="truncated"):
        probe_image_size(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


SIZES = [(1280, 960), (640, 480), (1001, 77), (77, 1001), (1003, 1005), (17, 9), (7, 5), (1, 1), (8, 8), (9, 1)]


@pytest.mark.parametrize("width, height", SIZES)
def test_probe_size_equals_load_image(tmp_path, width, height):
    rgb = Image.fromarray(photo(width, height, seed=width * 7 + height))
    files = {
        "baseline.jpg": dict(format="JPEG", quality=85),
        "progressive.jpg": dict(format="JPEG", quality=85, progressive=True),
        "s422.jpg": dict(format="JPEG", quality=85, subsampling=1),
        "s444.jpg": dict(format="JPEG", quality=85, subsampling=0),
        "exif6.jpg": dict(format="JPEG", exif=_exif(6)),
        "exif8.jpg": dict(format="JPEG", exif=_exif(8), progressive=True),
        "exif3.jpg": dict(format="JPEG", exif=_exif(3)),
        "exif5.jpg": dict(format="JPEG", exif=_exif(5)),
        "exif7.jpg": dict(format="JPEG", exif=_exif(7)),
        "exif6.png": dict(format="PNG", exif=_exif(6)),
        "exif8.webp": dict(format="WEBP", exif=_exif(8)),
        "rgb.png": dict(format="PNG"),
        "rgb.gif": dict(format="GIF"),
        "rgb.bmp": dict(format="BMP"),
        "rgb.tif": dict(format="TIFF"),
    }
    for name, kwargs in files.items():
        rgb.save(tmp_path / name, **kwargs)
    rgb.convert("L").save(tmp_path / "grey.jpg", quality=85)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=85)
    rgb.convert("L").save(tmp_path / "xmp8.jpg", xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>')
    for path in sorted(tmp_path.iterdir()):
        img = load_image(path)
        assert probe_image_size(path) == (img.height, img.width), path.name
    # the orientations that turn the image really do swap the sides (the test would not notice a probe ignoring EXIF
    # on a square image)
    if width != height:
        assert probe_image_size(tmp_path / "exif6.jpg") == (width, height)
        assert probe_image_size(tmp_path / "exif8.webp") == (width, height)
        assert probe_image_size(tmp_path / "xmp8.jpg") == (width, height)
        assert probe_image_size(tmp_path / "exif3.jpg") == (height, width)
