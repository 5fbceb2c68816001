"""Results of ``Pose.locate``: per person, per keypoint x, y [, z], score."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import supervision


@dataclass(frozen=True)
class Keypoint:
    name: str
    x: float  # image pixels
    y: float
    score: float
    z: float | None = None  # root-relative depth in mm (3D models)
    answer: str = ""  # the model's answer text, e.g. "[0.412,0.905]"
    flip_answer: str = ""  # with flip test-time augmentation: the answer on the mirrored crop
    # P(correct) estimated from the score by the engine's calibration (None: the engine has none)
    confidence: float | None = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "x": self.x, "y": self.y, "score": self.score, "answer": self.answer}
        if self.confidence is not None:
            d["confidence"] = self.confidence
        if self.z is not None:
            d["z"] = self.z
        if self.flip_answer:
            d["flip_answer"] = self.flip_answer
        return d


@dataclass(frozen=True)
class Person:
    box: tuple[float, float, float, float]  # [x, y, w, h] as given
    keypoints: tuple[Keypoint, ...]
    track_id: int | None = None  # the person's track across video frames (Pose.stream(track=True))
    box_score: float | None = None  # the detector's score for the box (None: a box given by the caller)

    @property
    def score(self) -> float:
        """Mean keypoint score (the official person score)."""
        return float(np.mean([k.score for k in self.keypoints]))

    def __iter__(self) -> Iterator[Keypoint]:
        return iter(self.keypoints)

    def __len__(self) -> int:
        return len(self.keypoints)

    def __getitem__(self, name: str | int) -> Keypoint:
        if isinstance(name, int):
            return self.keypoints[name]
        for k in self.keypoints:
            if k.name == name:
                return k
        for k in self.keypoints:  # COCO's spelling (left_wrist) of a library name (left wrist)
            if k.name.replace("_", " ") == name.replace("_", " "):
                return k
        raise KeyError(f"no keypoint {name!r} in this result (have: {[k.name for k in self.keypoints]})")

    def numpy(self) -> np.ndarray:
        """[K, 3] (x, y, score) or [K, 4] (x, y, z, score)."""
        if self.keypoints and self.keypoints[0].z is not None:
            return np.array([[k.x, k.y, k.z, k.score] for k in self.keypoints], dtype=np.float64)
        return np.array([[k.x, k.y, k.score] for k in self.keypoints], dtype=np.float64)

    def to_dict(self) -> dict:
        d = {"box": list(self.box), "score": self.score, "keypoints": [k.to_dict() for k in self.keypoints]}
        if self.track_id is not None:
            d["track_id"] = self.track_id
        if self.box_score is not None:
            d["box_score"] = self.box_score
        return d

    @property
    def coco_score(self) -> float:
        """The score a COCO result ranks this person by: the official person score, times the
        detector's box score when the box was detected (as top-down pose tools rank them)."""
        return self.score if self.box_score is None else self.score * self.box_score


@dataclass
class Results:
    """All persons of one image. Iterate, index, ``numpy()`` or ``to_dict()``/``to_json()``."""

    persons: list[Person]
    keypoint_names: list[str]
    image_size: tuple[int, int]  # (height, width)
    info: dict = field(default_factory=dict)
    orig_img: np.ndarray | None = field(default=None, repr=False, compare=False)  # the RGB image, for plot()

    def __len__(self) -> int:
        return len(self.persons)

    def __iter__(self) -> Iterator[Person]:
        return iter(self.persons)

    def __getitem__(self, i: int) -> Person:
        return self.persons[i]

    def numpy(self) -> np.ndarray:
        """[persons, K, 3 or 4] ([0, K, 3] without persons)."""
        if not self.persons:
            return np.zeros((0, len(self.keypoint_names), 3))
        return np.stack([p.numpy() for p in self.persons])

    @property
    def xy(self) -> np.ndarray:
        """[persons, K, 2] image pixels (as ultralytics' ``Keypoints.xy``)."""
        pts = [[(k.x, k.y) for k in p] for p in self.persons]
        return np.asarray(pts, np.float64).reshape(len(self.persons), len(self.keypoint_names), 2)

    @property
    def conf(self) -> np.ndarray:
        """[persons, K] keypoint scores (the official score; as ultralytics' ``Keypoints.conf``)."""
        scores = [[k.score for k in p] for p in self.persons]
        return np.asarray(scores, np.float64).reshape(len(self.persons), len(self.keypoint_names))

    @property
    def confidence(self) -> np.ndarray | None:
        """[persons, K] calibrated confidences (see ``Keypoint.confidence``), or None when the
        engine has no calibration."""
        if any(k.confidence is None for p in self.persons for k in p):
            return None
        values = [[k.confidence for k in p] for p in self.persons]
        return np.asarray(values, np.float64).reshape(len(self.persons), len(self.keypoint_names))

    def plot(self, labels: bool = True, kpt_thr: float | None = None, image=None) -> np.ndarray:
        """The annotated RGB image (boxes, keypoints, COCO limbs; see ``draw.draw_results``), on
        ``image`` or the image the result was computed on."""
        from .draw import draw_results

        image = self.orig_img if image is None else image
        if image is None:
            from .errors import ImageError

            raise ImageError("this result holds no image (made without Pose.locate): pass plot(image=...)")
        return draw_results(image, self, labels=labels, kpt_thr=kpt_thr)

    def to_supervision(self, class_id: int = 0) -> supervision.KeyPoints:
        """The persons as a ``supervision.KeyPoints`` for supervision's annotators: ``xy`` [N, K, 2]
        and the keypoint confidences [N, K] as float32, ``class_id`` [N] (0: COCO's person), the
        person score as ``detection_confidence`` and the keypoint names as
        ``data["keypoint_names"]`` [N, K]. Needs supervision installed (imported here only).
        supervision's annotators draw with OpenCV, on BGR images: annotate ``orig_img[..., ::-1]``."""
        import inspect

        from .errors import BackendUnavailable

        try:
            import supervision as sv
        except ImportError as e:
            raise BackendUnavailable(f"to_supervision needs supervision (pip install supervision): {e}") from e
        if "keypoint_confidence" not in inspect.signature(sv.KeyPoints).parameters:  # named so since 0.29
            raise BackendUnavailable(f"to_supervision needs supervision >= 0.29, found {sv.__version__}")
        n = len(self.persons)
        names = np.tile(np.asarray(self.keypoint_names, dtype=str), (n, 1))  # per person, as sv.KeyPoints.data is
        return sv.KeyPoints(
            xy=self.xy.astype(np.float32),
            class_id=np.full(n, class_id, dtype=int),
            keypoint_confidence=self.conf.astype(np.float32),
            detection_confidence=np.array([p.score for p in self.persons], np.float32).reshape(n),
            data={"keypoint_names": names},
        )

    def to_dict(self) -> dict:
        return {
            "image_size": list(self.image_size),
            "keypoint_names": list(self.keypoint_names),
            "persons": [p.to_dict() for p in self.persons],
            "info": self.info,
        }

    def to_coco(self, image_id: int, category_id: int = 1) -> list[dict]:
        """COCO keypoint results (one per person: ``keypoints`` [x, y, score]*K, ``score`` the
        person's ``coco_score``, the box as given, and when known the detector's ``box_score``,
        the mean ``keypoint_score`` and ``track_id``), as ``pycocotools`` ``loadRes`` and
        ``benchmarks/accuracy.py`` read them."""
        out = []
        for p in self.persons:
            r = {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [float(v) for v in p.box],
                "score": p.coco_score,
                "keypoints": [round(float(v), 3) for k in p for v in (k.x, k.y, k.score)],
            }
            if p.box_score is not None:
                r["box_score"], r["keypoint_score"] = p.box_score, p.score
            if p.track_id is not None:
                r["track_id"] = p.track_id
            out.append(r)
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __repr__(self) -> str:
        return f"Results({len(self.persons)} person(s), keypoints={self.keypoint_names})"
