"""The bundled person detector: a small CenterNet-style network trained on SynthPose renders,
run on ONNX Runtime (no torch).

``PersonDetector()(rgb)`` -> ``(N, 5)`` float32 rows ``[x1, y1, x2, y2, score]`` in image pixels,
best first. ``Pose.locate(image, keypoints, detector="person")`` uses it. The network answers,
per cell of a stride-``s`` grid, a centre score (already 3x3-peak-suppressed in the graph), the
centre's sub-cell offset and the box's log width and height in cells; ``decode`` turns that into
boxes and is the one decoding that training's validation calls too.

Like the bundled demo model it knows rendered people (SynthPose), not photos: see
``models/README.md`` ("person_detector") for its data, training command and metrics.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .crop import load_image
from .errors import ArgumentError, EngineError, read_json
from .manifest import sha256_file

CARD = "detector.json"
GRAPH = "model.onnx"
# graph I/O names (the exporter and this runtime share them)
DETECTOR_INPUT = "images"
DETECTOR_OUTPUTS = ("peaks", "offsets", "log_sizes")
DEFAULT_SCORE_THRESHOLD = 0.3


@dataclass(frozen=True)
class DetectorCard:
    """What ``detector.json`` records: the graph's input size and normalisation, the output
    stride, the graph's sha256, and how it was trained and scored."""

    input_size: int
    stride: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sha256: str
    info: dict

    @classmethod
    def read(cls, folder: str | Path) -> DetectorCard:
        path = Path(folder) / CARD
        doc = read_json(path, EngineError, "the detector card")
        try:
            return cls(
                int(doc["input_size"]),
                int(doc["stride"]),
                tuple(float(v) for v in doc["mean"]),
                tuple(float(v) for v in doc["std"]),
                str(doc["sha256"]),
                {k: v for k, v in doc.items() if k not in ("input_size", "stride", "mean", "std", "sha256")},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path}: malformed detector card ({type(e).__name__}: {e})") from e

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "stride": self.stride,
            "mean": list(self.mean),
            "std": list(self.std),
            "sha256": self.sha256,
            **self.info,
        }

    def write(self, folder: str | Path) -> None:
        path = Path(folder) / CARD
        tmp = path.with_name(CARD + ".partial")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the square network input: scaled by ``scale`` (long side
    to ``size``), placed at the top-left, the rest padded with zeros (after normalisation)."""

    scale: float
    size: int

    def to_image(self, boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
        """Network-input pixels -> image pixels, clipped to the image."""
        out = boxes.copy()
        out[:, :4] /= self.scale
        h, w = image_hw
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
        return out


def letterbox(image: np.ndarray, size: int, mean, std) -> tuple[np.ndarray, Letterbox]:
    """RGB uint8 HxWx3 -> [1, 3, size, size] float32 network input (resized with the long side
    to ``size``, area interpolation when shrinking) and the ``Letterbox`` to map boxes back."""
    import cv2

    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    x = np.zeros((size, size, 3), np.float32)
    x[:nh, :nw] = (image.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), Letterbox(scale, size)


def decode(
    peaks: np.ndarray,
    offsets: np.ndarray,
    log_sizes: np.ndarray,
    stride: int,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    max_detections: int = 100,
) -> np.ndarray:
    """One image's network outputs ([1|G, Gy, Gx] peak scores, [2, Gy, Gx] offsets and log
    sizes, batch axis optional) -> ``(N, 5)`` rows ``[x1, y1, x2, y2, score]`` in network-input
    pixels, best first. A peak is a cell whose score is the maximum of its 3x3 neighbourhood
    (suppressed in the graph, so the rest are 0); no further NMS: two people whose centres fall
    in different cells stay two detections however much their boxes overlap."""
    peaks, offsets, log_sizes = (
        np.asarray(a, np.float32).reshape(-1, *a.shape[-2:]) for a in (peaks, offsets, log_sizes)
    )
    scores = peaks[0]
    ys, xs = np.nonzero(scores >= score_threshold)
    order = np.argsort(-scores[ys, xs], kind="stable")[:max_detections]
    ys, xs = ys[order], xs[order]
    cx = (xs + offsets[0, ys, xs]) * stride
    cy = (ys + offsets[1, ys, xs]) * stride
    w = np.exp(log_sizes[0, ys, xs]) * stride
    h = np.exp(log_sizes[1, ys, xs]) * stride
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, scores[ys, xs]], axis=1).astype(np.float32)


def bundled_detector_dir() -> Path:
    """The detector shipped with the package (``locllm_sdk._models/person_detector``)."""
    from .demo import bundled_model_dir

    return bundled_model_dir("person_detector", GRAPH)


class PersonDetector:
    """Person boxes for ``Pose.locate(..., detector=...)``: RGB image -> ``(N, 5)`` xyxy + score.

    >>> det = PersonDetector()            # the bundled SynthPose detector
    >>> det(rgb)                          # array([[x1, y1, x2, y2, score], ...], dtype=float32)
    """

    def __init__(
        self,
        path: str | Path | None = None,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        max_detections: int = 100,
        threads: int | None = None,
        verify: bool = True,
    ):
        if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float)):
            raise ArgumentError(f"score_threshold must be a number in [0, 1], got {score_threshold!r}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ArgumentError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
            raise ArgumentError(f"max_detections must be a positive integer, got {max_detections!r}")
        self.path = Path(path) if path is not None else bundled_detector_dir()
        self.card = DetectorCard.read(self.path)
        graph = self.path / GRAPH
        if not graph.is_file():
            raise EngineError(f"{self.path}: the detector graph {GRAPH} is missing")
        if verify and sha256_file(graph) != self.card.sha256:
            raise EngineError(f"{graph}: sha256 differs from {CARD}'s (modified or corrupt file)")
        self.score_threshold, self.max_detections = float(score_threshold), max_detections
        try:
            import onnxruntime as ort
        except ImportError as e:
            from .errors import BackendUnavailable

            raise BackendUnavailable(
                "the person detector runs on ONNX Runtime: pip install 'locllm-sdk[cpu]' (or [gpu])"
            ) from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])

    def __call__(self, image) -> np.ndarray:
        img = image if isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype == np.uint8 else None
        if img is None or img.shape[2] != 3:
            img = load_image(image)
        x, box = letterbox(img, self.card.input_size, self.card.mean, self.card.std)
        peaks, offsets, log_sizes = self.session.run(list(DETECTOR_OUTPUTS), {DETECTOR_INPUT: x})
        dets = decode(peaks[0], offsets[0], log_sizes[0], self.card.stride, self.score_threshold, self.max_detections)
        return box.to_image(dets, img.shape[:2])

    def __repr__(self) -> str:
        return f"PersonDetector({str(self.path)!r}, score_threshold={self.score_threshold})"
