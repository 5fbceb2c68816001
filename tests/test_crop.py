"""The crop of the official COCO pipeline (box, square padding, affine, OpenCV 4.x warp) and image loading."""

import importlib.util
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from locllm_sdk import crop as crop_module
from locllm_sdk.crop import (
    MAX_IMAGE_PIXELS,
    BoxError,
    ImageError,
    affine_transform,
    box_to_center_scale,
    crop_geometry,
    load_image,
    normalize,
    sanitize_box,
    to_image_coords,
    warp,
    warp_affine,
)


def test_sanitize_uses_one_pixel_less():
    assert sanitize_box([10, 20, 30, 40], 100, 100) == (10, 20, 29, 39)
    assert sanitize_box([-5, -5, 30, 40], 100, 100) == (0, 0, 29, 39)
    assert sanitize_box([90, 90, 30, 40], 100, 100) == (90, 90, 9, 9)
    with pytest.raises(BoxError):
        sanitize_box([10, 10, -1, 5], 100, 100)
    with pytest.raises(BoxError):
        sanitize_box([120, 10, 5, 5], 100, 100)
    with pytest.raises(BoxError):
        sanitize_box([1, 2, 3], 100, 100)


def test_center_scale_pads_to_square_without_enlargement():
    c, s = box_to_center_scale((10, 20, 100, 50))
    np.testing.assert_allclose(c, [60, 45])
    np.testing.assert_allclose(s, [0.5, 0.5])


def test_geometry_maps_box_to_crop_and_back():
    g = crop_geometry([30, 40, 81, 161], (300, 200), 224)
    # sanitised box (30, 40, 80, 160): centre (70, 120), padded side 160
    centre = g.forward @ np.array([70, 120, 1.0])
    np.testing.assert_allclose(centre, [112, 112], atol=1e-4)
    top = g.forward @ np.array([70, 40, 1.0])
    np.testing.assert_allclose(top, [112, 0], atol=1e-4)
    pts = np.array([[0, 0], [224, 224], [37.5, 100.25]])
    back = to_image_coords(pts, g.inverse)
    fwd = np.c_[back, np.ones(3)] @ g.forward.T
    np.testing.assert_allclose(fwd, pts, atol=1e-3)


def test_warp_and_normalize():
    img = np.zeros((100, 100, 3), np.uint8)
    img[40:60, 40:60] = 255
    g = crop_geometry([30, 30, 41, 41], (100, 100), 56)
    crop = warp(img, g)
    assert crop.shape == (56, 56, 3)
    assert crop[28, 28].tolist() == [255, 255, 255] and crop[2, 2].tolist() == [0, 0, 0]
    x = normalize(crop[None])
    assert x.shape == (1, 3, 56, 56) and x.dtype == np.float32
    assert x[0, 0, 28, 28] == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-6)


# --- the warp: OpenCV 4.x's warpAffine INTER_LINEAR, bit for bit, whatever OpenCV is installed ---

FIXTURES = Path(__file__).parent / "fixtures"


def _oracle_generator():
    """tests/fixtures/make_crop_oracle.py, imported for its image maker (no OpenCV 4 needed for that)."""
    spec = importlib.util.spec_from_file_location("make_crop_oracle", FIXTURES / "make_crop_oracle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_crops_are_bit_identical_to_opencv4():
    """Every crop of the fixture (made by OpenCV 4.11's cv2.warpAffine), through crop.py's geometry
    and warp, equals OpenCV 4.x's byte for byte; the matrices too (cv2.getAffineTransform is kept)."""
    ref = np.load(FIXTURES / "crop_oracle.npz")
    assert str(ref["opencv_version"]).startswith("4.")
    gen = _oracle_generator()
    images = [gen.make_image(*(int(v) for v in spec)) for spec in ref["image_specs"]]
    assert [gen.image_digest(im) for im in images] == list(ref["image_sha256"])
    failures = []
    for i, kind in enumerate(ref["kind"]):
        img, size, box = images[ref["image_index"][i]], int(ref["size"][i]), ref["box"][i].tolist()
        if kind == 0:
            g = crop_geometry(box, img.shape[:2], size)
            forward, inverse, out = g.forward, g.inverse, warp(img, g)
        else:
            center, scale = box_to_center_scale(sanitize_box(box, img.shape[1], img.shape[0]))
            forward = affine_transform(center, scale, float(ref["rotation"][i]), size)
            inverse = affine_transform(center, scale, float(ref["rotation"][i]), size, inverse=True)
            out = warp_affine(img, forward, (size, size))
        if not (np.array_equal(forward, ref["forward"][i]) and np.array_equal(inverse, ref["inverse"][i])):
            failures.append(f"case {i} box {box}: matrices differ from OpenCV 4.x's")
        expected = ref[f"crop_{i:03d}"]
        if out.shape != expected.shape or not np.array_equal(out, expected):
            n = int((out != expected).any(-1).sum()) if out.shape == expected.shape else -1
            failures.append(f"case {i} box {box} size {size}: {n} pixels differ")
    assert not failures, "\n".join(failures)
    assert len(ref["kind"]) >= 40 and set(ref["size"].tolist()) == {56, 168, 224}


def test_oracle_generator_runs_only_under_opencv4(tmp_path):
    out = tmp_path / "oracle.npz"
    cmd = [sys.executable, str(FIXTURES / "make_crop_oracle.py"), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if cv2.__version__.startswith("4."):  # then it must reproduce the stored fixture
        assert r.returncode == 0, r.stderr
        r = subprocess.run([*cmd[:2], "--verify"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
    else:
        assert r.returncode != 0 and "OpenCV 4.x" in r.stderr and not out.exists()


def _opencv4_bilinear_table() -> np.ndarray:
    """initInterTab2D(INTER_LINEAR, fixpt=true) of OpenCV 4.x, step by step (float32, cvRound,
    saturate_cast<short>, then the fix-up that makes each entry sum to 1 << 15)."""
    t = np.arange(32, dtype=np.float32) * np.float32(1.0 / 32)
    k = np.stack([np.float32(1) - t, t], axis=1)  # interpolateLinear
    v = k[:, None, :, None] * k[None, :, None, :]  # [fy, fx, k1, k2] = vy[k1] * vx[k2]
    itab = np.clip(np.rint(v * np.float32(1 << 15)), -32768, 32767).astype(np.int64).reshape(1024, 4)
    diff = itab.sum(1) - (1 << 15)
    # the fix-up searches k1, k2 in [ksize/2, ksize/2 + 2) from (ksize/2, ksize/2): for ksize 2 only (1, 1)
    itab[:, 3] -= diff
    return itab


def test_exact_weights_give_the_opencv_table_results():
    """warp_affine uses the exact weights (32-fy)(32-fx)... where OpenCV uses its table: equal
    everywhere but at fx = fy = 0, where both give the top-left pixel for any pixel values."""
    itab = _opencv4_bilinear_table()
    f = np.arange(32)
    wy, wx = np.stack([32 - f, f], 1), np.stack([32 - f, f], 1)
    exact = (wy[:, None, :, None] * wx[None, :, None, :]).reshape(1024, 4) * 32
    assert np.array_equal(itab[1:], exact[1:])
    assert itab[0].tolist() == [32767, 0, 0, 1] and exact[0].tolist() == [32768, 0, 0, 0]
    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for a_in, b_in in ((1, 1), (1, 0), (0, 1)):  # corner inside the image or not (BORDER_CONSTANT 0)
        opencv = (32767 * a * a_in + 1 * b * b_in + (1 << 14)) >> 15
        assert np.array_equal(opencv, (1024 * a * a_in + (1 << 9)) >> 10)


def test_warp_affine_channels_and_errors():
    img = _oracle_generator().make_image(9, 50, 70)
    m = affine_transform(np.float32([35, 25]), np.float32([0.2, 0.2]), 20.0, 32)
    rgb = warp_affine(img, m, (32, 24))
    assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(warp_affine(img[:, :, c], m, (32, 24)), rgb[:, :, c])
    assert np.array_equal(warp_affine(img[::-1][::-1], m, (32, 24)), rgb)  # non-contiguous input
    with pytest.raises(ImageError):
        warp_affine(img.astype(np.float32), m, (32, 32))
    with pytest.raises(ValueError):
        warp_affine(img, np.full((2, 3), np.nan), (32, 32))


def test_warp_speed_is_reasonable():
    """A 224 crop in a few ms (vectorised numpy); generous bound for a loaded CI machine."""
    img = _oracle_generator().make_image(7, 480, 640)
    g = crop_geometry([100, 50, 200, 380], img.shape[:2], 224)
    warp(img, g)
    t = time.perf_counter()
    for _ in range(5):
        warp(img, g)
    assert (time.perf_counter() - t) / 5 < 0.05


# --- loading: decoded like cv2.imread, damaged or oversized images refused ---


def _test_image(h=48, w=64) -> np.ndarray:
    """RGB with distinct quadrants and gradients, so flips and rotations show."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)
    img[: h // 2, : w // 2] //= 3
    return img


def _encode(img_rgb: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(img_rgb[..., ::-1]), list(params))
    assert ok
    return buf.tobytes()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 Exif segment (big-endian TIFF, IFD0 with only the Orientation tag) after SOI."""
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def _png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def _cv2_rgb(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), flags), cv2.COLOR_BGR2RGB)


def test_files_decode_exactly_as_cv2_imread(tmp_path):
    img = _test_image()
    gray = img[..., 1]
    rgba = np.dstack([img, np.arange(img.size // 3, dtype=np.uint8).reshape(img.shape[:2])])
    files = {
        "base.jpg": _encode(img, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90),
        "progressive.jpg": _encode(img, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "restart.jpg": _encode(img, ".jpg", cv2.IMWRITE_JPEG_RST_INTERVAL, 2),
        "gray.jpg": _encode(gray, ".jpg"),
        "trailing.jpg": _encode(img, ".jpg") + b"\x00trailing bytes after EOI",
        "exif6.jpg": _with_exif_orientation(_encode(img, ".jpg"), 6),
        "rgb.png": _encode(img, ".png"),
        "gray.png": _encode(gray, ".png"),
        "rgba.png": cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes(),
        "16bit.png": cv2.imencode(".png", (img.astype(np.uint16) * 257)[..., ::-1].copy())[1].tobytes(),
        "x.webp": _encode(img, ".webp", cv2.IMWRITE_WEBP_QUALITY, 80),
        "lossless.webp": _encode(img, ".webp", cv2.IMWRITE_WEBP_QUALITY, 101),
        "x.bmp": _encode(img, ".bmp"),
        "odd.bmp": _encode(img[:, :-3], ".bmp"),
    }
    for name, data in files.items():
        p = _write(tmp_path / name, data)
        got = load_image(p)
        assert got.dtype == np.uint8 and got.flags.c_contiguous, name
        assert np.array_equal(got, _cv2_rgb(p)), name
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
        assert np.array_equal(load_image(str(p), exif_orientation=False), _cv2_rgb(p, flags)), name
    assert np.array_equal(load_image(tmp_path / "rgb.png"), img)  # lossless round trip
    assert np.array_equal(load_image(tmp_path / "rgba.png"), img)  # alpha dropped, not composited


def test_pillow_written_files_decode_as_cv2(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    img = Image.fromarray(_test_image(40, 30))
    img.save(tmp_path / "pil.jpg", quality=85, subsampling=0)
    img.convert("P").save(tmp_path / "palette.png")
    img.save(tmp_path / "pil.webp")
    for name in ("pil.jpg", "palette.png", "pil.webp"):
        assert np.array_equal(load_image(tmp_path / name), _cv2_rgb(tmp_path / name)), name


@pytest.mark.parametrize("orientation, k", [(6, -1), (8, 1)])  # 6: rotate 90 clockwise to display; 8: counter
def test_exif_orientation_is_applied(tmp_path, orientation, k):
    img = _test_image()
    jpeg = _encode(img, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    p = _write(tmp_path / f"o{orientation}.jpg", _with_exif_orientation(jpeg, orientation))
    stored = load_image(p, exif_orientation=False)
    assert stored.shape == (48, 64, 3)
    shown = load_image(p)
    assert shown.shape == (64, 48, 3)
    assert np.array_equal(shown, np.rot90(stored, k))
    assert np.array_equal(shown, _cv2_rgb(p))  # as cv2.imread with its default flags
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageOps

    with Image.open(p) as im:
        pil = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(int)
        assert pil.shape == shown.shape and np.abs(pil - shown).mean() < 1.0  # Pillow's own JPEG decoder
        assert np.array_equal(load_image(im), pil)  # a PIL image is turned upright too


def _jpeg_cuts(data: bytes) -> list[int]:
    """Cut points: inside the headers, inside the image data, and just before or inside EOI."""
    sos = data.index(b"\xff\xda")
    return [3, 20, sos + 5, len(data) // 2, len(data) - 40, len(data) - 2, len(data) - 1]


def test_truncated_and_damaged_jpeg_is_an_error(tmp_path):
    for name, data in {
        "base.jpg": _encode(_test_image(), ".jpg"),
        "prog.jpg": _encode(_test_image(), ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
    }.items():
        for cut in _jpeg_cuts(data):
            p = _write(tmp_path / f"cut{cut}_{name}", data[:cut])
            with pytest.raises(ImageError, match="truncated") as err:
                load_image(p)
            assert str(p) in str(err.value)
    data = _encode(_test_image(), ".jpg")
    sos = data.index(b"\xff\xda")
    bad = data[:sos] + b"\x12\x34" + data[sos:]  # garbage between segments
    with pytest.raises(ImageError, match="damaged JPEG"):
        load_image(_write(tmp_path / "garbage.jpg", bad))
    no_scan = data[:sos] + b"\xff\xd9"
    with pytest.raises(ImageError, match="EOI before any image data"):
        load_image(_write(tmp_path / "noscan.jpg", no_scan))


def test_truncated_or_corrupt_png_is_an_error(tmp_path):
    data = _encode(_test_image(), ".png")
    for cut in (8, 20, 40, len(data) // 2, len(data) - 12, len(data) - 1):
        p = _write(tmp_path / f"cut{cut}.png", data[:cut])
        with pytest.raises(ImageError, match="truncated") as err:
            load_image(p)
        assert str(p) in str(err.value)
    idat = data.index(b"IDAT")
    flipped = bytearray(data)
    flipped[idat + 10] ^= 0x40
    with pytest.raises(ImageError, match="CRC mismatch"):
        load_image(_write(tmp_path / "flipped.png", bytes(flipped)))
    # chunks intact (good CRCs) but too little image data: libpng's error, reported as such
    w, h = 16, 16
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    short = _png_chunk(b"IDAT", zlib.compress(bytes((1 + 3 * w) * (h // 2))))
    p = _write(tmp_path / "short.png", b"\x89PNG\r\n\x1a\n" + ihdr + short + _png_chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="cannot decode") as err:
        load_image(p)
    assert str(p) in str(err.value)


def test_truncated_webp_and_bmp_are_errors(tmp_path):
    for ext in (".webp", ".bmp"):
        data = _encode(_test_image(), ext)
        for cut in (14, len(data) // 2, len(data) - 1):
            p = _write(tmp_path / f"cut{cut}{ext}", data[:cut])
            with pytest.raises(ImageError, match="truncated|damaged") as err:
                load_image(p)
            assert str(p) in str(err.value)


def _bomb_png(side: int) -> bytes:
    """A valid 1-bit grey PNG of side x side pixels: tens of KB that decode to side**2 * 3 bytes."""
    row = bytes(1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    p = _write(tmp_path / "bomb.png", _bomb_png(20000))
    assert p.stat().st_size < 2_000_000

    def no_decoding(*args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(crop_module.cv2, "imdecode", no_decoding)
    t = time.perf_counter()
    with pytest.raises(ImageError, match="20000x20000") as err:
        load_image(p)
    assert time.perf_counter() - t < 0.5
    assert str(p) in str(err.value) and "89,478,485" in str(err.value)
    assert MAX_IMAGE_PIXELS == 89_478_485
    monkeypatch.undo()
    small = _write(tmp_path / "small.png", _encode(_test_image(), ".png"))  # 64x48 = 3072 pixels
    with pytest.raises(ImageError, match="over the limit of 3,000"):
        load_image(small, max_pixels=3000)
    assert load_image(small, max_pixels=3072).shape == (48, 64, 3)
    assert load_image(small, max_pixels=None).shape == (48, 64, 3)
    with pytest.raises(ImageError, match="over the limit"):
        load_image(np.zeros((60, 60, 3), np.uint8), max_pixels=3000)  # arrays too
    for bad in (0, -5, 2.5, True, "10"):
        with pytest.raises(ImageError, match="max_pixels"):
            load_image(small, max_pixels=bad)


def test_pixel_limit_with_pillow_images():
    Image = pytest.importorskip("PIL.Image")
    with pytest.raises(ImageError, match="over the limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9999)
    assert load_image(Image.new("RGB", (100, 100)), max_pixels=10000).shape == (100, 100, 3)


def test_bad_paths_are_errors_naming_the_file(tmp_path, monkeypatch):
    cases = {
        tmp_path: "is a directory",
        tmp_path / "missing.jpg": "not found",
        _write(tmp_path / "empty.jpg", b""): "empty",
        _write(tmp_path / "text.jpg", b"hello, this is not an image\n"): "not an image file",
        _write(tmp_path / "anim.gif", b"GIF89a" + bytes(20)): "GIF image, which is not supported",
        _write(tmp_path / "t.tif", b"II*\x00" + bytes(20)): "TIFF image, which is not supported",
    }
    for path, problem in cases.items():
        with pytest.raises(ImageError, match=problem) as err:
            load_image(path)
        assert str(path) in str(err.value)
    unreadable = _write(tmp_path / "unreadable.png", _encode(_test_image(), ".png"))
    real = Path.read_bytes

    def denied(self):
        if self == unreadable:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)  # root can read a chmod 000 file: simulate the refusal
    with pytest.raises(ImageError, match="Permission denied") as err:
        load_image(unreadable)
    assert str(unreadable) in str(err.value)


def test_tiny_images_are_refused(tmp_path):
    for shape in ((1, 1, 3), (1, 5, 3), (5, 1, 3), (1, 7, 4), (0, 4, 3)):
        with pytest.raises(ImageError, match="smaller than 2x2"):
            load_image(np.zeros(shape, np.uint8))
    assert load_image(np.zeros((2, 2, 3), np.uint8)).shape == (2, 2, 3)
    p = _write(tmp_path / "one.png", _encode(np.zeros((1, 1, 3), np.uint8), ".png"))
    with pytest.raises(ImageError, match="1x1 pixels") as err:
        load_image(p)
    assert str(p) in str(err.value)
    Image = pytest.importorskip("PIL.Image")
    with pytest.raises(ImageError, match="smaller than 2x2"):
        load_image(Image.new("RGB", (1, 3)))


def test_arrays_channels_alpha_and_grey_refused():
    rgb = _test_image()
    assert load_image(rgb) is rgb  # contiguous RGB: no copy, as before
    assert np.array_equal(load_image(np.ascontiguousarray(rgb[..., ::-1]), channels="bgr"), rgb)
    assert np.array_equal(load_image(rgb[..., ::-1], channels="BGR"), rgb)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert np.array_equal(load_image(rgba), rgb)  # alpha dropped
    bgra = np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8)])
    assert np.array_equal(load_image(bgra, channels="bgr"), rgb)
    gray = rgb[..., 0].copy()
    for g in (gray, gray[..., None]):  # refused, not guessed: it may be one channel of a colour image
        with pytest.raises(ImageError, match="HxWx3"):
            load_image(g)
    for bad in ("rgba", "hsv", None, 3):
        with pytest.raises(ImageError, match="channels"):
            load_image(rgb, channels=bad)
    for arr, problem in (
        (rgb.astype(np.float32), "uint8"),
        (rgb[..., :2], "shape"),
        (np.zeros((4, 4, 5), np.uint8), "shape"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
    ):
        with pytest.raises(ImageError, match=problem):
            load_image(arr)
    with pytest.raises(ImageError, match="numpy arrays only"):
        load_image("some.jpg", channels="bgr")
    with pytest.raises(ImageError, match="path, a file.s bytes, a PIL image or a numpy array"):
        load_image([[1, 2], [3, 4]])


def test_pillow_images(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = _test_image()
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb)
    assert np.array_equal(load_image(Image.fromarray(rgb).convert("RGBA")), rgb)
    data = _encode(rgb, ".jpg")
    p = _write(tmp_path / "cut.jpg", data[: data.index(b"\xff\xda") + 300])  # inside the image data
    with Image.open(p) as im, pytest.raises(ImageError, match="cannot decode") as err:
        load_image(im)
    assert str(p) in str(err.value)
