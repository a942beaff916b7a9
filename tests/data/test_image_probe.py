"""probe_image_size (the data check's cheap decode) against load_image (what training decodes): the same size, and a
MediaError on every damaged file load_image refuses."""
import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlft.data import media
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
        "restart_blocks.jpg": _encode(rgb, "JPEG", quality=90, restart_marker_blocks=3),  # DRI + RST0-7 in the scan
        "restart_rows.jpg": _encode(grey, "JPEG", quality=90, restart_marker_rows=1),
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


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment from after SOI up to and including SOS (the test's own walk)."""
    pos, out = 2, []
    while True:
        marker, length = data[pos + 1], data[pos + 2] << 8 | data[pos + 3]
        out.append((marker, pos, pos + 2 + length))
        pos += 2 + length
        if marker == 0xDA:
            return out


def _segment(data: bytes, marker: int, nth: int = 0) -> tuple[int, int]:
    return [(start, end) for m, start, end in jpeg_segments(data) if m == marker][nth]


def _body(data: bytes, marker: int, nth: int = 0) -> bytes:
    start, end = _segment(data, marker, nth)
    return data[start + 4:end]


def _with_body(data: bytes, marker: int, body: bytes, nth: int = 0) -> bytes:
    """The nth segment of this marker with another body, its length field updated."""
    start, end = _segment(data, marker, nth)
    return data[:start] + bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body + data[end:]


def _without(data: bytes, marker: int, nth: int = 0) -> bytes:
    start, end = _segment(data, marker, nth)
    return data[:start] + data[end:]


def _restart_markers(data: bytes) -> list[int]:
    scan = _segment(data, 0xDA)[1]
    return [i for i in range(scan, len(data) - 3) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]


def jpeg_damaged(name: str, data: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    """Variants of one good JPEG hit where the fast check looks: a byte flipped, the body zeroed or randomised and
    the length field off by one in each DHT, DQT, SOF, SOS, DRI segment; bytes flipped, runs of noise or FF in the
    entropy-coded data; restart markers dropped, repeated, renumbered; bytes after the EOI, a second EOI, a cut
    closed by an EOI."""
    out = {}
    scan = _segment(data, 0xDA)[1]
    for k, (marker, start, end) in enumerate(jpeg_segments(data)):
        if marker not in (0xC4, 0xDB, 0xC0, 0xDA, 0xDD):
            continue
        tag = f"{marker:02x}_{k}"
        body = range(start + 4, end)
        for i, at in enumerate(rng.choice(body, size=min(3, len(body)), replace=False)):
            flipped = bytearray(data)
            flipped[at] ^= 1 << int(rng.integers(8))
            out[f"seg{tag}_flip{i}_{name}"] = bytes(flipped)
        zeroed, noise, longer, shorter = bytearray(data), bytearray(data), bytearray(data), bytearray(data)
        zeroed[start + 4:end] = bytes(end - start - 4)
        noise[start + 4:end] = rng.integers(0, 256, end - start - 4, dtype=np.uint8).tobytes()
        longer[start + 3] = (longer[start + 3] + 1) % 256
        shorter[start + 3] = (shorter[start + 3] - 1) % 256
        out |= {f"seg{tag}_zeroed_{name}": bytes(zeroed), f"seg{tag}_noise_{name}": bytes(noise),
                f"seg{tag}_longer_{name}": bytes(longer), f"seg{tag}_shorter_{name}": bytes(shorter)}
    for i in range(8):
        flipped = bytearray(data)
        for at in rng.integers(scan, len(data) - 2, size=1 + 4 * i):
            flipped[at] = int(rng.integers(256))
        out[f"scan_bytes{i}_{name}"] = bytes(flipped)
    for i, fill in enumerate([None, b"\xff" * 8, b"\x00" * 64]):
        run = bytearray(data)
        at = int(rng.integers(scan, len(data) - 80))
        run[at:at + 64] = fill or rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        out[f"scan_run{i}_{name}"] = bytes(run)
    rst = _restart_markers(data)
    if rst:
        at = rst[len(rst) // 2]
        renumbered = bytearray(data)
        renumbered[at + 1] = 0xD0 + (data[at + 1] + 1) % 8
        out |= {f"rst_dropped_{name}": data[:at] + data[at + 2:], f"rst_repeated_{name}": data[:at + 2] + data[at:],
                f"rst_renumbered_{name}": bytes(renumbered), f"rst_without_dri_{name}": _without(data, 0xDD)}
    out |= {f"trailing_{name}": data + b"\x00\x01", f"two_eoi_{name}": data + b"\xff\xd9",
            f"cut_eoi_{name}": data[:(scan + len(data)) // 2] + b"\xff\xd9"}
    return out


def crafted_jpegs() -> dict[str, tuple[bytes, str]]:
    """name -> (file, what happens): baseline JPEGs each breaking one rule of libjpeg-turbo's header checks that
    Pillow's parser does not make ("refused" by load_image), unusual files libjpeg accepts that the fast check
    leaves to the decode ("slow"), and unusual valid files the fast check takes ("fast")."""
    rgb = Image.fromarray(photo(160, 120))
    base = _encode(rgb, "JPEG", quality=90)
    grey = _encode(rgb.convert("L"), "JPEG", quality=90)
    rst = _encode(rgb, "JPEG", quality=90, restart_marker_blocks=2)
    sof, sos, dc0 = _body(base, 0xC0), _body(base, 0xDA), _body(base, 0xC4)
    scan = _segment(base, 0xDA)[1]

    def sampling(body: bytes, component: int, hv: int) -> bytes:
        return body[:7 + 3 * component] + bytes([hv]) + body[8 + 3 * component:]

    table16 = bytes([0x10]) + b"".join(v.to_bytes(2, "big") for v in _body(base, 0xDB)[1:65])
    refused = {
        # libjpeg refuses (jdhuff.c jpeg_make_d_derived_tbl, jdmarker.c get_dht)
        "dht_three_codes_of_length_1.jpg": _with_body(base, 0xC4, b"\x00" + bytes([3, 9] + [0] * 14) + bytes(12)),
        "dht_all_ones_code.jpg": _with_body(base, 0xC4, b"\x00" + bytes([2] + [0] * 15) + bytes(2)),
        "dht_dc_symbol_16.jpg": _with_body(base, 0xC4, dc0[:17] + b"\x10" + dc0[18:]),
        "dht_index_4.jpg": _with_body(base, 0xC4, b"\x04" + dc0[1:]),
        "dht_class_2.jpg": _with_body(base, 0xC4, b"\x20" + dc0[1:]),
        "dht_5_bytes_over.jpg": _with_body(base, 0xC4, dc0 + bytes(5)),
        "dht_counts_past_segment.jpg": _with_body(base, 0xC4, dc0[:1] + bytes(15) + b"\xc8" + dc0[17:]),
        # get_dqt, latch_quant_tables
        "dqt_index_4.jpg": _with_body(base, 0xDB, b"\x04" + _body(base, 0xDB)[1:]),
        "dqt_missing.jpg": _without(base, 0xDB, 1),
        # get_sof, initial_setup, per_scan_setup, jinit_upsampler
        "sof_fractional_sampling.jpg": _with_body(base, 0xC0, sampling(sof, 1, 0x31)),
        "sof_sampling_5.jpg": _with_body(base, 0xC0, sampling(sof, 0, 0x52)),
        "sof_sampling_0.jpg": _with_body(base, 0xC0, sampling(sof, 1, 0x01)),
        "sof_12_blocks_per_mcu.jpg": _with_body(base, 0xC0, sampling(sampling(sof, 1, 0x22), 2, 0x22)),
        "sof_width_65535.jpg": _with_body(base, 0xC0, sof[:3] + b"\xff\xff" + sof[5:]),
        "sof_quant_table_3.jpg": _with_body(base, 0xC0, sof[:8] + b"\x03" + sof[9:]),
        "sof_twice.jpg": base[:_segment(base, 0xC0)[1]] + base[slice(*_segment(base, 0xC0))]
        + base[_segment(base, 0xC0)[1]:],
        "sof3_lossless.jpg": base.replace(b"\xff\xc0", b"\xff\xc3", 1),
        # get_sos, start_pass_huff_decoder
        "sos_unknown_component.jpg": _with_body(base, 0xDA, sos[:1] + b"\x09" + sos[2:]),
        "sos_component_twice.jpg": _with_body(base, 0xDA, sos[:3] + sos[1:3] + sos[5:]),
        "sos_dc_table_3.jpg": _with_body(base, 0xDA, sos[:2] + b"\x30" + sos[3:]),
        "sos_ac_table_3.jpg": _with_body(base, 0xDA, sos[:2] + b"\x03" + sos[3:]),
        "sos_byte_over.jpg": _with_body(base, 0xDA, sos + b"\x00"),
        "sos_components_swapped.jpg": _with_body(base, 0xDA, sos[:1] + sos[3:5] + sos[1:3] + sos[5:]),
        "dri_byte_over.jpg": _with_body(rst, 0xDD, _body(rst, 0xDD) + b"\x00"),
        # markers in the entropy-coded data (read after the scan by jpeg_finish_decompress)
        "sos_again_in_scan.jpg": base[:scan + 200] + base[_segment(base, 0xDA)[0]:],
        "broken_dht_in_scan.jpg": base[:scan + 200] + b"\xff\xc4\x00\x05\x00\x01\x02" + base[scan + 200:],
        "soi_twice.jpg": base[:2] + base,
        "exp_marker.jpg": base[:2] + b"\xff\xdf\x00\x03\x00" + base[2:],
    }
    slow = {  # libjpeg accepts, but the fast check does not know them: the decode decides
        "dht_missing.jpg": _without(base, 0xC4, 1),  # libjpeg-turbo falls back on the standard tables
        "dht_dc_symbol_16_unused.jpg": _with_body(base, 0xC4, b"\x02" + dc0[1:17] + b"\x10" + dc0[18:]),
        "sof9_arithmetic.jpg": base.replace(b"\xff\xc0", b"\xff\xc9", 1),
        "sos_se_0.jpg": _with_body(base, 0xDA, sos[:-2] + b"\x00\x00"),
        "dri_0_with_rst.jpg": _with_body(rst, 0xDD, b"\x00\x00"),
        "fill_ff_before_sos.jpg": base[:_segment(base, 0xDA)[0]] + b"\xff" + base[_segment(base, 0xDA)[0]:],
        "fill_ff_before_eoi.jpg": base[:-2] + b"\xff\xff\xd9",
        "dnl_in_scan.jpg": base[:scan + 200] + b"\xff\xdc\x00\x04\x00\x78" + base[scan + 200:],
        "app_length_1.jpg": base[:2] + b"\xff\xe1\x00\x01" + base[2:],
    }
    fast = {  # unusual and valid: the fast check takes them
        "sof1.jpg": base.replace(b"\xff\xc0", b"\xff\xc1", 1),
        "dqt_16bit.jpg": _with_body(base, 0xDB, table16),
        "grey_sampling_4x4.jpg": _with_body(grey, 0xC0, sampling(_body(grey, 0xC0), 0, 0x44)),
        "dht_empty_table.jpg": _with_body(base, 0xC4, dc0 + bytes(17)),  # redefines DC 0: no codes, all warnings
    }
    return {name: (data, outcome) for outcome, files in [("refused", refused), ("slow", slow), ("fast", fast)]
            for name, data in files.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Paths of damaged files (plus crafted JPEG headers, an empty file, a text file, a directory, a missing
    path)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    paths = []
    for name, data in good_images().items():
        variants = damaged(name, data, rng)
        if name.endswith(".jpg"):
            variants |= jpeg_damaged(name, data, rng)
        for bad_name, bad in variants.items():
            path = root / bad_name
            path.write_bytes(bad)
            paths.append(path)
    for name, (data, _) in crafted_jpegs().items():
        (root / name).write_bytes(data)
        paths.append(root / name)
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


def _spy_fast_check(monkeypatch) -> list[bool]:
    """The answers of the JPEG fast check, one per call, in order."""
    answers = []
    real = media._jpeg_sure_to_decode

    def spy(data, img):
        answers.append(real(data, img))
        return answers[-1]

    monkeypatch.setattr(media, "_jpeg_sure_to_decode", spy)
    return answers


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Truncated File Read")  # Pillow, on the damaged TIFFs
def test_probe_refuses_every_file_load_image_refuses(corpus, monkeypatch):
    answers = _spy_fast_check(monkeypatch)
    refused = accepted = fast = 0
    missed = []
    for path in corpus:
        full = _outcome(load_image, path)
        asked = len(answers)
        probe = _outcome(probe_image_size, path)
        fast += len(answers) > asked and answers[-1]
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
    # the corpus is not vacuous either way, and the fast path judged many damaged JPEGs (damage in the scan data)
    assert refused >= 400 and accepted >= 250 and fast >= 150, (refused, accepted, fast)  # 454, 321, 196 here


def test_crafted_headers(corpus):
    """Each crafted JPEG breaking a header rule of libjpeg-turbo is refused by load_image, so the fast check's rule
    is needed, and the fast check never takes it; the unusual files libjpeg accepts go to the slow path, except
    the valid ones the fast check knows."""
    by_name = {p.name: p for p in corpus}
    for name, (_, expected) in crafted_jpegs().items():
        path = by_name[name]
        with Image.open(path) as img:
            sure = media._jpeg_sure_to_decode(path.read_bytes(), img)
        full, probe = _outcome(load_image, path), _outcome(probe_image_size, path)
        assert isinstance(full, MediaError) == (expected == "refused"), (name, full)
        assert sure == (expected == "fast"), name
        if isinstance(full, MediaError):
            assert str(probe) == str(full), name
        else:
            assert probe == (full.height, full.width), name


def test_fast_path_skips_the_decode(tmp_path, monkeypatch):
    """Ordinary baseline JPEGs are sized without decoding (no `load` call, the size load_image gives); progressive,
    cut, trailing bytes, a second EOI, a restart marker missing go to the decode (one `load` call each)."""
    rgb = Image.fromarray(photo(161, 119))
    fast = {
        "s420.jpg": dict(quality=90), "s422.jpg": dict(quality=75, subsampling=1),
        "s444.jpg": dict(quality=95, subsampling=0), "q5.jpg": dict(quality=5), "optimized.jpg": dict(optimize=True),
        "restart_blocks.jpg": dict(restart_marker_blocks=1), "restart_rows.jpg": dict(restart_marker_rows=2),
        "exif6.jpg": dict(exif=_exif(6)), "comment.jpg": dict(comment=b"hello"), "keep_rgb.jpg": dict(keep_rgb=True),
    }
    for name, kwargs in fast.items():
        rgb.save(tmp_path / name, "JPEG", **kwargs)
    rgb.convert("L").save(tmp_path / "grey.jpg", "JPEG", restart_marker_blocks=5)
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")
    Image.fromarray(photo(9, 1)).save(tmp_path / "tiny.jpg", "JPEG")
    baseline, restarts = (tmp_path / "s420.jpg").read_bytes(), (tmp_path / "restart_blocks.jpg").read_bytes()
    rst = _restart_markers(restarts)[7]
    slow = {"progressive.jpg": _encode(rgb, "JPEG", progressive=True), "trailing.jpg": baseline + b"\x00",
            "two_eoi.jpg": baseline + b"\xff\xd9", "cut.jpg": baseline[:-1], "cut_eoi.jpg": baseline[:-100],
            "rst_dropped.jpg": restarts[:rst] + restarts[rst + 2:]}  # libjpeg resynchronises: a warning
    for name, data in slow.items():
        (tmp_path / name).write_bytes(data)
    expected = {p.name: _outcome(load_image, p) for p in tmp_path.iterdir()}
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: loads.append(img.format) or real_load(img))
    for name, full in sorted(expected.items()):
        del loads[:]
        probe = _outcome(probe_image_size, tmp_path / name)
        if isinstance(full, MediaError):
            assert str(probe) == str(full), name
        else:
            assert probe == (full.height, full.width), name
        assert loads == ([] if name not in slow else ["JPEG"]), name
    assert probe_image_size(tmp_path / "exif6.jpg") == (161, 119)  # the EXIF orientation is still read


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
