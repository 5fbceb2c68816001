"""Person boxes from a detector's output, top-down as users run it.

``Pose.locate(image, keypoints, detector=fn)`` calls ``fn(image)`` (an RGB uint8 array) and
turns what it returns into boxes with ``boxes_from_detections``: an ``(N, 4 | 5 | 6)`` array in
``xyxy`` with, optionally, a score and a class column, as most detectors write them. The
score threshold and the class filter are explicit arguments, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import BoxError
from .inputs import BOX_FORMATS, to_xywh


def boxes_from_detections(
    detections: object,
    score_threshold: float = 0.0,
    classes: Sequence[int] | None = None,
    box_format: str = "xyxy",
) -> list[list[float]]:
    """Rows ``[x1, y1, x2, y2(, score(, class))]`` -> ``[x, y, w, h]`` boxes, keeping rows whose
    score is >= ``score_threshold`` (rows without a score always pass) and, with ``classes``,
    whose class is one of them (rows without a class are then refused: the filter cannot be
    applied). An empty detection gives no boxes."""
    if box_format not in BOX_FORMATS:
        raise BoxError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    try:
        arr = np.asarray(detections, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BoxError(f"detections must be an (N, 4|5|6) array of numbers: {e}") from e
    if arr.size == 0:
        return []
    if arr.ndim != 2 or arr.shape[1] not in (4, 5, 6):
        raise BoxError(f"detections must be an (N, 4|5|6) array [box(, score(, class))], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise BoxError("detections hold non-finite values")
    keep = np.ones(len(arr), bool)
    if arr.shape[1] >= 5:
        keep &= arr[:, 4] >= score_threshold
    if classes is not None:
        if arr.shape[1] < 6:
            raise BoxError(f"a class filter needs a class column (N, 6); the detections have {arr.shape[1]} columns")
        keep &= np.isin(arr[:, 5].astype(np.int64), np.asarray(list(classes), np.int64))
    return [to_xywh(row[:4].tolist(), box_format) for row in arr[keep]]


def detect(detector: Callable, image: np.ndarray, score_threshold: float, classes: Sequence[int] | None):
    """Boxes of ``detector(image)`` (see ``boxes_from_detections``)."""
    if not callable(detector):
        raise BoxError(f"detector must be a callable image -> (N, 4|5|6) array, got {type(detector).__name__}")
    return boxes_from_detections(detector(image), score_threshold, classes)
