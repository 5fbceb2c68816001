"""A sweep of bad or unusual inputs, as a new user would try them, against a real engine.

    python benchmarks/bad_inputs.py [--engine ENGINE_DIR] [--checkpoint CKPT] [--json OUT] [--only boxes,cli]

Classes: boxes, images, keypoints, engine (damaged copies of the engine directory),
checkpoint (damaged copies of the checkpoint, run with backend="torch"), predict
(``predict_coco`` on malformed COCO files) and cli (``python -m locllm_sdk.cli`` in a
subprocess).

Without --engine it builds a small test model first (a tiny random checkpoint, image size
56, and its ONNX engine, in a temporary directory: a few tens of seconds). --checkpoint is
the checkpoint the checkpoint cases damage copies of (default: the engine's source
checkpoint, or the one built here).

Each case is run and judged by one of two rules:

* clear error (bad input): it must raise an error of the SDK's own type (a subclass of
  ``locllm_sdk.errors.LocLLMError``). Any other exception (IndexError, TypeError, numpy, cv2,
  yaml, json, safetensors or ONNX Runtime errors, a KeyError that is not an
  UnknownKeypointError...) or a silent success is a FAIL. For CLI cases: exit code 2, exactly
  one line on stderr starting with ``locllm: error:`` that says something (3 words or more, not
  a bare key name), no traceback and no file written.
* correct result (unusual but valid input): it must return a result that is right, e.g. an
  xyxy box gives the answers of the equivalent xywh box, a PNG the answers of the array with
  its pixels, a JPEG with an EXIF orientation the answers of its upright pixels.

Prints one row per case (class, case, expected, got, PASS/FAIL), counts per class and the
total; --json writes the rows. Always exits 0: it is a report, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export"):
    sys.path.insert(0, str(_ROOT / _sub))

import cv2  # noqa: E402
from locllm_sdk import Pose  # noqa: E402
from locllm_sdk.errors import LocLLMError  # noqa: E402

ERR, RES = "clear error", "correct result"
KP = ["nose", "left wrist"]  # the keypoints the comparisons ask for
H, W = 96, 128  # the test image
BOX = [20.0, 10.0, 60.0, 70.0]  # xywh, inside the image
GOT_WIDTH = 128  # the table's got column (the JSON rows hold it whole)
# same pixels through the same engine: the same answers, scores equal to float noise (relative; the tiny
# random model's scores are ~1e-4 and move by ~0.5% when the image shifts by one pixel)
SCORE_TOL = 1e-4


@dataclass
class Case:
    cls: str
    name: str
    expected: str
    fn: Callable[[], object]  # ERR: must raise; RES: returns (ok, text); CLI: returns (ok, text) itself
    cli: bool = False
    seconds: float = 0.0


class Ctx:
    """What the cases share: the engine, the checkpoint, the test images, a scratch folder."""

    def __init__(self, engine: Path, checkpoint: Path | None, tmp: Path):
        self.engine, self.checkpoint, self.tmp = engine, checkpoint, tmp
        self.pose = Pose(engine)
        self.img = test_image()
        self.files = tmp / "files"
        self.files.mkdir()
        self._n = 0

    def path(self, name: str, data: bytes | None = None) -> Path:
        """A fresh file (or just a fresh path) in a folder of its own."""
        self._n += 1
        folder = self.files / f"f{self._n}"
        folder.mkdir()
        p = folder / name
        if data is not None:
            p.write_bytes(data)
        return p

    def locate(self, image=..., keypoints=KP, boxes=..., **kw):
        image = self.img if image is ... else image
        return self.pose.locate(image, keypoints, boxes=[BOX] if boxes is ... else boxes, **kw)


# --------------------------------------------------------------------------------------
# Test data


def test_image(h: int = H, w: int = W, seed: int = 3) -> np.ndarray:
    """Smooth colour field with shapes: not symmetric, so a rotation or a flip changes the answers."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=2).astype(np.uint8)
    for _ in range(10):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        r = int(rng.integers(3, max(4, min(h, w) // 4)))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), r, c, -1)
    return np.ascontiguousarray(img)


def encode(rgb: np.ndarray, ext: str, params: tuple = ()) -> bytes:
    img = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA if rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok, ext
    return buf.tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A small, structurally valid PNG whose header declares width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def png_bad_idat(rgb: np.ndarray) -> bytes:
    """A PNG whose chunk CRCs are right but whose compressed pixel data is damaged."""
    body = b"".join(
        png_chunk(k, d if k != b"IDAT" else d[:2] + bytes(b ^ 0x5A for b in d[2:-4]) + d[-4:])
        for k, d in png_chunks(encode(rgb, ".png"))
    )
    return b"\x89PNG\r\n\x1a\n" + body


# EXIF orientation -> (upright pixels -> stored pixels, stored pixels -> upright pixels)
ORIENTATIONS = {
    2: (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
    3: (lambda a: a[::-1, ::-1], lambda a: a[::-1, ::-1]),
    6: (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
    8: (lambda a: np.rot90(a, -1), lambda a: np.rot90(a, 1)),
}


def jpeg_with_orientation(upright: np.ndarray, orientation: int) -> tuple[bytes, np.ndarray]:
    """A JPEG whose stored pixels, turned by its EXIF orientation, show ``upright``; and the
    upright pixels as decoded (JPEG is lossy: OpenCV's decoding of the stored grid, turned in numpy)."""
    from PIL import Image

    to_stored, to_upright = ORIENTATIONS[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(to_stored(upright))).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    stored = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flags), cv2.COLOR_BGR2RGB)
    return data, np.ascontiguousarray(to_upright(stored))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# Judging


SCRUB: dict[str, str] = {}  # long paths -> short names in what the table shows (set by main)


def scrub(text: str) -> str:
    for long, name in SCRUB.items():
        text = text.replace(long, name)
    return " ".join(text.split())


def short(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {scrub(msg)[:100]}"


def describe(value: object) -> str:
    if hasattr(value, "persons"):
        kps = [f"{k.name}=({k.x:.1f},{k.y:.1f},{k.score:.3g})" for p in value.persons[:1] for k in p.keypoints[:2]]
        return f"returned {len(value.persons)} person(s): {' '.join(kps)}"
    if isinstance(value, Pose):
        return f"returned {value!r}"
    return f"returned {str(value)[:100]}"


def differs(a, b, tol: float = SCORE_TOL, boxes: bool = True) -> str | None:
    """None when two Results hold the same answers; else what differs first."""
    if tuple(a.image_size) != tuple(b.image_size):
        return f"image {a.image_size} vs {b.image_size}"
    return persons_differ(a.persons, b.persons, tol, boxes)


def persons_differ(ps, qs, tol: float = SCORE_TOL, boxes: bool = True) -> str | None:
    if len(ps) != len(qs):
        return f"{len(ps)} persons vs {len(qs)}"
    for i, (p, q) in enumerate(zip(ps, qs)):
        if boxes and not np.allclose(p.box, q.box, atol=1e-6):
            return f"person {i} box {p.box} vs {q.box}"
        if [k.name for k in p] != [k.name for k in q]:
            return f"names {[k.name for k in p]} vs {[k.name for k in q]}"
        for k, m in zip(p, q):
            if k.answer != m.answer:
                return f"{k.name}: answer {k.answer} vs {m.answer}"
            score_off = abs(k.score - m.score) > tol * max(abs(k.score), abs(m.score), 1e-30)
            if abs(k.x - m.x) > 1e-3 or abs(k.y - m.y) > 1e-3 or score_off:
                return f"{k.name}: ({k.x:.3f},{k.y:.3f},{k.score:.6f}) vs ({m.x:.3f},{m.y:.3f},{m.score:.6f})"
    return None


def same_as(got, want, what: str, tol: float = SCORE_TOL, boxes: bool = True) -> tuple[bool, str]:
    d = differs(got, want, tol, boxes)
    return (True, f"same answers as {what}") if d is None else (False, f"differs from {what}: {d}")


def sane(res, n_persons: int = 1, n_kp: int = len(KP)) -> tuple[bool, str]:
    """A result that is well formed: the persons and keypoints asked, finite values."""
    if len(res.persons) != n_persons or any(len(p) != n_kp for p in res.persons):
        return False, f"{len(res.persons)} persons x {[len(p) for p in res.persons]} keypoints"
    vals = [(k.x, k.y, k.score) for p in res.persons for k in p]
    if not all(np.isfinite(v).all() and 0.0 <= v[2] <= 1.0 for v in vals):
        return False, f"non-finite or out-of-range values {vals[:3]}"
    return True, describe(res)


def judge(case: Case) -> tuple[str, bool]:
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, ok = _run(case)
    case.seconds = time.perf_counter() - t
    if caught:  # a warning is part of what happened (and would garble the table)
        w = caught[0]
        got += f" (warned {w.category.__name__}: {' '.join(str(w.message).split())[:60]})"
    return got, ok


def _run(case: Case) -> tuple[str, bool]:
    try:
        out = case.fn()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - every outcome is a data point here
        if case.expected == ERR and not case.cli and isinstance(e, LocLLMError):
            return short(e), True
        tb = traceback.extract_tb(e.__traceback__)[-1]  # where it broke, for whoever fixes it
        return f"{short(e)} [at {Path(tb.filename).name}:{tb.lineno}]", False
    if case.cli or case.expected == RES:
        ok, text = out
        return text, bool(ok)
    return f"no error: {describe(out)}", False


# --------------------------------------------------------------------------------------
# Boxes


def box_cases(c: Ctx) -> list[Case]:
    ref = c.locate()
    whole = c.locate(boxes=None)
    two = [BOX, [70.0, 30.0, 50.0, 60.0]]

    def eq(boxes, what="the xywh box", want=ref, **kw):
        return lambda: same_as(c.locate(boxes=boxes, **kw), want, what)

    def bad(boxes, **kw):
        return lambda: c.locate(boxes=boxes, **kw)

    def huge(boxes, **kw):
        """Clipped to the image as COCO loaders clip: the whole image's answers (the box is reported as given)."""
        return lambda: same_as(c.locate(boxes=boxes, **kw), whole, "boxes=None", boxes=False)

    def nobody(boxes):
        """No box is no person: an empty result (a frame where a detector found nobody)."""

        def check():
            res = c.locate(boxes=boxes)
            return len(res) == 0 and res.numpy().shape[0] == 0, f"{len(res)} person(s)"

        return check

    def two_boxes():
        res = c.locate(boxes=two)
        for i, b in enumerate(two):
            d = persons_differ([res.persons[i]], c.locate(boxes=[b]).persons)
            if d:
                return False, f"person {i} differs from its one-box call: {d}"
        return True, "each person = its one-box call"

    def partly_outside():
        res = c.locate(boxes=[[-30.0, -20.0, 100.0, 90.0]])
        ok, text = sane(res)
        return ok and list(res.persons[0].box) == [-30.0, -20.0, 100.0, 90.0], text

    rows = [
        ("detector row [x,y,w,h,score,cls] (6 numbers)", ERR, bad([[20, 10, 60, 70, 0.9, 0]])),
        ("detector row of 5 numbers (score)", ERR, bad([[20, 10, 60, 70, 0.9]])),
        ("one flat detector row of 6 numbers", ERR, bad([20, 10, 60, 70, 0.9, 0])),
        ("(N,5) detector array", ERR, bad(np.array([[20, 10, 80, 80, 0.9], [70, 30, 120, 90, 0.8]]))),
        ("(N,6) detector array", ERR, bad(np.array([[20, 10, 80, 80, 0.9, 0], [70, 30, 120, 90, 0.8, 0]]))),
        ("(N,6) detector array, box_format=xyxy", ERR, bad(np.array([[20, 10, 80, 80, 0.9, 0]]), box_format="xyxy")),
        ("3-number box [[x, y, w]]", ERR, bad([[20, 10, 60]])),
        ("flat 3-number box [x, y, w]", ERR, bad([20, 10, 60])),
        ("ragged list (4 and 3 numbers)", ERR, bad([[20, 10, 60, 70], [1, 2, 3]])),
        ("ragged list (4 and 5 numbers)", ERR, bad([[20, 10, 60, 70], [1, 2, 3, 4, 5]])),
        ("list of one empty box [[]]", ERR, bad([[]])),
        ("boxes=5 (scalar int)", ERR, bad(5)),
        ("boxes=5.0 (scalar float)", ERR, bad(5.0)),
        ("boxes=np.float64(5) (numpy scalar)", ERR, bad(np.float64(5))),
        ("boxes=np.array(5) (0-d array)", ERR, bad(np.array(5.0))),
        ("boxes={'x':20,'y':10,'w':60,'h':70} (dict)", ERR, bad({"x": 20, "y": 10, "w": 60, "h": 70})),
        ("list of dicts", ERR, bad([{"x": 20, "y": 10, "w": 60, "h": 70}])),
        ("boxes='20,10,60,70' (string)", ERR, bad("20,10,60,70")),
        ("boxes=b'20,10,60,70' (bytes)", ERR, bad(b"20,10,60,70")),
        ("box of number strings ['20','10','60','70']", ERR, bad([["20", "10", "60", "70"]])),
        ("boxes as a set {20,10,60,70}", ERR, bad({20, 10, 60, 70})),
        ("[None] (None inside the list)", ERR, bad([None])),
        ("[box, None]", ERR, bad([BOX, None])),
        ("None inside a box [20, None, 60, 70]", ERR, bad([[20, None, 60, 70]])),
        ("NaN in a box", ERR, bad([[20, float("nan"), 60, 70]])),
        ("inf width", ERR, bad([[20, 10, float("inf"), 70]])),
        ("-inf x", ERR, bad([[float("-inf"), 10, 60, 70]])),
        ("NaN in an (N,4) array", ERR, bad(np.array([[20, 10, 60, np.nan]]))),
        ("negative width", ERR, bad([[20, 10, -60, 70]])),
        ("negative height", ERR, bad([[20, 10, 60, -70]])),
        ("zero width", ERR, bad([[20, 10, 0, 70]])),
        ("zero height", ERR, bad([[20, 10, 60, 0]])),
        ("1.5 px wide (under 2 px)", ERR, bad([[20, 10, 1.5, 70]])),
        ("1 x 1 px box", ERR, bad([[20, 10, 1, 1]])),
        ("xyxy with x2 < x1 (corners swapped)", ERR, bad([[80, 10, 20, 80]], box_format="xyxy")),
        ("xyxy with x2 == x1", ERR, bad([[20, 10, 20, 80]], box_format="xyxy")),
        ("cxcywh with zero size", ERR, bad([[50, 45, 0, 0]], box_format="cxcywh")),
        ("box entirely right of the image", ERR, bad([[W + 10, 10, 60, 70]])),
        ("box entirely above the image", ERR, bad([[20, -200, 60, 70]])),
        ("box ending exactly at the left edge", ERR, bad([[-60, 10, 60, 70]])),
        ("box starting exactly at the right edge x=W", ERR, bad([[W, 10, 60, 70]])),
        ("huge position 1e12", ERR, bad([[1e12, 1e12, 60, 70]])),
        ("huge negative position -1e12 (small box)", ERR, bad([[-1e12, -1e12, 60, 70]])),
        ("width overflowing to inf (1e308 * 10)", ERR, bad([[0, 0, 1e308 * 10, 70]])),
        ("second of two boxes degenerate", ERR, bad([BOX, [10, 10, 0, 0]])),
        ("bool array", ERR, bad(np.array([[True, True, True, True]]))),
        ("list of bools", ERR, bad([[True, False, True, True]])),
        ("object array", ERR, bad(np.array([[20, 10, 60, 70]], dtype=object))),
        ("string array", ERR, bad(np.array([["20", "10", "60", "70"]]))),
        ("complex array", ERR, bad(np.array([[20, 10, 60 + 1j, 70]]))),
        ("list of complex numbers", ERR, bad([[20, 10, 60 + 1j, 70]])),
        ("3-D array (1,1,4)", ERR, bad(np.array([[BOX]]))),
        ("(4,1) column array", ERR, bad(np.array(BOX).reshape(4, 1))),
        ("nested too deep [[[x,y,w,h]]]", ERR, bad([[BOX]])),
        ("empty list [] -> no person", RES, nobody([])),
        ("empty tuple () -> no person", RES, nobody(())),
        ("empty (0,4) array -> no person", RES, nobody(np.zeros((0, 4)))),
        ("empty 1-D array -> no person", RES, nobody(np.zeros((0,)))),
        ("unknown box_format 'xywhn'", ERR, bad([BOX], box_format="xywhn")),
        ("box_format=None", ERR, bad([BOX], box_format=None)),
        ("box_format='yolo'", ERR, bad([BOX], box_format="yolo")),
        # unusual but valid
        ("xyxy box = the equivalent xywh box", RES, eq([[20, 10, 80, 80]], box_format="xyxy")),
        ("cxcywh box = the equivalent xywh box", RES, eq([[50, 45, 60, 70]], box_format="cxcywh")),
        ("flat 4-number box [x, y, w, h]", RES, eq(BOX)),
        ("flat (4,) array", RES, eq(np.array(BOX))),
        ("(1,4) float32 array", RES, eq(np.array([BOX], np.float32))),
        ("(1,4) int array", RES, eq(np.array([BOX], np.int64))),
        ("int list [[20, 10, 60, 70]]", RES, eq([[20, 10, 60, 70]])),
        ("tuple of tuples", RES, eq(((20, 10, 60, 70),))),
        ("numpy float32 scalars in a list", RES, eq([[np.float32(v) for v in BOX]])),
        ("list of (4,) arrays", RES, eq([np.array(BOX)])),
        ("xyxy (N,4) array = xywh list", RES, eq(np.array([[20, 10, 80, 80]]), box_format="xyxy")),
        ("two boxes: each person = its one-box call", RES, two_boxes),
        ("two boxes as (2,4) array = as a list", RES, lambda: same_as(c.locate(boxes=np.array(two)),
                                                                          c.locate(boxes=two), "the list")),
        ("box partly outside the image works", RES, partly_outside),
        ("2 x 2 px box (the minimum) works", RES, lambda: sane(c.locate(boxes=[[20, 10, 2, 2]]))),
        ("whole-image box = boxes=None", RES, eq([[0, 0, W, H]], "boxes=None", whole)),
        ("huge box [0,0,1e12,1e12] = the whole image (clipped)", RES, huge([[0, 0, 1e12, 1e12]])),
        ("huge box [-1e12,-1e12,2e12,2e12] = whole image", RES, huge([[-1e12, -1e12, 2e12, 2e12]])),
        ("huge xyxy box [-1e12,-1e12,1e12,1e12] = whole image", RES,
         huge([[-1e12, -1e12, 1e12, 1e12]], box_format="xyxy")),
    ]  # fmt: skip
    return [Case("boxes", n, e, f) for n, e, f in rows]


# --------------------------------------------------------------------------------------
# Images


def image_cases(c: Ctx) -> list[Case]:
    img = c.img
    ref = c.locate()
    png = encode(img, ".png")
    jpg = encode(img, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95))

    def bad(image, **kw):
        return lambda: c.locate(image, **kw)

    def eq(image, want=None, what="the RGB array", **kw):
        return lambda: same_as(c.locate(image, **kw), ref if want is None else want, what)

    def eq_decoded(data: bytes, name: str, what: str):
        """The file = the array OpenCV decodes from it (for lossy or converted formats)."""

        def run():
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            return same_as(c.locate(c.path(name, data)), c.locate(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)), what)

        return run

    def exif(orientation: int):
        def run():
            data, upright = jpeg_with_orientation(img, orientation)
            got = c.locate(c.path(f"exif{orientation}.jpg", data), boxes=[[10, 10, 60, 70]])
            return same_as(got, c.locate(upright, boxes=[[10, 10, 60, 70]]), "the upright pixels")

        return run

    def exif_pil():
        from PIL import Image

        data, _ = jpeg_with_orientation(img, 6)
        with Image.open(io.BytesIO(data)) as im:  # Pillow's own decoding of the stored grid, turned in numpy
            upright = np.ascontiguousarray(ORIENTATIONS[6][1](np.asarray(im.convert("RGB"))))
        with Image.open(c.path("exif6_pil.jpg", data)) as im:
            got = c.locate(im, boxes=[[10, 10, 60, 70]])
        return same_as(got, c.locate(upright, boxes=[[10, 10, 60, 70]]), "the upright pixels")

    def pil_bgr():
        from PIL import Image

        return c.locate(Image.fromarray(img), channels="bgr")

    def pil_truncated():
        from PIL import Image

        with Image.open(c.path("cut_pil.jpg", jpg[: len(jpg) // 2])) as im:
            return c.locate(im)

    def pil_image():
        from PIL import Image

        return same_as(c.locate(Image.fromarray(img)), ref, "the RGB array")

    grey = img[:, :, 1].copy()
    grey3 = np.repeat(grey[:, :, None], 3, axis=2)
    rgba = np.concatenate([img, np.full((H, W, 1), 128, np.uint8)], axis=2)
    png16 = encode(img.astype(np.uint16) * 257, ".png")
    rows = [
        ("missing file", ERR, bad(str(c.tmp / "no_such_image.jpg"))),
        ("missing file as Path", ERR, bad(c.tmp / "no_such_image.png")),
        ("empty path ''", ERR, bad("")),
        ("a URL (not downloaded)", ERR, bad("https://example.com/person.jpg")),
        ("a directory", ERR, bad(str(c.files))),
        ("empty file", ERR, lambda: c.locate(c.path("empty.jpg", b""))),
        ("text bytes named .jpg", ERR, lambda: c.locate(c.path("notes.jpg", b"hello, this is not an image\n"))),
        ("an HTML error page named .png", ERR,
         lambda: c.locate(c.path("page.png", b"<!DOCTYPE html><html><body>404</body></html>"))),
        ("truncated JPEG (cut in half)", ERR, lambda: c.locate(c.path("cut.jpg", jpg[: len(jpg) // 2]))),
        ("truncated JPEG (EOI marker cut off)", ERR, lambda: c.locate(c.path("cut_eoi.jpg", jpg[:-2]))),
        ("truncated JPEG (inside the headers)", ERR, lambda: c.locate(c.path("cut_head.jpg", jpg[:100]))),
        ("JPEG of only the SOI marker", ERR, lambda: c.locate(c.path("soi.jpg", jpg[:3]))),
        ("truncated PNG (cut in half)", ERR, lambda: c.locate(c.path("cut.png", png[: len(png) // 2]))),
        ("truncated PNG (IEND cut off)", ERR, lambda: c.locate(c.path("cut_iend.png", png[:-12]))),
        ("PNG of only the signature", ERR, lambda: c.locate(c.path("sig.png", png[:8]))),
        ("PNG with a byte flipped (CRC mismatch)", ERR,
         lambda: c.locate(c.path("crc.png", png[:60] + bytes([png[60] ^ 0xFF]) + png[61:]))),
        ("PNG with damaged pixel data, CRCs right", ERR, lambda: c.locate(c.path("zlib.png", png_bad_idat(img)))),
        ("small PNG declaring 20000x20000 pixels", ERR,
         lambda: c.locate(c.path("bomb.png", png_declaring(20000, 20000)))),
        ("small PNG declaring 9000x9000 (under the limit)", ERR,
         lambda: c.locate(c.path("short.png", png_declaring(9000, 9000)))),
        ("small PNG declaring 0x0 pixels", ERR, lambda: c.locate(c.path("zero.png", png_declaring(0, 0)))),
        ("GIF file", ERR, lambda: c.locate(c.path("a.gif", b"GIF89a" + b"\x00" * 32))),
        ("TIFF file", ERR, lambda: c.locate(c.path("a.tif", encode(img, ".tiff")))),
        ("1x1 PNG file", ERR, lambda: c.locate(c.path("one.png", encode(img[:1, :1], ".png")), boxes=None)),
        ("1x1 array", ERR, bad(img[:1, :1].copy(), boxes=None)),
        ("1-pixel-high array (1 x 128)", ERR, bad(img[:1].copy(), boxes=None)),
        ("empty (0,0,3) array", ERR, bad(np.zeros((0, 0, 3), np.uint8), boxes=None)),
        ("grey HxW array", ERR, bad(grey)),
        ("HxWx1 array", ERR, bad(grey[:, :, None])),
        ("float32 array 0..255", ERR, bad(img.astype(np.float32))),
        ("float64 array 0..1", ERR, bad(img / 255.0)),
        ("uint16 array", ERR, bad(img.astype(np.uint16))),
        ("int64 array", ERR, bad(img.astype(np.int64))),
        ("bool array", ERR, bad(img > 128)),
        ("HxWx2 array", ERR, bad(img[:, :, :2].copy())),
        ("HxWx5 array", ERR, bad(np.concatenate([img, img[:, :, :2]], axis=2))),
        ("CHW array (3,H,W)", ERR, bad(np.ascontiguousarray(img.transpose(2, 0, 1)))),
        ("4-D array (1,H,W,3)", ERR, bad(img[None])),
        ("list of lists (nested Python lists)", ERR, bad(img.tolist())),
        ("image=None", ERR, bad(None)),
        ("PNG bytes object (not a path)", ERR, bad(png)),
        ("channels='hsv'", ERR, bad(img, channels="hsv")),
        ("channels=None", ERR, bad(img, channels=None)),
        ("channels='bgr' for a file path", ERR, lambda: c.locate(str(c.path("a.png", png)), channels="bgr")),
        ("channels='bgr' for a PIL image", ERR, pil_bgr),
        ("truncated JPEG opened with PIL", ERR, pil_truncated),
        # unusual but valid
        ("PNG file = the array of its pixels", RES, lambda: same_as(c.locate(str(c.path("a.png", png))), ref, "array")),
        ("PNG as pathlib.Path", RES, lambda: same_as(c.locate(c.path("p.png", png)), ref, "the RGB array")),
        ("PNG content named .jpg", RES, lambda: same_as(c.locate(c.path("png.jpg", png)), ref, "the RGB array")),
        ("BMP file = the array", RES, lambda: same_as(c.locate(c.path("a.bmp", encode(img, ".bmp"))), ref, "array")),
        ("lossless WebP = the array", RES,
         lambda: same_as(c.locate(c.path("a.webp", encode(img, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)))), ref,
                         "the RGB array")),
        ("JPEG file = its decoded pixels", RES, eq_decoded(jpg, "a.jpg", "its decoded pixels")),
        ("grey PNG = the grey array replicated", RES,
         lambda: same_as(c.locate(c.path("g.png", encode(grey, ".png"))), c.locate(grey3), "grey x3 array")),
        ("16-bit PNG = the 8-bit array", RES, lambda: same_as(c.locate(c.path("d.png", png16)), ref, "8-bit array")),
        ("RGBA PNG = the RGB array", RES, lambda: same_as(c.locate(c.path("rgba.png", encode(rgba, ".png"))), ref,
                                                            "the RGB array")),
        ("RGBA array = the RGB array", RES, eq(rgba)),
        ("bgr array with channels='bgr' = rgb array", RES, eq(np.ascontiguousarray(img[:, :, ::-1]), channels="bgr")),
        ("bgr array with channels='BGR' (upper case)", RES, eq(np.ascontiguousarray(img[:, :, ::-1]), channels="BGR")),
        ("non-contiguous bgr view with channels='bgr'", RES, eq(img[:, :, ::-1], channels="bgr")),
        ("non-contiguous (strided) array", RES,
         lambda: same_as(c.locate(np.repeat(img, 2, axis=1)[:, ::2]), ref, "the contiguous array")),
        ("Fortran-order array", RES, eq(np.asfortranarray(img))),
        ("read-only array", RES, lambda: same_as(c.locate(np.frombuffer(img.tobytes(), np.uint8).reshape(img.shape)),
                                                 ref, "the writable array")),
        ("PIL image = the array", RES, pil_image),
        ("JPEG with EXIF orientation 6 = upright pixels", RES, exif(6)),
        ("JPEG with EXIF orientation 8 = upright pixels", RES, exif(8)),
        ("JPEG with EXIF orientation 3 = upright pixels", RES, exif(3)),
        ("JPEG with EXIF orientation 2 (mirrored)", RES, exif(2)),
        ("PIL image of an EXIF-6 JPEG = upright pixels", RES, exif_pil),
        ("2x2 image works", RES, lambda: sane(c.locate(img[:2, :2].copy(), boxes=None))),
        ("tall thin 400x6 image works", RES, lambda: sane(c.locate(test_image(400, 6), boxes=None))),
    ]  # fmt: skip
    return [Case("images", n, e, f) for n, e, f in rows]


# --------------------------------------------------------------------------------------
# Keypoints


def keypoint_cases(c: Ctx) -> list[Case]:
    lib = c.pose.library

    def bad(keypoints):
        return lambda: c.locate(keypoints=keypoints)

    def eq(keypoints, want, what):
        return lambda: same_as(c.locate(keypoints=keypoints), c.locate(keypoints=want), what)

    def skeleton():
        res = c.locate(keypoints="coco17")
        want = list(lib.skeletons["coco17"].keypoints)
        if [k.name for k in res.persons[0]] != want:
            return False, f"names {[k.name for k in res.persons[0]]}"
        return same_as(res, c.locate(keypoints=want), "the 17 names in COCO order")

    def custom():
        res = c.locate(keypoints={"tail": "The tail is at the back of the animal, below the spine."})
        ok, text = sane(res, n_kp=1)
        return ok and res.persons[0][0].name == "tail", text

    long_text = "The point is on the body. " * 385  # ~10,000 characters, far past the 2048-token context
    rows = [
        ("keypoints=None", ERR, bad(None)),
        ("keypoints=5 (int)", ERR, bad(5)),
        ("keypoints=[] (empty list)", ERR, bad([])),
        ("keypoints={} (empty dict)", ERR, bad({})),
        ("keypoints='' (empty string)", ERR, bad("")),
        ("keypoints='   ' (blank)", ERR, bad("   ")),
        ("keypoints=b'nose' (bytes)", ERR, bad(b"nose")),
        ("keypoints=[None]", ERR, bad([None])),
        ("keypoints=[1, 2]", ERR, bad([1, 2])),
        ("keypoints=[['nose']] (nested)", ERR, bad([["nose"]])),
        ("unknown name 'tail'", ERR, bad(["tail"])),
        ("unknown name among known ['nose', 'elbow']", ERR, bad(["nose", "elbow"])),
        ("misspelled 'left wirst'", ERR, bad(["left wirst"])),
        ("unknown skeleton 'coco18'", ERR, bad("coco18")),
        ("skeleton name inside a list ['coco17']", ERR, bad(["coco17"])),
        ("duplicate names ['nose', 'nose']", ERR, bad(["nose", "nose"])),
        ("duplicate by spelling ['left_wrist', 'left wrist']", ERR, bad(["left_wrist", "left wrist"])),
        ("name containing <im_patch>", ERR, bad({"a<im_patch>b": "The point is on the body."})),
        ("name containing </s>", ERR, bad({"nose</s>": "The nose is on the face."})),
        ("library name + <s> ('nose<s>')", ERR, bad(["nose<s>"])),
        ("description containing <im_patch>", ERR, bad({"nose": "The nose <im_patch> is on the face."})),
        ("description containing </s>", ERR, bad({"nose": "The nose is on the face.</s>"})),
        ("description containing <s>", ERR, bad({"nose": "<s>The nose is on the face."})),
        ("description containing <unk>", ERR, bad({"nose": "The <unk> is on the face."})),
        ("empty description", ERR, bad({"nose": ""})),
        ("blank description", ERR, bad({"nose": "   "})),
        ("non-string description (int)", ERR, bad({"nose": 5})),
        ("non-string description (list)", ERR, bad({"nose": ["The nose is on the face."]})),
        ("non-string name in a dict {5: text}", ERR, bad({5: "The point is on the body."})),
        ("empty name with a description", ERR, bad({"": "The point is on the body."})),
        ("unknown name with description None", ERR, bad({"tail": None})),
        ("10,000-character description (past the context)", ERR, bad({"tail": long_text})),
        ("10,000-character name", ERR, bad({"x" * 10000: "The point is on the body."})),
        # unusual but valid
        ("'left_wrist' = 'left wrist'", RES, eq(["nose", "left_wrist"], KP, "'left wrist'")),
        ("'head top' = 'head_top'", RES, eq(["head top"], ["head_top"], "'head_top'")),
        ("one name as a string 'nose'", RES, eq("nose", ["nose"], "['nose']")),
        ("a tuple of names", RES, eq(tuple(KP), KP, "the list")),
        ("a generator of names", RES, lambda: same_as(c.locate(keypoints=(k for k in KP)), c.locate(), "the list")),
        ("a numpy array of names", RES, eq(np.array(KP), KP, "the list")),
        ("{name: None} = library descriptions", RES, eq(dict.fromkeys(KP), KP, "the names")),
        ("{name: library text} = the name", RES, eq({k: lib.descriptions[k] for k in KP}, KP, "the names")),
        ("skeleton name 'coco17'", RES, skeleton),
        ("custom keypoint with a description", RES, custom),
        ("unicode description works", RES,
         lambda: sane(c.locate(keypoints={"naso": "Le nez — au centre du visage, 鼻."}), n_kp=1)),
    ]  # fmt: skip
    return [Case("keypoints", n, e, f) for n, e, f in rows]


# --------------------------------------------------------------------------------------
# Engine directories


def engine_cases(c: Ctx) -> list[Case]:
    root = c.tmp / "engines"
    root.mkdir()
    counter = [0]

    def copy() -> Path:
        counter[0] += 1
        d = root / f"case{counter[0]}" / "engine"
        shutil.copytree(c.engine, d)
        return d

    def manifest(d: Path) -> dict:
        return json.loads((d / "manifest.json").read_text())

    def write_manifest(d: Path, data: object) -> None:
        (d / "manifest.json").write_text(json.dumps(data, indent=2))

    def edit(fn: Callable[[dict], object]) -> Callable[[Path], None]:
        def run(d: Path) -> None:
            data = manifest(d)
            fn(data)
            write_manifest(d, data)

        return run

    def rehash(d: Path, *names: str) -> None:
        data = manifest(d)
        for n in names:
            p = d / n
            data["files"][n] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
        write_manifest(d, data)

    def replace(name: str, new: Callable[[bytes], bytes], update: bool = True) -> Callable[[Path], None]:
        def run(d: Path) -> None:
            p = d / name
            p.write_bytes(new(p.read_bytes()))
            if update:
                rehash(d, name)

        return run

    def sub(data: dict, dotted: str | tuple[str, ...], value: object = ...) -> None:
        """Set (or delete) a manifest field: "model.num_patches", or a tuple path for file names."""
        *path, last = dotted.split(".") if isinstance(dotted, str) else dotted
        for k in path:
            data = data[k]
        if value is ...:
            del data[last]
        else:
            data[last] = value

    def damaged(mutate: Callable[[Path], None], **kw) -> Callable[[], object]:
        def run():
            d = copy()
            try:
                mutate(d)
                pose = Pose(d, **kw)
                return pose.locate(c.img, KP, boxes=[BOX])
            finally:
                shutil.rmtree(d.parent, ignore_errors=True)

        return run

    def outside(rel: str, absolute: bool = False) -> Callable[[Path], None]:
        """backends.onnxruntime.vision names a file outside the directory (a real, matching copy)."""

        def run(d: Path) -> None:
            target = (d / rel).resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(d / "vision.onnx", target)
            name = str(target) if absolute else rel
            data = manifest(d)
            data["backends"]["onnxruntime"]["vision"] = name
            data["files"][name] = {"bytes": target.stat().st_size, "sha256": sha256(target)}
            write_manifest(d, data)

        return run

    def symlinked(d: Path) -> None:
        target = d.parent / "elsewhere.onnx"
        shutil.move(d / "vision.onnx", target)
        (d / "vision.onnx").symlink_to(target)

    def unlisted(d: Path) -> None:
        shutil.copy(d / "vision.onnx", d / "other.onnx")
        edit(lambda m: sub(m, "backends.onnxruntime.vision", "other.onnx"))(d)

    def npy(array: np.ndarray) -> Callable[[bytes], bytes]:
        def make(_: bytes) -> bytes:
            import io

            buf = io.BytesIO()
            np.save(buf, array)
            return buf.getvalue()

        return make

    def flip_legacy(data: bytes) -> bytes:
        cfg = json.loads(data)
        cfg["legacy"] = not cfg.get("legacy", False)
        return json.dumps(cfg, indent=2).encode()

    def rewrite_added(data: bytes) -> bytes:
        return json.dumps({k: v + 1 for k, v in json.loads(data).items()}).encode()

    def same_size_flip(data: bytes) -> bytes:
        mid = len(data) // 2
        return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]

    def works(mutate: Callable[[Path], None], what: str) -> Callable[[], tuple[bool, str]]:
        def run():
            d = copy()
            try:
                mutate(d)
                return same_as(Pose(d).locate(c.img, KP, boxes=[BOX]), c.locate(), what)
            finally:
                shutil.rmtree(d.parent, ignore_errors=True)

        return run

    def extra_file(d: Path) -> None:
        (d / "NOTES.txt").write_text("copied from the build machine\n")

    man = manifest(c.engine)
    emb_shape = (man["model"]["vocab_size"], man["model"]["hidden_size"])
    rows = [
        ("manifest.json is a JSON list", damaged(lambda d: (d / "manifest.json").write_text("[1, 2, 3]"))),
        ("manifest.json is a JSON string", damaged(lambda d: (d / "manifest.json").write_text('"engine"'))),
        ("manifest.json is null", damaged(lambda d: (d / "manifest.json").write_text("null"))),
        ("manifest.json is not JSON", damaged(lambda d: (d / "manifest.json").write_text("{format: engine"))),
        ("manifest.json is empty", damaged(lambda d: (d / "manifest.json").write_text(""))),
        ("manifest.json is binary garbage", damaged(lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe\x00\x81"))),
        ("manifest.json is a directory", damaged(lambda d: ((d / "manifest.json").unlink(),
                                                           (d / "manifest.json").mkdir()))),
        ("manifest.json missing", damaged(lambda d: (d / "manifest.json").unlink())),
        ("missing model.num_patches", damaged(edit(lambda m: sub(m, "model.num_patches")))),
        ("missing model.image_size", damaged(edit(lambda m: sub(m, "model.image_size")))),
        ("missing model section", damaged(edit(lambda m: sub(m, "model")))),
        ("missing tokenizer section", damaged(edit(lambda m: sub(m, "tokenizer")))),
        ("missing files section", damaged(edit(lambda m: sub(m, "files")))),
        ("missing tokenizer.answer_grammar", damaged(edit(lambda m: sub(m, "tokenizer.answer_grammar")))),
        ("model.image_size is a string '56'", damaged(edit(lambda m: sub(m, "model.image_size", "56")))),
        ("model.num_patches is true", damaged(edit(lambda m: sub(m, "model.num_patches", True)))),
        ("model.num_patches is 16.0 (float)", damaged(edit(lambda m: sub(m, "model.num_patches", 16.0)))),
        ("model.norm_mean has 2 numbers", damaged(edit(lambda m: sub(m, "model.norm_mean", [0.5, 0.5])))),
        ("model section is a list", damaged(edit(lambda m: sub(m, "model", [1, 2])))),
        ("files section is a list", damaged(edit(lambda m: sub(m, "files", ["vision.onnx"])))),
        ("files.vision.onnx.bytes is a string", damaged(edit(lambda m: sub(m, ("files", "vision.onnx"), {
            "bytes": str(m["files"]["vision.onnx"]["bytes"]), "sha256": m["files"]["vision.onnx"]["sha256"]})))),
        ("backends.onnxruntime.vision is 123", damaged(edit(lambda m: sub(m, "backends.onnxruntime.vision", 123)))),
        ("tokenizer.answer_grammar is garbage", damaged(edit(lambda m: sub(m, "tokenizer.answer_grammar",
                                                                           {"dims": "two"})))),
        ("model.num_patches wrong value (9)", damaged(edit(lambda m: sub(m, "model.num_patches", 9)))),
        ("model.image_size wrong value (64)", damaged(edit(lambda m: sub(m, "model.image_size", 64)))),
        ("model.coord_dims 3 on a 2-D engine", damaged(edit(lambda m: sub(m, "model.coord_dims", 3)))),
        ("model.hidden_size wrong value (32)", damaged(edit(lambda m: sub(m, "model.hidden_size", 32)))),
        ("model.max_position_embeddings is 10", damaged(edit(lambda m: sub(m, "model.max_position_embeddings", 10)))),
        ("decoder.onnx missing", damaged(lambda d: (d / "decoder.onnx").unlink())),
        ("tokenizer/tokenizer.model missing", damaged(lambda d: (d / "tokenizer" / "tokenizer.model").unlink())),
        ("descriptions.yaml missing", damaged(lambda d: (d / "descriptions.yaml").unlink())),
        ("embeddings.npy truncated", damaged(replace("embeddings.npy", lambda b: b[: len(b) // 2], update=False))),
        ("embeddings.npy truncated, verify=False", damaged(replace("embeddings.npy", lambda b: b[:-100], False),
                                                           verify=False)),
        ("vision.onnx modified (same size), checksum not updated",
         damaged(replace("vision.onnx", same_size_flip, update=False))),
        ("decoder.onnx modified, checksum not updated", damaged(replace("decoder.onnx", lambda b: b + b"\0", False))),
        ("files entry of tokenizer.model removed",
         damaged(edit(lambda m: m["files"].pop("tokenizer/tokenizer.model")))),
        ("files.*.sha256 is a number", damaged(edit(lambda m: sub(m, ("files", "vision.onnx"), {
            "bytes": m["files"]["vision.onnx"]["bytes"], "sha256": 12345})))),
        ("backends entry names a file not listed in files", damaged(unlisted)),
        ("backends entry ../../x escaping the directory (listed, checksum right)", damaged(outside("../../x.onnx"))),
        ("backends entry an absolute path outside (listed)", damaged(outside("../outside/v.onnx", absolute=True))),
        ("vision.onnx a symlink to a file outside", damaged(symlinked)),
        ("tokenizer_config.json legacy flipped, checksum updated",
         damaged(replace("tokenizer/tokenizer_config.json", flip_legacy))),
        ("tokenizer_config.json not JSON, checksum updated",
         damaged(replace("tokenizer/tokenizer_config.json", lambda b: b"{legacy: maybe"))),
        ("added_tokens.json ids shifted, checksum updated",
         damaged(replace("tokenizer/added_tokens.json", rewrite_added))),
        ("tokenizer.model garbage, checksum updated",
         damaged(replace("tokenizer/tokenizer.model", lambda b: b"not a sentencepiece model" * 40))),
        ("descriptions.yaml garbage, checksum updated",
         damaged(replace("descriptions.yaml", lambda b: b"keypoints: [unclosed\n  - {: :\n\t bad"))),
        ("descriptions.yaml a YAML list, checksum updated",
         damaged(replace("descriptions.yaml", lambda b: b"- nose\n- neck\n"))),
        ("descriptions.yaml entry without text, checksum updated",
         damaged(replace("descriptions.yaml", lambda b: b"keypoints:\n  nose: {source: paper}\n"))),
        ("descriptions.yaml not UTF-8, checksum updated",
         damaged(replace("descriptions.yaml", lambda b: b"keypoints:\n  nose: {description: \"\xff\xfe\"}\n"))),
        ("vision.onnx truncated, checksum updated", damaged(replace("vision.onnx", lambda b: b[: len(b) // 2]))),
        ("decoder.onnx garbage, checksum updated", damaged(replace("decoder.onnx", lambda b: b"\x08\x07garbage" * 99))),
        ("decoder_shared.onnx truncated, checksum updated",
         damaged(replace("decoder_shared.onnx", lambda b: b[: len(b) // 3]))),
        ("vision.onnx replaced by decoder.onnx, checksum updated",
         damaged(replace("vision.onnx", lambda b: (c.engine / "decoder.onnx").read_bytes()))),
        ("embeddings.npy not numpy, checksum updated", damaged(replace("embeddings.npy", lambda b: b"garbage" * 50))),
        ("embeddings.npy wrong shape, checksum updated",
         damaged(replace("embeddings.npy", npy(np.zeros((10, emb_shape[1]), np.float32))))),
        ("embeddings.npy int32 table, checksum updated",
         damaged(replace("embeddings.npy", npy(np.zeros(emb_shape, np.int32))))),
        ("unknown format_version 2", damaged(edit(lambda m: sub(m, "format_version", 2)))),
        ("format_version '1' (string)", damaged(edit(lambda m: sub(m, "format_version", "1")))),
        ("format_version missing", damaged(edit(lambda m: sub(m, "format_version")))),
        ("format is not locllm-engine", damaged(edit(lambda m: sub(m, "format", "onnx-bundle")))),
        ("protocol_version 'locllm-v0'", damaged(edit(lambda m: sub(m, "protocol_version", "locllm-v0")))),
        ("unknown backend 'coreml' in backends", damaged(edit(lambda m: sub(m, "backends.coreml", {"model": "x"})))),
        ("backends is empty {}", damaged(edit(lambda m: sub(m, "backends", {})))),
        ("engine path is a file", lambda: Pose(c.engine / "manifest.json")),
        ("engine path does not exist", lambda: Pose(c.tmp / "no_such_engine")),
        ("engine path is an empty directory", lambda: Pose(Path(tempfile.mkdtemp(dir=c.tmp)))),
        ("backend='tensorrt' on an ONNX-only engine", lambda: Pose(c.engine, backend="tensorrt")),
        ("backend='gpu' (not a backend name)", lambda: Pose(c.engine, backend="gpu")),
        ("decoding='greedy' (not a decoding)", lambda: Pose(c.engine, decoding="greedy")),
        ("backend='torch', source checkpoint gone",
         damaged(edit(lambda m: sub(m, "model.source_checkpoint", str(c.tmp / "gone"))), backend="torch")),
    ]  # fmt: skip
    valid = [
        ("an extra unlisted file in the engine works", works(extra_file, "the original engine")),
        ("graph_revision 1 (older engine) still runs", works(edit(lambda m: sub(m, "graph_revision", 1)),
                                                             "the original engine")),
        ("engine path given as str with a trailing slash", lambda: same_as(
            Pose(str(c.engine) + "/").locate(c.img, KP, boxes=[BOX]), c.locate(), "the original engine")),
    ]  # fmt: skip
    return [Case("engine", n, ERR, f) for n, f in rows] + [Case("engine", n, RES, f) for n, f in valid]


# --------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_cases(c: Ctx) -> list[Case]:
    if c.checkpoint is None or not (c.checkpoint / "config.json").is_file():
        return []
    root = c.tmp / "checkpoints"
    root.mkdir()
    counter = [0]

    def edit_config(fn: Callable[[dict], object]) -> Callable[[Path], None]:
        def run(d: Path) -> None:
            cfg = json.loads((d / "config.json").read_text())
            fn(cfg)
            (d / "config.json").write_text(json.dumps(cfg, indent=2))

        return run

    def drop(*keys: str) -> Callable[[dict], None]:
        def run(cfg: dict) -> None:
            for dotted in keys:
                *path, last = dotted.split(".")
                d = cfg
                for k in path:
                    d = d[k]
                del d[last]

        return run

    def setf(dotted: str, value: object) -> Callable[[dict], None]:
        def run(cfg: dict) -> None:
            *path, last = dotted.split(".")
            d = cfg
            for k in path:
                d = d[k]
            d[last] = value

        return run

    def write(name: str, data: Callable[[bytes], bytes] | bytes | None) -> Callable[[Path], None]:
        def run(d: Path) -> None:
            p = d / name
            if data is None:
                p.unlink()
            else:
                p.write_bytes(data(p.read_bytes()) if callable(data) else data)

        return run

    def damaged(mutate: Callable[[Path], None], backend: str = "torch") -> Callable[[], object]:
        def run():
            counter[0] += 1
            d = root / f"case{counter[0]}"
            shutil.copytree(c.checkpoint, d)
            try:
                mutate(d)
                return Pose(d, backend=backend).locate(c.img, KP, boxes=[BOX])
            finally:
                shutil.rmtree(d, ignore_errors=True)

        return run

    def torch_matches_engine():
        got = Pose(c.checkpoint, backend="torch").locate(c.img, KP, boxes=[BOX])
        return same_as(got, c.locate(), "its ONNX engine", tol=1e-3)

    rows = [
        ("config.json not JSON", damaged(write("config.json", b"{format: checkpoint"))),
        ("config.json a JSON list", damaged(write("config.json", b"[1, 2]"))),
        ("config.json empty", damaged(write("config.json", b""))),
        ("config.json binary garbage", damaged(write("config.json", b"\xff\xfe\x00\x81"))),
        ("config.json missing", damaged(write("config.json", None))),
        ("missing field num_patches", damaged(edit_config(drop("num_patches")))),
        ("missing field image_size", damaged(edit_config(drop("image_size")))),
        ("missing section llm", damaged(edit_config(drop("llm")))),
        ("missing section vision", damaged(edit_config(drop("vision")))),
        ("missing field llm.hidden_size", damaged(edit_config(drop("llm.hidden_size")))),
        ("image_size a string 'big'", damaged(edit_config(setf("image_size", "big")))),
        ("llm is a list", damaged(edit_config(setf("llm", [64, 2])))),
        ("coord_dims 5", damaged(edit_config(setf("coord_dims", 5)))),
        ("im_patch_token_id wrong (31999)", damaged(edit_config(setf("im_patch_token_id", 31999)))),
        ("image_size wrong value (112) for the weights", damaged(edit_config(setf("image_size", 112)))),
        ("llm.num_hidden_layers 3 (weights have 2)", damaged(edit_config(setf("llm.num_hidden_layers", 3)))),
        ("llm.hidden_size 32 (weights have 64)", damaged(edit_config(setf("llm.hidden_size", 32)))),
        ("format_version 99", damaged(edit_config(setf("format_version", 99)))),
        ("format not locllm-sdk-checkpoint", damaged(edit_config(setf("format", "something-else")))),
        ("protocol_version 'locllm-v0'", damaged(edit_config(setf("protocol_version", "locllm-v0")))),
        ("truncated model.safetensors", damaged(write("model.safetensors", lambda b: b[: len(b) // 2]))),
        ("model.safetensors cut inside the header", damaged(write("model.safetensors", lambda b: b[:20]))),
        ("model.safetensors garbage", damaged(write("model.safetensors", b"not safetensors at all" * 10))),
        ("model.safetensors empty", damaged(write("model.safetensors", b""))),
        ("model.safetensors missing", damaged(write("model.safetensors", None))),
        ("tokenizer.model missing", damaged(write("tokenizer.model", None))),
        ("tokenizer.model garbage", damaged(write("tokenizer.model", b"not a sentencepiece model" * 40))),
        ("added_tokens.json not JSON", damaged(write("added_tokens.json", b"{<im_patch>: 32000"))),
        ("tokenizer_config.json not JSON", damaged(write("tokenizer_config.json", b"{legacy"))),
        ("backend='onnxruntime' on a checkpoint", damaged(lambda d: None, backend="onnxruntime")),
    ]
    return [Case("checkpoint", n, ERR, f) for n, f in rows] + [
        Case("checkpoint", "valid checkpoint on torch = its engine", RES, torch_matches_engine)
    ]


# --------------------------------------------------------------------------------------
# Command line


def cli_cases(c: Ctx) -> list[Case]:
    env = dict(os.environ)
    env.pop("LOCLLM_DEBUG", None)
    env["LOCLLM_CACHE"] = str(c.tmp / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT / "sdk"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    image = c.path("person.png", encode(c.img, ".png"))
    jpg = encode(c.img, ".jpg")
    eng = str(c.engine)
    not_engine = Path(tempfile.mkdtemp(dir=c.tmp))
    bad_engine = c.tmp / "cli_bad_engine"
    bad_engine.mkdir()
    (bad_engine / "manifest.json").write_text("[1, 2, 3]")

    def run(args: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
        cwd = Path(tempfile.mkdtemp(dir=c.tmp, prefix="cli"))
        p = subprocess.run(
            [sys.executable, "-m", "locllm_sdk.cli", *args],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return p, cwd

    def error(args: list[str], written: Path | None = None) -> Callable[[], tuple[bool, str]]:
        def case():
            p, cwd = run(args)
            lines = p.stderr.strip().splitlines()
            left = [str(x.relative_to(cwd)) for x in cwd.rglob("*")]
            problems = []
            if p.returncode != 2:
                problems.append(f"exit {p.returncode}")
            if len(lines) != 1:
                problems.append(f"{len(lines)} stderr lines")
            if not (lines and lines[-1].startswith("locllm: error:")):
                problems.append("no 'locllm: error:' line")
            elif len(lines[-1].split()) < 2 + 3:
                problems.append("the message does not say what is wrong")
            if "Traceback" in p.stderr + p.stdout:
                problems.append("traceback")
            if left or (written is not None and written.exists()):
                problems.append(f"wrote {left or [str(written)]}")
            text = scrub(" | ".join(lines))[:140] if lines else "(no stderr)"
            return not problems, f"exit {p.returncode}: {text}" + (f" [{'; '.join(problems)}]" if problems else "")

        return case

    def success(args: list[str], check: Callable[[subprocess.CompletedProcess, Path], str | None]):
        def case():
            p, cwd = run(args)
            if p.returncode != 0:
                return False, f"exit {p.returncode}: {scrub(' | '.join(p.stderr.strip().splitlines()))[:140]}"
            problem = check(p, cwd)
            return problem is None, problem or f"exit 0: {summary(p.stdout)}"

        return case

    def summary(stdout: str) -> str:
        try:
            doc = json.loads(stdout)
        except ValueError:
            return scrub(stdout)[:100]
        if "persons" in doc:
            kps = [f"{k['name']}=({k['x']:.1f},{k['y']:.1f})" for p in doc["persons"] for k in p["keypoints"]]
            return f"{len(doc['persons'])} person(s) {' '.join(kps)[:80]}"
        return f"JSON with {', '.join(doc)}"[:100]

    def json_like(other: list[str]) -> Callable[[subprocess.CompletedProcess, Path], str | None]:
        def check(p, cwd):
            want, _ = run(other)
            a, b = json.loads(p.stdout), json.loads(want.stdout)
            return None if a == b else f"JSON differs: {str(a)[:60]} vs {str(b)[:60]}"

        return check

    def drew(p, cwd):
        return None if (cwd / "out.png").is_file() and json.loads(p.stdout) else "no overlay or no JSON"

    missing_dir = c.tmp / "no_such_dir" / "out.png"
    loc = ["locate", str(image), "-m", eng]
    gt_bad = c.path("gt.json", b"{not json")
    gt_noann = image.parent / "gt_noann.json"  # beside its image, so the image folder is found
    gt_noann.write_text(json.dumps({k: v for k, v in coco_gt(image.name).items() if k != "annotations"}))
    rows = [
        ("locate a missing image", error(["locate", str(c.tmp / "missing.jpg"), "-m", eng, "-k", "nose"])),
        ("locate a text file as image", error(["locate", str(c.path("t.jpg", b"hello")), "-m", eng, "-k", "nose"])),
        ("locate a truncated JPEG", error(["locate", str(c.path("cut.jpg", jpg[: len(jpg) // 2])), "-m", eng])),
        ("locate a directory as image", error(["locate", str(c.files), "-m", eng])),
        ("--draw into a missing directory", error([*loc, "-k", "nose", "--draw", str(missing_dir)], missing_dir)),
        ("--draw with a bad extension (.xyz)", error([*loc, "-k", "nose", "--draw", "out.xyz"])),
        ("--draw with no extension", error([*loc, "-k", "nose", "--draw", "out"])),
        ("--draw onto an existing directory", error([*loc, "-k", "nose", "--draw", str(c.files)])),
        ("unknown keypoint -k tail", error([*loc, "-k", "tail", "--draw", "out.png"])),
        ("keypoint with </s> in its name", error([*loc, "-k", "nose</s>"])),
        ("duplicate -k nose -k nose", error([*loc, "-k", "nose", "-k", "nose"])),
        ("unknown --skeleton coco18", error([*loc, "--skeleton", "coco18"])),
        ("bad --box 1,2,3 (3 numbers)", error([*loc, "-k", "nose", "--box", "1,2,3"])),
        ("bad --box a,b,c,d (not numbers)", error([*loc, "-k", "nose", "--box", "a,b,c,d"])),
        ("--box 0,0,0,0 (degenerate)", error([*loc, "-k", "nose", "--box", "0,0,0,0"])),
        ("--box nan,0,10,10", error([*loc, "-k", "nose", "--box", "nan,0,10,10"])),
        ("--box outside the image", error([*loc, "-k", "nose", "--box", "1000,1000,50,50"])),
        ("a missing model path -m", error(["locate", str(image), "-m", str(c.tmp / "no_model"), "-k", "nose"])),
        ("-m an empty directory", error(["locate", str(image), "-m", str(not_engine), "-k", "nose"])),
        ("-m a file", error(["locate", str(image), "-m", str(image), "-k", "nose"])),
        ("-m a damaged engine (manifest a list)", error(["locate", str(image), "-m", str(bad_engine), "-k", "nose"])),
        ("info on a non-engine (empty dir)", error(["info", str(not_engine)])),
        ("info on a missing path", error(["info", str(c.tmp / "nothing")])),
        ("info on a damaged engine", error(["info", str(bad_engine)])),
        ("info on an image file", error(["info", str(image)])),
        ("predict with a GT file that is not JSON", error(["predict", str(gt_bad), "-m", eng, "--out", "p.json"])),
        ("predict with a GT file without 'annotations'", error(["predict", str(gt_noann), "-m", eng, "--out",
                                                                "p.json"])),
        ("predict --out into a missing directory", error(["predict", str(gt_bad), "-m", eng, "--out",
                                                          str(missing_dir.with_suffix(".json"))])),
    ]  # fmt: skip
    valid = [
        ("locate -k nose --json --draw out.png works", success([*loc, "-k", "nose", "--json", "--draw", "out.png"],
                                                              drew)),
        ("--box-format xyxy = the xywh box", success(
            [*loc, "-k", "nose", "--json", "--box-format", "xyxy", "--box", "20,10,80,80"],
            json_like([*loc, "-k", "nose", "--json", "--box", "20,10,60,70"]))),
        ("-k left_wrist = -k 'left wrist'", success([*loc, "-k", "left_wrist", "--json"],
                                                   json_like([*loc, "-k", "left wrist", "--json"]))),
        ("info on the engine works", success(["info", eng], lambda p, cwd: None if json.loads(p.stdout) else "empty")),
    ]  # fmt: skip
    return [Case("cli", n, ERR, f, cli=True) for n, f in rows] + [Case("cli", n, RES, f, cli=True) for n, f in valid]


# --------------------------------------------------------------------------------------
# predict_coco (what `locllm predict` runs): a COCO-keypoints file with its boxes


def coco_gt(image_name: str = "person.png", **changes) -> dict:
    doc = {
        "images": [{"id": 1, "file_name": image_name, "width": W, "height": H}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": BOX, "num_keypoints": 17,
                         "keypoints": [0] * 51, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "person", "keypoints": [
            "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
            "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
            "left_ankle", "right_ankle"]}],
    }  # fmt: skip
    doc.update(changes)
    return doc


def predict_cases(c: Ctx) -> list[Case]:
    from locllm_sdk.predict import predict_coco

    folder = c.path("person.png", encode(c.img, ".png")).parent

    def gt(doc: object, raw: bytes | None = None) -> Path:
        p = folder / f"gt{len(list(folder.glob('gt*')))}.json"
        p.write_bytes(raw if raw is not None else json.dumps(doc).encode())
        return p

    def run(path: Path, **kw):
        return predict_coco(c.pose, path, image_dir=kw.pop("image_dir", folder), progress=False, **kw)

    def works():
        preds = run(gt(coco_gt()))
        want = c.locate(keypoints="coco17")
        got = [v for k in want.persons[0] for v in (k.x, k.y, k.score)]
        ok = len(preds) == 1 and preds[0]["ann_id"] == 7 and np.allclose(preds[0]["keypoints"], got, atol=2e-3)
        return ok, f"{len(preds)} prediction(s), " + ("= locate with coco17" if ok else f"{str(preds)[:80]}")

    bad_ann = dict(coco_gt()["annotations"][0])
    rows = [
        ("GT file missing", ERR, lambda: run(folder / "no_such_gt.json")),
        ("GT file not JSON", ERR, lambda: run(gt(None, b"{not json"))),
        ("GT JSON is a list", ERR, lambda: run(gt([1, 2]))),
        ("GT without 'annotations'", ERR, lambda: run(gt({k: v for k, v in coco_gt().items() if k != "annotations"}))),
        ("GT without 'categories'", ERR, lambda: run(gt({k: v for k, v in coco_gt().items() if k != "categories"}))),
        ("GT annotation without 'bbox'", ERR, lambda: run(gt(coco_gt(annotations=[
            {k: v for k, v in bad_ann.items() if k != "bbox"}])))),
        ("GT annotation bbox of 3 numbers", ERR, lambda: run(gt(coco_gt(annotations=[{**bad_ann,
                                                                                      "bbox": [1, 2, 3]}])))),
        ("GT image file missing", ERR, lambda: run(gt(coco_gt("missing.png")))),
        ("GT image folder not found (no image_dir)", ERR, lambda: run(gt(coco_gt("missing.png")), image_dir=None)),
        ("predict_coco on a 1-image COCO file works", RES, works),
    ]  # fmt: skip
    return [Case("predict", n, e, f) for n, e, f in rows]


# --------------------------------------------------------------------------------------


def build_test_model(tmp: Path) -> tuple[Path, Path]:
    from locllm_export.build import build_onnx_engine
    from locllm_training.init import init_checkpoint

    t = time.perf_counter()
    ckpt = init_checkpoint("tiny", tmp / "ckpt", seed=0, image_size=56, teach_format_steps=0)
    with contextlib.redirect_stdout(sys.stderr):
        build_onnx_engine(ckpt, tmp / "engine")
    print(f"built the tiny test model in {time.perf_counter() - t:.0f} s: {tmp / 'engine'}", file=sys.stderr)
    return tmp / "engine", Path(ckpt)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", type=Path, help="engine directory (default: build a tiny test model)")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint for the checkpoint cases (default: the engine's)")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--only", help="run only these classes (comma-separated: boxes,images,keypoints,engine,...)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="locllm-bad-inputs-") as tmp_name:
        tmp = Path(tmp_name)
        engine, checkpoint = args.engine, args.checkpoint
        if engine is None:
            engine, built = build_test_model(tmp / "model")
            checkpoint = checkpoint or built
        elif checkpoint is None:
            source = json.loads((engine / "manifest.json").read_text())["model"].get("source_checkpoint")
            checkpoint = Path(source) if source else None
        SCRUB[str(tmp)] = "$TMP"
        ctx = Ctx(engine.resolve(), checkpoint.resolve() if checkpoint else None, tmp)
        makers = {"boxes": box_cases, "images": image_cases, "keypoints": keypoint_cases, "engine": engine_cases,
                  "checkpoint": checkpoint_cases, "predict": predict_cases, "cli": cli_cases}  # fmt: skip
        wanted = args.only.split(",") if args.only else list(makers)
        rows = []
        print(f"{'class':<11}{'case':<62}{'expected':<16}{'got':<{GOT_WIDTH}} verdict")
        for cls in wanted:
            for case in makers[cls](ctx):
                got, ok = judge(case)
                row = {"class": case.cls, "case": case.name, "expected": case.expected, "got": got,
                       "verdict": "PASS" if ok else "FAIL", "seconds": round(case.seconds, 3)}  # fmt: skip
                rows.append(row)
                shown = got if len(got) <= GOT_WIDTH else got[: GOT_WIDTH - 3] + "..."
                cells = f"{row['class']:<11}{row['case'][:61]:<62}{row['expected']:<16}"
                print(f"{cells}{shown:<{GOT_WIDTH}} {row['verdict']}")
                sys.stdout.flush()

    print()
    classes = list(dict.fromkeys(r["class"] for r in rows))
    for cls in classes:
        mine = [r for r in rows if r["class"] == cls]
        n_pass = sum(r["verdict"] == "PASS" for r in mine)
        print(f"{cls:<11}{len(mine):>4} cases, {n_pass:>4} pass, {len(mine) - n_pass:>3} fail")
    print(f"{len(rows)} cases, {sum(r['verdict'] == 'PASS' for r in rows)} pass")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"rows written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
