"""Results of ``Pose.locate``: per person, per keypoint x, y [, z], score."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Keypoint:
    name: str
    x: float  # image pixels
    y: float
    score: float
    z: float | None = None  # root-relative depth in mm (3D models)
    answer: str = ""  # the model's answer text, e.g. "[0.412,0.905]"
    flip_answer: str = ""  # with flip test-time augmentation: the answer on the mirrored crop

    def to_dict(self) -> dict:
        d = {"name": self.name, "x": self.x, "y": self.y, "score": self.score, "answer": self.answer}
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
        return d


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

    def plot(self, labels: bool = True, kpt_thr: float | None = None, image=None) -> np.ndarray:
        """The annotated RGB image (boxes, keypoints, COCO limbs; see ``draw.draw_results``), on
        ``image`` or the image the result was computed on."""
        from .draw import draw_results

        image = self.orig_img if image is None else image
        if image is None:
            from .errors import ImageError

            raise ImageError("this result holds no image (made without Pose.locate): pass plot(image=...)")
        return draw_results(image, self, labels=labels, kpt_thr=kpt_thr)

    def to_dict(self) -> dict:
        return {
            "image_size": list(self.image_size),
            "keypoint_names": list(self.keypoint_names),
            "persons": [p.to_dict() for p in self.persons],
            "info": self.info,
        }

    def to_coco(self, image_id: int, category_id: int = 1) -> list[dict]:
        """COCO keypoint results (one per person: ``keypoints`` [x, y, score]*K, the person
        score, the box as given, and ``track_id`` when tracked), as ``pycocotools`` ``loadRes`` and
        ``benchmarks/accuracy.py`` read them."""
        return [
            {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [float(v) for v in p.box],
                "score": p.score,
                "keypoints": [round(float(v), 3) for k in p for v in (k.x, k.y, k.score)],
            }
            | ({} if p.track_id is None else {"track_id": p.track_id})
            for p in self.persons
        ]

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __repr__(self) -> str:
        return f"Results({len(self.persons)} person(s), keypoints={self.keypoint_names})"
