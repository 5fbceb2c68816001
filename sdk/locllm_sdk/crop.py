"""Image -> person crop, and crop coordinates -> image coordinates.

Reproduces the official COCO pipeline (datasets/coco.py): the box is sanitised as COCO
loaders do, turned into center/scale padded to aspect 1.0 (/200, no 1.25 enlargement),
warped to the model's square input exactly as OpenCV 4.x's ``cv2.warpAffine`` (INTER_LINEAR,
BORDER_CONSTANT 0) does, normalised with CLIP's mean/std; predictions are mapped back with the
inverse affine. The warp is a numpy port of OpenCV 4.x's fixed-point algorithm, so crops are
bit-identical to the reference whatever OpenCV is installed (5.x interpolates differently).

Images are decoded by OpenCV (the reference decodes with ``cv2.imread``), after checks that
refuse what OpenCV would decode silently wrong: truncated or structurally damaged files, and
images above a pixel limit (read from the header, before decoding).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import BoxError, ImageError

PIXEL_STD = 200.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's Image.MAX_IMAGE_PIXELS (its decompression-bomb threshold), without importing Pillow.
MAX_IMAGE_PIXELS = 89_478_485
MIN_IMAGE_SIDE = 2
IMAGE_FORMATS = ("JPEG", "PNG", "WebP", "BMP")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # the file names of those formats


def load_image(
    image: object,
    *,
    channels: str = "rgb",
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    exif_orientation: bool = True,
) -> np.ndarray:
    """Path, file bytes, PIL image or uint8 array -> contiguous HxWx3 uint8 RGB array.

    Files (str or os.PathLike): JPEG, PNG, WebP or BMP, decoded by OpenCV exactly as
    ``cv2.imread`` decodes them (colour, 8 bits: alpha dropped, grey replicated, 16-bit
    scaled). Before decoding, the file is checked structurally: a JPEG must run from SOI
    through its segments and scans to an EOI marker, a PNG must be a chain of chunks with good
    CRCs from IHDR to IEND, a WebP's RIFF container and a BMP's pixel array must be as long as
    their headers say. A truncated file (a cut download, a partial copy) fails these checks
    instead of being decoded with a libjpeg warning and grey rows. (Not caught: bytes altered
    in place inside a JPEG's image data, or a cut JPEG given a new EOI marker; neither
    OpenCV nor Pillow report those, only libjpeg warns.)

    PIL images are converted with ``.convert("RGB")`` (decoding errors such as truncation
    surface as ImageError). numpy arrays must be uint8: HxWx3 in ``channels`` order ("rgb" or
    "bgr", the latter being OpenCV's), or HxWx4 with alpha in the fourth channel (dropped, not
    composited, as cv2.imread and Pillow's convert("RGB") drop it); grey HxW arrays are refused
    (they may as well be one channel of a colour image). ``channels`` describes arrays only: files and PIL images
    carry their own channel order, so "bgr" with them is an error.

    ``exif_orientation``: apply the EXIF orientation tag, as ``cv2.imread`` (default flags)
    and ``PIL.ImageOps.exif_transpose`` do. The official COCO pipeline reads with
    IMREAD_IGNORE_ORIENTATION (COCO's boxes are in the stored pixel grid): pass False there.

    ``max_pixels``: images with more pixels are refused before decoding (Pillow's default
    limit; None disables). Images smaller than 2x2 pixels are refused.

    Every failure is an ImageError naming the file (or the input) and the problem.
    """
    if not isinstance(channels, str) or channels.lower() not in ("rgb", "bgr"):
        raise ImageError(f'channels must be "rgb" or "bgr", got {channels!r}')
    channels = channels.lower()
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ImageError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    is_array = isinstance(image, np.ndarray)
    if channels != "rgb" and not is_array:
        raise ImageError(
            f'channels="{channels}" applies to numpy arrays only; files and PIL images carry their own channel order'
        )
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if not text:
            raise ImageError("the image path is empty")
        if isinstance(text, str) and "://" in text:
            raise ImageError(f"{text}: URLs are not read, only local files (download the image first)")
        return _load_file(Path(image), max_pixels, exif_orientation)
    if type(image).__module__.startswith("PIL."):
        return _load_pil(image, max_pixels, exif_orientation)
    if isinstance(image, (bytes, bytearray, memoryview)):  # a file's content (an upload), checked as a file
        return decode_file_bytes(bytes(image), "the image bytes", max_pixels, exif_orientation)
    if not is_array:
        raise ImageError(
            f"image must be a path, a file's bytes, a PIL image or a numpy array, got {type(image).__name__}"
        )
    return _load_array(image, channels, max_pixels)


def _check_size(name: str, width: int, height: int, max_pixels: int | None) -> None:
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        side = MIN_IMAGE_SIDE
        raise ImageError(f"{name}: the image is {width}x{height} pixels, smaller than {side}x{side}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: the image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(raise it with load_image(..., max_pixels=N); None disables it)"
        )


def _load_array(image: np.ndarray, channels: str, max_pixels: int | None) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ImageError(f"image array must be uint8, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        # a grey array is refused rather than guessed: HxW could as well be one channel of a colour image
        raise ImageError(
            f"image array must be HxWx3 (or HxWx4 with alpha), got shape {image.shape}"
            + ("; for a grey image pass np.repeat(img[..., None], 3, axis=2)" if image.ndim == 2 else "")
        )
    _check_size("image array", image.shape[1], image.shape[0], max_pixels)
    if channels == "bgr":
        return np.ascontiguousarray(image[:, :, 2::-1])
    return np.ascontiguousarray(image if image.shape[2] == 3 else image[:, :, :3])  # RGB: no copy if contiguous


def _load_pil(image, max_pixels: int | None, exif_orientation: bool) -> np.ndarray:
    name = f"PIL image {image.filename}" if getattr(image, "filename", "") else "PIL image"
    width, height = image.size
    _check_size(name, width, height, max_pixels)  # .size comes from the header: nothing decoded yet
    try:
        if exif_orientation:
            from PIL import ImageOps  # only here: Pillow is not a dependency of the runtime

            image = ImageOps.exif_transpose(image)
        rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for damaged data
        raise ImageError(f"{name}: cannot decode: {e}") from e
    return np.ascontiguousarray(rgb)


def _load_file(path: Path, max_pixels: int | None, exif_orientation: bool) -> np.ndarray:
    try:
        if path.is_dir():
            raise ImageError(f"{path}: is a directory, not an image file")
        if not path.exists():
            raise ImageError(f"image file not found: {path}")
        if not path.is_file():
            raise ImageError(f"{path}: is not a regular file")
        data = path.read_bytes()  # one read: the checks and the decoder see the same bytes
    except OSError as e:
        raise ImageError(f"{path}: cannot read the file: {e.strerror or e}") from e
    return decode_file_bytes(data, str(path), max_pixels, exif_orientation)


def decode_file_bytes(data: bytes, path: str, max_pixels: int | None, exif_orientation: bool) -> np.ndarray:
    """An image file's bytes -> RGB uint8, after the structural checks (``path`` names it in errors)."""
    if not data:
        raise ImageError(f"{path}: the file is empty")
    fmt = _sniff(data)
    if fmt not in _CHECKERS:
        raise ImageError(f"{path}: cannot decode: {fmt}; supported: {', '.join(IMAGE_FORMATS)}")
    header: list[tuple[int, int]] = []

    def on_size(width: int, height: int) -> None:
        _check_size(str(path), width, height, max_pixels)
        header.append((width, height))

    try:
        _CHECKERS[fmt](data, on_size)
    except _Damaged as e:
        kind = "unsupported" if isinstance(e, _Unsupported) else "damaged"
        raise ImageError(f"{path}: {kind} {fmt} file: {e}") from None
    flags = cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:  # e.g. OpenCV's own size limits, with max_pixels=None
        raise ImageError(f"{path}: OpenCV cannot decode this {fmt} file: {e}") from e
    if bgr is None:
        raise ImageError(f"{path}: OpenCV cannot decode this {fmt} file (damaged data or an unsupported variant)")
    (width, height), got = header[0], bgr.shape[:2]
    if got != (height, width) and not (exif_orientation and got == (width, height)):  # EXIF may swap the sides
        raise ImageError(f"{path}: decoded {got[1]}x{got[0]} pixels, but the {fmt} header says {width}x{height}")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


class _Damaged(Exception):
    """A structural check failed; the message says where."""


class _Unsupported(_Damaged):
    """A well-formed file of a variant whose completeness the checks cannot establish."""


def _sniff(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:2] == b"BM":
        return "BMP"
    for magic, name in ((b"GIF8", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")):
        if data.startswith(magic):
            return f"a {name} image, which is not supported"
    if data[4:8] == b"ftyp":
        return "an ISO media file (HEIF/AVIF?), which is not supported"
    return f"not an image file (it starts with {data[:8].hex(' ')})"


# In entropy-coded data a marker is 0xFF followed by anything but 0x00 (a stuffed byte) or RST0-7.
_JPEG_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range


def _check_jpeg(data: bytes, on_size: Callable[[int, int], None]) -> None:
    n, pos, have_frame, scans = len(data), 2, False, 0
    while True:
        if pos >= n:
            raise _Damaged(f"the file ends at byte {n} before the EOI marker (truncated)")
        if data[pos] != 0xFF:
            raise _Damaged(f"expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= n:
            raise _Damaged("the file ends inside a marker (truncated)")
        marker, pos = data[pos], pos + 1
        if marker == 0xD9:  # EOI: bytes after it (some cameras append data) are not image data
            if not scans:
                raise _Damaged("EOI before any image data")
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if marker in (0x00, 0xD8):
            raise _Damaged(f"unexpected 0xFF{marker:02X} at byte {pos - 2}")
        if pos + 2 > n:
            raise _Damaged("the file ends inside a segment header (truncated)")
        length = (data[pos] << 8) | data[pos + 1]
        end = pos + length
        if length < 2 or end > n:
            raise _Damaged(f"segment 0xFF{marker:02X} at byte {pos - 2} runs past the end of the file (truncated)")
        if marker in _JPEG_SOF and not have_frame:
            if length < 8:
                raise _Damaged("frame header too short")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            if height == 0:
                raise _Unsupported("the height is defined later by a DNL marker")
            on_size(width, height)
            have_frame = True
        if marker == 0xDA:  # SOS: the entropy-coded data runs to the next real marker
            if not have_frame:
                raise _Damaged("scan before the frame header")
            scans += 1
            found = _JPEG_MARKER_IN_SCAN.search(data, end)
            if found is None:
                raise _Damaged("the file ends inside the image data, before the EOI marker (truncated)")
            pos = found.start()
        else:
            pos = end


def _check_png(data: bytes, on_size: Callable[[int, int], None]) -> None:
    n, pos, view, seen_idat = len(data), 8, memoryview(data), False
    while True:
        if pos + 12 > n:
            raise _Damaged(f"the file ends at byte {n} before the IEND chunk (truncated)")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > n:
            raise _Damaged(f"chunk {ctype!r} at byte {pos} runs past the end of the file (truncated)")
        if zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise _Damaged(f"CRC mismatch in chunk {ctype!r} at byte {pos}")
        if pos == 8:
            if ctype != b"IHDR" or length != 13:
                raise _Damaged("the first chunk is not IHDR")
            on_size(*struct.unpack_from(">II", data, pos + 8))
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":  # bytes after IEND are ignored by libpng too
            if not seen_idat:
                raise _Damaged("no IDAT chunk")
            return
        pos = end


def _check_webp(data: bytes, on_size: Callable[[int, int], None]) -> None:
    riff_end = 8 + struct.unpack_from("<I", data, 4)[0]
    if riff_end > len(data):
        raise _Damaged(f"the RIFF header says {riff_end} bytes, the file has {len(data)} (truncated)")
    pos, sized, has_image = 12, False, False
    while pos + 8 <= riff_end:
        fourcc, size = struct.unpack_from("<4sI", data, pos)
        body, end = pos + 8, pos + 8 + size + (size & 1)  # chunks are padded to even sizes
        if body + size > riff_end:
            raise _Damaged(f"chunk {fourcc!r} at byte {pos} runs past the end of the RIFF data (truncated)")
        if not sized:
            if fourcc == b"VP8X" and size >= 10:
                if data[body] & 0x02:
                    raise _Unsupported("animated WebP")
                w1 = int.from_bytes(data[body + 4 : body + 7], "little")
                h1 = int.from_bytes(data[body + 7 : body + 10], "little")
                on_size(w1 + 1, h1 + 1)
            elif fourcc == b"VP8 " and size >= 10 and data[body + 3 : body + 6] == b"\x9d\x01\x2a":
                w, h = struct.unpack_from("<HH", data, body + 6)
                on_size(w & 0x3FFF, h & 0x3FFF)
            elif fourcc == b"VP8L" and size >= 5 and data[body] == 0x2F:
                bits = struct.unpack_from("<I", data, body + 1)[0]
                on_size((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
            else:
                raise _Damaged(f"the first chunk {fourcc!r} is not a VP8X, VP8 or VP8L header")
            sized = True
        has_image |= fourcc in (b"VP8 ", b"VP8L")
        pos = end
    if not has_image:
        raise _Damaged("no VP8/VP8L image data")


def _check_bmp(data: bytes, on_size: Callable[[int, int], None]) -> None:
    if len(data) < 26:
        raise _Damaged("the file ends inside the headers (truncated)")
    offset, dib = struct.unpack_from("<II", data, 10)
    if dib == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bpp = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    elif dib >= 40:
        if len(data) < 34:
            raise _Damaged("the file ends inside the headers (truncated)")
        width, height, _, bpp, compression = struct.unpack_from("<iiHHI", data, 18)
    else:
        raise _Damaged(f"unknown header size {dib}")
    on_size(abs(width), abs(height))
    if compression not in (0, 3, 6):  # only uncompressed pixel arrays have a size to check
        raise _Unsupported(f"compression {compression} (RLE, embedded JPEG or PNG)")
    need = offset + (bpp * abs(width) + 31) // 32 * 4 * abs(height)
    if need > len(data):
        raise _Damaged(f"the pixel array needs {need} bytes, the file has {len(data)} (truncated)")


_CHECKERS: dict[str, Callable[[bytes, Callable[[int, int], None]], None]] = {
    "JPEG": _check_jpeg,
    "PNG": _check_png,
    "WebP": _check_webp,
    "BMP": _check_bmp,
}


@dataclass(frozen=True)
class CropGeometry:
    center: np.ndarray  # (2,) float32
    scale: np.ndarray  # (2,) float32, box size / PIXEL_STD
    size: int
    forward: np.ndarray  # 2x3 image -> crop
    inverse: np.ndarray  # 2x3 crop -> image


def sanitize_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """COCO loaders' clean_bbox: clip to the image; the width used is one pixel less than w."""
    if len(box) != 4:
        raise BoxError(f"a box is [x, y, w, h], got {list(box)!r}")
    x, y, w, h = (float(v) for v in box)
    if not all(np.isfinite([x, y, w, h])):
        raise BoxError(f"box has non-finite values: {list(box)!r}")
    if w <= 0 or h <= 0:
        raise BoxError(f"box {list(box)!r} is degenerate (width and height must be > 0)")
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x >= width or y >= height or x + w <= 0 or y + h <= 0 or x2 < x1 or y2 < y1:
        raise BoxError(f"box {list(box)!r} lies outside the {width}x{height} image")
    return x1, y1, x2 - x1, y2 - y1


def box_to_center_scale(box: Sequence[float], aspect_ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    x, y, w, h = box
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w * 1.0 / PIXEL_STD, h * 1.0 / PIXEL_STD], dtype=np.float32)
    return center, scale


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=np.float32)


def affine_transform(
    center: np.ndarray, scale: np.ndarray, rotation: float, size: int, inverse: bool = False
) -> np.ndarray:
    """The official ``get_affine_transform`` (float32 points, cv2.getAffineTransform)."""
    scale_px = np.asarray(scale, dtype=np.float32) * PIXEL_STD
    src_w = scale_px[0]
    rot = np.pi * rotation / 180.0
    sn, cs = np.sin(rot), np.cos(rot)
    src_dir = np.array([0 * cs - (src_w * -0.5) * sn, 0 * sn + (src_w * -0.5) * cs], dtype=np.float32)
    dst_dir = np.array([0, size * -0.5], np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + src_dir
    dst[0] = [size * 0.5, size * 0.5]
    dst[1] = np.array([size * 0.5, size * 0.5]) + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inverse:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def crop_geometry(box: Sequence[float], image_hw: tuple[int, int], size: int) -> CropGeometry:
    height, width = image_hw
    clean = sanitize_box(box, width, height)
    center, scale = box_to_center_scale(clean)
    return CropGeometry(
        center=center,
        scale=scale,
        size=size,
        forward=affine_transform(center, scale, 0.0, size),
        inverse=affine_transform(center, scale, 0.0, size, inverse=True),
    )


def warp(image: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    """The crop: OpenCV 4.x ``cv2.warpAffine(image, forward, (size, size), flags=INTER_LINEAR)``."""
    return warp_affine(image, geometry.forward, (geometry.size, geometry.size))


# OpenCV 4.x imgwarp.cpp: source coordinates in fixed point with AB_BITS fractional bits, of
# which INTER_BITS are kept to index the bilinear weights.
_AB_BITS = 10
_INTER_BITS = 5
_INTER_TAB_SIZE = 1 << _INTER_BITS


def _invert_affine(m: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """cv::warpAffine's in-place inversion, operation for operation (Python floats are IEEE doubles)."""
    m0, m1, m2, m3, m4, m5 = (float(v) for v in m.reshape(6))
    d = m0 * m4 - m1 * m3
    d = 1.0 / d if d != 0 else 0.0
    a0, a1, a3, a4 = m4 * d, m1 * -d, m3 * -d, m0 * d
    return a0, a1, -a0 * m2 - a1 * m5, a3, a4, -a3 * m2 - a4 * m5


def warp_affine(image: np.ndarray, matrix: np.ndarray, dsize: tuple[int, int]) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, dsize, flags=cv2.INTER_LINEAR)`` of OpenCV 4.x, bit for bit.

    ``image``: uint8 HxW or HxWxC; ``matrix``: 2x3 forward (image -> output) affine;
    ``dsize``: (width, height) of the output; outside the image is BORDER_CONSTANT 0.

    OpenCV 4.x (WarpAffineInvoker + remapBilinear, 8-bit path): with the inverse map A,
    X(x, y) = ((round(A0*x*1024) + round((A1*y + A2)*1024) + 16) >> 5, likewise Y; the top 5
    fractional bits of X, Y pick weights from a 32x32 table (fx, fy in 1/32) and
    pixel = (sum of weight * corner + 2**14) >> 15, corners outside the image counting 0.
    round is cvRound: half to even, as np.rint. The table's weights are (32-fy)(32-fx)*32,
    (32-fy)fx*32, fy(32-fx)*32, fy*fx*32 (its float recipe is exact), except at fx = fy = 0
    where 32768 saturates to 32767 and the fix-up gives the bottom-right corner weight 1;
    there (32767*a + b + 2**14) >> 15 == a for any pixels a, b in 0..255, as the exact
    weights give, so the sum is computed below with the exact weights divided by 32:
    (sum + 2**9) >> 10, separably (first along x, then along y) in exact integers.
    OpenCV 5.x interpolates differently; tests/fixtures/crop_oracle.npz holds OpenCV 4.x
    crops that this reproduces exactly.
    """
    src = np.ascontiguousarray(image)
    if src.dtype != np.uint8 or src.ndim not in (2, 3) or src.size == 0:
        raise ImageError(f"warp needs a non-empty uint8 HxW or HxWxC image, got {src.dtype} {src.shape}")
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3) or not np.isfinite(m).all():
        raise ValueError(f"the affine matrix must be a finite 2x3 array, got {m.tolist()!r}")
    dw, dh = (int(v) for v in dsize)
    a0, a1, a2, a3, a4, a5 = _invert_affine(m)
    scale, half = float(1 << _AB_BITS), 1 << (_AB_BITS - _INTER_BITS - 1)
    xs, ys = np.arange(dw, dtype=np.float64), np.arange(dh, dtype=np.float64)
    adelta = np.rint(a0 * xs * scale).astype(np.int64)
    bdelta = np.rint(a3 * xs * scale).astype(np.int64)
    x0 = np.rint((a1 * ys + a2) * scale).astype(np.int64) + half
    y0 = np.rint((a4 * ys + a5) * scale).astype(np.int64) + half
    shift = _AB_BITS - _INTER_BITS
    if dh and not bdelta.any() and (x0 == x0[0]).all():
        # no rotation (the crops): X depends on x only, Y on y only; same integers, 1-D
        fix_x = ((x0[0] + adelta) >> shift)[None, :]
        fix_y = (y0 >> shift)[:, None]
    else:
        fix_x = (x0[:, None] + adelta[None, :]) >> shift
        fix_y = (y0[:, None] + bdelta[None, :]) >> shift
    height, width = src.shape[:2]
    flat = src.reshape(height * width, -1)
    sx, fx = fix_x >> _INTER_BITS, (fix_x & (_INTER_TAB_SIZE - 1)).astype(np.int16)
    sy, fy = fix_y >> _INTER_BITS, (fix_y & (_INTER_TAB_SIZE - 1)).astype(np.int32)
    # the corners' weights, zero where a corner lies outside the image (BORDER_CONSTANT 0)
    wx = ((_INTER_TAB_SIZE - fx) * ((sx >= 0) & (sx < width)), fx * ((sx >= -1) & (sx < width - 1)))
    wy = ((_INTER_TAB_SIZE - fy) * ((sy >= 0) & (sy < height)), fy * ((sy >= -1) & (sy < height - 1)))
    col = (np.clip(sx, 0, width - 1), np.clip(sx + 1, 0, width - 1))
    row = (np.clip(sy, 0, height - 1) * width, np.clip(sy + 1, 0, height - 1) * width)
    acc = np.full((dh, dw, flat.shape[1]), 1 << (2 * _INTER_BITS - 1), np.int32)  # rounds the >> below
    for r, w_row in zip(row, wy):
        # a row's sum is at most 32 * 255: int16 holds it
        line = np.take(flat, r + col[0], axis=0) * wx[0][..., None]
        line += np.take(flat, r + col[1], axis=0) * wx[1][..., None]
        acc += line * w_row[..., None]
    out = (acc >> (2 * _INTER_BITS)).astype(np.uint8)
    return out if src.ndim == 3 else out[:, :, 0]


def normalize(crops: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W], as torchvision ToTensor + Normalize."""
    x = crops.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_image_coords(points: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Crop-pixel points [K,2] -> image pixels with the inverse affine (official transform_preds)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ inverse[:, :2].T + inverse[:, 2]
