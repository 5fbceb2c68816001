"""Validation of what callers pass, at the API boundary (Python API, CLI, servers).

Everything a user brings is checked here before any model work, and every problem is an
error of the SDK's own type that names the input and says what is wrong: boxes
(``validate_boxes``), keypoint requests (``DescriptionLibrary.resolve``, with
``canonical_name``), prompt text (``protocol.check_user_text``) and images
(``crop.load_image``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import numpy as np

from .errors import BoxError

BOX_FORMATS = ("xywh", "xyxy", "cxcywh")
MIN_BOX_SIDE = 2.0  # pixels: a smaller box puts every keypoint on one point of the image

_DETECTOR_HINT = (
    "boxes take 4 numbers each ({layout}); rows of 5 or 6 numbers look like detector output "
    "[x1, y1, x2, y2, score(, class)]: filter them by score (and class) yourself and pass "
    "boxes=rows[:, :4] with box_format='xyxy'"
)


def _number(v: object) -> float | None:
    if isinstance(v, (bool, np.bool_, complex, np.complexfloating)) or not isinstance(v, (Real, np.number)):
        return None
    return float(v)


def _rows(boxes: object) -> list[list[float]]:
    """Boxes as rows of numbers (no reshaping: a row's length is what the caller gave)."""
    if isinstance(boxes, np.ndarray):
        if not (np.issubdtype(boxes.dtype, np.integer) or np.issubdtype(boxes.dtype, np.floating)):
            raise BoxError(f"boxes must be numbers, got an array of dtype {boxes.dtype}")
        if boxes.ndim == 1:
            boxes = boxes[None] if boxes.size else boxes.reshape(0, 4)
        if boxes.ndim != 2:
            raise BoxError(f"boxes must be a list of boxes or an (N, 4) array, got an array of shape {boxes.shape}")
        return [[float(v) for v in row] for row in boxes]
    if isinstance(boxes, (str, bytes, Mapping)) or not isinstance(boxes, Sequence):
        raise BoxError(f"boxes must be a list of [x, y, w, h] boxes or an (N, 4) array, got {type(boxes).__name__}")
    if boxes and all(_number(v) is not None for v in boxes):
        return [[float(v) for v in boxes]]  # one flat box
    rows = []
    for i, row in enumerate(boxes):
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if isinstance(row, (str, bytes, Mapping)) or not isinstance(row, Sequence):
            raise BoxError(f"box {i} must be a sequence of numbers, got {type(row).__name__}: {row!r}")
        values = [_number(v) for v in row]
        if any(v is None for v in values):
            raise BoxError(f"box {i} holds something that is not a number: {list(row)!r}")
        rows.append(values)
    return rows


def to_xywh(row: Sequence[float], box_format: str) -> list[float]:
    a, b, c, d = row
    if box_format == "xyxy":
        return [a, b, c - a, d - b]
    if box_format == "cxcywh":
        return [a - c / 2, b - d / 2, c, d]
    return [a, b, c, d]


def validate_boxes(boxes: object, image_hw: tuple[int, int], box_format: str = "xywh") -> list[list[float]]:
    """Person boxes -> ``[x, y, w, h]`` lists in image pixels, checked.

    ``boxes``: None (the whole image), one box of 4 numbers, a list of boxes, or an (N, 4)
    array, in ``box_format``: ``"xywh"`` (COCO, the default), ``"xyxy"`` (corners) or
    ``"cxcywh"`` (center and size); an empty list is no person (an empty result). Refused with
    a BoxError naming the box: rows that are not 4 numbers (detector rows of 5 or 6 numbers get a hint), non-finite
    values, boxes under 2 pixels wide or high, boxes entirely outside the image."""
    if box_format not in BOX_FORMATS:
        raise BoxError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    h, w = image_hw
    if boxes is None:
        return [[0.0, 0.0, float(w), float(h)]]
    rows = _rows(boxes)
    out = []
    layout = {"xywh": "x, y, w, h", "xyxy": "x1, y1, x2, y2", "cxcywh": "cx, cy, w, h"}[box_format]
    for i, row in enumerate(rows):
        if len(row) != 4:
            hint = _DETECTOR_HINT.format(layout=layout) if len(row) in (5, 6) else f"boxes take 4 numbers ({layout})"
            raise BoxError(f"box {i} has {len(row)} numbers {row}: {hint}")
        if not all(math.isfinite(v) for v in row):
            raise BoxError(f"box {i} has non-finite values: {row}")
        x, y, bw, bh = to_xywh(row, box_format)
        if bw < MIN_BOX_SIDE or bh < MIN_BOX_SIDE:
            raise BoxError(
                f"box {i} {row} ({box_format}) is degenerate: {bw:g} x {bh:g} pixels, under {MIN_BOX_SIDE:g} "
                "pixels wide or high"
            )
        if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
            raise BoxError(f"box {i} {row} ({box_format}) lies outside the {w}x{h} image")
        out.append([x, y, bw, bh])
    return out


def usable_detections(
    boxes: list[list[float]], scores: list, image_hw: tuple[int, int]
) -> tuple[list[list[float]], list]:
    """A detector's ``[x, y, w, h]`` boxes clipped to the image, dropping those left under
    ``MIN_BOX_SIDE`` pixels (a detector's sliver or a box outside the frame is no person to crop:
    refusing it, as a caller's box is refused, would stop a video mid-stream)."""
    h, w = image_hw
    kept, kept_scores = [], []
    for (x, y, bw, bh), score in zip(boxes, scores, strict=True):
        x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h)
        x2, y2 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
        if x2 - x1 >= MIN_BOX_SIDE and y2 - y1 >= MIN_BOX_SIDE:
            kept.append([x1, y1, x2 - x1, y2 - y1])
            kept_scores.append(score)
    return kept, kept_scores
