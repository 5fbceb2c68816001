"""Person boxes from a detector's output, top-down as users run it.

``Pose.locate(image, keypoints, detector=fn)`` calls ``fn`` on the image and turns what it
returns into boxes with ``boxes_from_detections``. What a detector may return:

- an ``(N, 4 | 5 | 6)`` array in ``xyxy`` with, optionally, a score and a class column, as most
  detectors write them (numpy, or a torch tensor on any device);
- an ultralytics ``Results``, the one-image list of them that ``model(image)`` returns, or its ``Boxes``
  (``xyxy``, ``conf``, ``cls``);
- a supervision ``Detections`` (``xyxy``; ``confidence`` and ``class_id`` may be None);
- what an rtmlib detector (``YOLOX``, ``RTMDet``, ``RFDETR``) returns: ``(N, 4)`` boxes, or with
  ``det_mode="multiclass"`` the tuple ``(boxes, class ids)``. rtmlib has already applied its own
  ``score_thr`` and returns no scores.

Library objects are recognised by the module of their type, never by importing the library, so
the runtime loads none of them unless the caller already did. The score threshold and the class
filter are explicit arguments, never guessed.

Channel order: ``detect`` hands a callable of the caller's the image in RGB. An ultralytics model
or an rtmlib tool given itself as the detector gets BGR, as those libraries read arrays (like
``cv2.imread``); ``ultralytics_detector(model, ...)`` wraps a model as an RGB callable with its
predict options (``conf``, ``classes``, ``imgsz``, ...). A lambda around such a model gets RGB:
convert it there, or use the wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .errors import ArgumentError, BoxError
from .inputs import BOX_FORMATS, to_xywh

BGR_LIBRARIES = ("ultralytics", "rtmlib")  # their models read a numpy image as BGR


def library_of(obj: object) -> str:
    """The top-level package that defines ``obj``'s type (``"ultralytics"``, ``"supervision"``, ...;
    ``"builtins"`` for plain Python values), read without importing anything."""
    return (type(obj).__module__ or "").partition(".")[0]


def to_bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def _numbers(values: object, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().cpu().numpy()
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BoxError(f"{what} must be numbers: {e}") from e


class DetectionColumns(NamedTuple):
    boxes: np.ndarray  # (N, 4) in box_format
    scores: np.ndarray | None  # (N,)
    classes: np.ndarray | None  # (N,)
    box_format: str


def _columns(source: str, xyxy: object, scores: object, classes: object) -> DetectionColumns:
    """Checked ``(N, 4)`` xyxy boxes and ``(N,)`` scores / classes (each may be None) of a library's detections."""
    if xyxy is None:
        raise BoxError(f"{source} holds no boxes (xyxy is None)")
    boxes = _numbers(xyxy, f"{source} boxes")
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BoxError(f"{source} boxes must be (N, 4) xyxy, got shape {boxes.shape}")
    out = [boxes]
    for name, values in (("scores", scores), ("class ids", classes)):
        if values is not None:
            values = _numbers(values, f"{source} {name}").reshape(-1) if np.size(values) else np.zeros(0)
            if len(values) != len(boxes):
                raise BoxError(f"{source} has {len(values)} {name} for {len(boxes)} boxes")
        out.append(values)
    return DetectionColumns(*out, "xyxy")


def _rows_columns(detections: object, box_format: str) -> DetectionColumns:
    """``(N, 4 | 5 | 6)`` rows ``[box(, score(, class))]`` -> boxes, scores, classes."""
    arr = _numbers(detections, "detections (an (N, 4|5|6) array)")
    if arr.size == 0:
        return DetectionColumns(np.zeros((0, 4)), None, None, box_format)
    if arr.ndim != 2 or arr.shape[1] not in (4, 5, 6):
        raise BoxError(f"detections must be an (N, 4|5|6) array [box(, score(, class))], got shape {arr.shape}")
    scores, classes = (arr[:, 4] if arr.shape[1] >= 5 else None), (arr[:, 5] if arr.shape[1] == 6 else None)
    return DetectionColumns(arr[:, :4], scores, classes, box_format)


def _ultralytics_columns(detections: Any):
    name = f"an ultralytics {type(detections).__name__}"
    boxes = detections.boxes if hasattr(detections, "boxes") else detections  # Results, or its Boxes
    if boxes is None:
        raise BoxError(f"{name} without boxes (a classification or an OBB model's): no person boxes to take")
    if not all(hasattr(boxes, a) for a in ("xyxy", "conf", "cls")):
        raise BoxError(f"{name} is not detections: it has no boxes with xyxy, conf and cls")
    return _columns(name, boxes.xyxy, boxes.conf, boxes.cls)


def detection_columns(detections: object, detector: object = None, box_format: str = "xyxy") -> DetectionColumns:
    """What a detector returned -> boxes ``(N, 4)``, scores and classes ``(N,)`` (or None), and the
    boxes' format (``box_format`` for plain rows; library objects give ``xyxy``). ``detector``: the
    callable that produced them, when known (an rtmlib tool's ``(boxes, class ids)`` tuple is read
    as such only then: a plain tuple of two rows is two boxes)."""
    if isinstance(detections, (list, tuple)) and detections and library_of(detections[0]) == "ultralytics":
        if len(detections) != 1:
            raise BoxError(
                f"detections are one image's: got a list of {len(detections)} ultralytics results (one per image)"
            )
        detections = detections[0]
    library = library_of(detections)
    if library == "ultralytics":
        return _ultralytics_columns(detections)
    if library == "supervision":
        source = f"a supervision {type(detections).__name__}"
        if not hasattr(detections, "xyxy"):
            raise BoxError(f"{source} is not detections (no xyxy)")
        return _columns(
            source, detections.xyxy, getattr(detections, "confidence", None), getattr(detections, "class_id", None)
        )
    if library_of(detector) == "rtmlib" and isinstance(detections, tuple):
        if len(detections) != 2:
            raise BoxError(
                f"an rtmlib {type(detector).__name__} returned {len(detections)} values, not (boxes, class ids)"
            )
        return _columns(f"rtmlib {type(detector).__name__}'s output", detections[0], None, detections[1])
    return _rows_columns(detections, box_format)


def boxes_from_detections(
    detections: object,
    score_threshold: float = 0.0,
    classes: Sequence[int] | None = None,
    box_format: str = "xyxy",
    detector: object = None,
) -> list[list[float]]:
    """A detector's output (see the module's docstring: rows ``[x1, y1, x2, y2(, score(, class))]``,
    an ultralytics ``Results``, a supervision ``Detections``, an rtmlib detector's output) ->
    ``[x, y, w, h]`` boxes, keeping those whose score is >= ``score_threshold`` (detections without
    scores always pass) and, with ``classes``, whose class is one of them (detections without
    classes are then refused: the filter cannot be applied). ``box_format`` is that of plain rows;
    library objects are ``xyxy``. ``detector``: the callable that produced them (see
    ``detection_columns``). An empty detection gives no boxes."""
    return scored_boxes_from_detections(detections, score_threshold, classes, box_format, detector)[0]


def scored_boxes_from_detections(
    detections: object,
    score_threshold: float = 0.0,
    classes: Sequence[int] | None = None,
    box_format: str = "xyxy",
    detector: object = None,
) -> tuple[list[list[float]], list[float | None]]:
    """``boxes_from_detections`` with the kept detections' scores beside the boxes (None for
    detections without scores)."""
    if box_format not in BOX_FORMATS:
        raise BoxError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    boxes, scores, labels, box_format = detection_columns(detections, detector, box_format)
    if not all(v is None or np.isfinite(v).all() for v in (boxes, scores, labels)):
        raise BoxError("detections hold non-finite values")
    keep = np.ones(len(boxes), bool)
    if scores is not None:
        keep &= scores >= score_threshold
    if classes is not None:
        if labels is None:
            raise BoxError("a class filter needs a class column (N, 6) or class ids; the detections have none")
        keep &= np.isin(labels.astype(np.int64), np.asarray(list(classes), np.int64))
    kept = [to_xywh(row.tolist(), box_format) for row in boxes[keep]]
    return kept, ([None] * len(kept) if scores is None else [float(v) for v in scores[keep]])


def detect(
    detector: Callable, image: np.ndarray, score_threshold: float, classes: Sequence[int] | None
) -> list[list[float]]:
    """Boxes of ``detector(image)`` (see ``boxes_from_detections``). ``image`` is RGB; an
    ultralytics model or an rtmlib tool given as ``detector`` gets it in BGR, as they read arrays."""
    return detect_scored(detector, image, score_threshold, classes)[0]


def detect_scored(
    detector: Callable, image: np.ndarray, score_threshold: float, classes: Sequence[int] | None
) -> tuple[list[list[float]], list[float | None]]:
    """``detect`` with each kept box's detector score (None where the detector gives none)."""
    if not callable(detector):
        raise BoxError(
            f"detector must be a callable image -> detections (e.g. an (N, 4|5|6) array), got {type(detector).__name__}"
        )
    frame = to_bgr(image) if library_of(detector) in BGR_LIBRARIES else image
    return scored_boxes_from_detections(detector(frame), score_threshold, classes, detector=detector)


def ultralytics_detector(model: Any, **predict_kwargs: Any) -> Callable[[np.ndarray], list]:
    """An RGB image -> ultralytics ``Results`` callable around an ultralytics model (``YOLO(...)``,
    ``RTDETR(...)``) for ``detector=``: the image goes to ``model.predict`` in BGR, as ultralytics
    reads numpy arrays, with ``predict_kwargs`` (``conf=``, ``classes=[0]``, ``imgsz=``, ``device=``;
    ``verbose=False`` unless given)."""
    if library_of(model) != "ultralytics" or not callable(getattr(model, "predict", None)):
        raise ArgumentError(f"ultralytics_detector needs an ultralytics model (YOLO(...)), got {type(model).__name__}")
    kwargs = {"verbose": False, **predict_kwargs}

    def detector(rgb: np.ndarray) -> list:
        return model.predict(to_bgr(rgb), **kwargs)

    return detector
