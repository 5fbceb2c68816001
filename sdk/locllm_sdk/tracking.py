"""Pose tracking for video: person detection every ``det_frequency`` frames, boxes carried by
the keypoints in between, and track ids by greedy IoU matching.

``PoseTracker`` holds the state between frames and no model: ``Pose.stream(..., track=True)``
asks it each frame whether a detection is due (``detection_due``), hands it the detector's boxes
on those frames (``begin``: boxes + track ids to run ``locate`` on), then shows it the
keypoints found (``observe``), from which it makes each track's box for the next frame.

The rules, in the manner of rtmlib's ``PoseTracker``:

* **Detection** runs on the first frame, then every ``det_frequency`` frames after the last
  detection, and also on any frame where no track is alive (nothing to carry forward).
* **Propagation** (frames in between): a track's box for the next frame is the bounding box of
  its keypoints scoring at least ``kpt_thr``, scaled about its centre by ``box_expansion``
  (1.25: COCO-17 joints stop at the eyes and ankles, short of the crown, the feet and the
  hands), clipped to the image. With fewer than ``min_keypoints`` such keypoints the track
  keeps its box; a box that leaves the image (under 2 pixels left inside) ends the track.
* **Matching** (detection frames): candidate boxes are paired with the tracks greedily,
  highest IoU first, pairs under ``iou_threshold`` refused; a candidate's IoU with a track is
  the larger of its IoU with the box the track was located in on the previous frame and with
  the track's propagated box (so neither poor keypoints nor fast motion alone break a track).
  A paired box takes the track's id, an unpaired one a new id (ids count up from 0 and are
  never reused), and a track left unpaired ends.
* **Merging** (optional, ``merge_iou``): on detection frames the candidates are the detector's
  boxes plus every track's propagated box that overlaps no detected box by more than
  ``merge_iou`` (NMS-like, the detection wins), so a person the detector misses for a frame
  keeps its track and a detected person is not doubled.

Boxes here are ``[x1, y1, x2, y2]`` float arrays in image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError
from .inputs import MIN_BOX_SIDE


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), xyxy -> (N, M)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def greedy_match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, column) taken highest IoU first, each row and column at most once, IoU >=
    ``threshold`` (ties: the lower row, then the lower column)."""
    iou = np.asarray(iou, np.float64)
    if iou.size == 0:
        return []
    order = np.argsort(-iou, axis=None, kind="stable")
    rows, cols = np.unravel_index(order, iou.shape)
    used_r, used_c, pairs = set(), set(), []
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        if iou[r, c] < threshold:
            break
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c))
    return pairs


def clip_box(box: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray | None:
    """``box`` clipped to the image, or None when under ``MIN_BOX_SIDE`` pixels of it remain."""
    h, w = image_hw
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    x1, x2 = max(x1, 0.0), min(x2, float(w))
    y1, y2 = max(y1, 0.0), min(y2, float(h))
    if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
        return None
    return np.array([x1, y1, x2, y2])


def box_from_keypoints(
    xy: np.ndarray, scores: np.ndarray, kpt_thr: float, expansion: float, min_keypoints: int = 2
) -> np.ndarray | None:
    """The bounding box of the keypoints scoring >= ``kpt_thr``, scaled about its centre by
    ``expansion``; None with fewer than ``min_keypoints`` of them or no extent on one axis."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    keep = (np.asarray(scores, np.float64).reshape(-1) >= kpt_thr) & np.isfinite(xy).all(1)
    if keep.sum() < min_keypoints:
        return None
    lo, hi = xy[keep].min(0), xy[keep].max(0)
    if np.any(hi - lo <= 0):
        return None
    centre, half = (lo + hi) / 2, (hi - lo) / 2 * expansion
    return np.concatenate([centre - half, centre + half])


@dataclass
class Track:
    id: int
    box: np.ndarray  # xyxy: the box to run on in the next frame
    seen: np.ndarray | None = None  # xyxy: the box it was located in on the last frame


@dataclass(frozen=True)
class TrackedBoxes:
    """What to run ``locate`` on in one frame: ``boxes`` (N, 4) xyxy and their ``ids``."""

    boxes: np.ndarray
    ids: list[int]
    detected: bool  # a detection frame


def _positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
        raise ArgumentError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_det_frequency(value: object) -> int:
    """``det_frequency`` as an int >= 1 (an ArgumentError naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArgumentError(f"det_frequency must be a positive integer (detect every N frames), got {value!r}")
    return int(value)


class PoseTracker:
    """Track ids and box propagation between detections (see the module doc for the rules).

    >>> tracker = PoseTracker(det_frequency=5)
    >>> for image in frames:
    ...     dets = detector(image)[:, :4] if tracker.detection_due else None
    ...     tracked = tracker.begin(dets, image.shape[:2])   # boxes + ids to locate
    ...     res = pose.locate(image, "coco17", boxes=tracked.boxes, box_format="xyxy")
    ...     tracker.observe(res.xy, res.conf)
    """

    def __init__(
        self,
        det_frequency: int = 1,
        iou_threshold: float = 0.3,
        kpt_thr: float = 0.5,
        box_expansion: float = 1.25,
        min_keypoints: int = 2,
        merge_iou: float | None = None,
    ):
        self.det_frequency = check_det_frequency(det_frequency)
        self.iou_threshold = _positive_number("iou_threshold", iou_threshold)
        if self.iou_threshold > 1:
            raise ArgumentError(f"iou_threshold is an IoU, at most 1, got {iou_threshold!r}")
        if isinstance(kpt_thr, bool) or not isinstance(kpt_thr, (int, float, np.number)) or not np.isfinite(kpt_thr):
            raise ArgumentError(f"kpt_thr must be a number (a keypoint score), got {kpt_thr!r}")
        self.kpt_thr = float(kpt_thr)
        self.box_expansion = _positive_number("box_expansion", box_expansion)
        if isinstance(min_keypoints, bool) or not isinstance(min_keypoints, (int, np.integer)) or min_keypoints < 2:
            raise ArgumentError(f"min_keypoints must be an integer >= 2 (a box has two corners), got {min_keypoints!r}")
        self.min_keypoints = int(min_keypoints)
        if merge_iou is not None:
            merge_iou = _positive_number("merge_iou", merge_iou)
            if merge_iou > 1:
                raise ArgumentError(f"merge_iou is an IoU, at most 1, got {merge_iou!r}")
        self.merge_iou = merge_iou
        self.reset()

    def reset(self) -> None:
        """Forget every track (a new video)."""
        self.tracks: list[Track] = []
        self.next_id = 0
        self.frame_index = 0
        self._since_detection: int | None = None  # frames since the last detection (None: never)
        self._current: list[Track] | None = None  # the tracks of the frame begun, until observed
        self._image_hw: tuple[int, int] = (0, 0)

    @property
    def detection_due(self) -> bool:
        """Whether the next frame is a detection frame."""
        return not self.tracks or self._since_detection is None or self._since_detection >= self.det_frequency

    def begin(self, detections: np.ndarray | None, image_hw: tuple[int, int]) -> TrackedBoxes:
        """Start a frame of size ``image_hw``: on a detection frame ``detections`` are the
        detector's (N, 4) xyxy boxes (possibly none), else None and the tracks' propagated boxes
        are used. Returns the boxes to locate and their track ids."""
        if self._current is not None:
            raise ArgumentError("PoseTracker.begin called twice: observe() the previous frame's keypoints first")
        due = self.detection_due
        if due and detections is None:
            raise ArgumentError("a detection is due on this frame (detection_due): pass the detector's boxes")
        if not due and detections is not None:
            raise ArgumentError("no detection is due on this frame (detection_due is False): pass None")
        self._image_hw = (int(image_hw[0]), int(image_hw[1]))
        if detections is None:
            current = list(self.tracks)
            self._since_detection = (self._since_detection or 0) + 1
        else:
            current = self._match(self._candidates(detections))
            self._since_detection = 1
        self._current = current
        boxes = np.array([t.box for t in current], np.float64).reshape(-1, 4)
        return TrackedBoxes(boxes, [t.id for t in current], detections is not None)

    def _candidates(self, detections: np.ndarray) -> np.ndarray:
        dets = np.asarray(detections, np.float64).reshape(-1, 4)
        kept = [clip_box(d, self._image_hw) for d in dets]
        dets = np.array([d for d in kept if d is not None], np.float64).reshape(-1, 4)
        if self.merge_iou is None or not self.tracks:
            return dets
        prop = np.array([t.box for t in self.tracks], np.float64)
        overlap = iou_matrix(prop, dets).max(axis=1) if len(dets) else np.zeros(len(prop))
        return np.concatenate([dets, prop[overlap <= self.merge_iou]])

    def _match(self, candidates: np.ndarray) -> list[Track]:
        propagated = np.array([t.box for t in self.tracks], np.float64).reshape(-1, 4)
        seen = np.array([t.box if t.seen is None else t.seen for t in self.tracks], np.float64).reshape(-1, 4)
        iou = np.maximum(iou_matrix(candidates, propagated), iou_matrix(candidates, seen))
        pairs = dict(greedy_match(iou, self.iou_threshold))
        out = []
        for i, box in enumerate(candidates):
            if i in pairs:
                out.append(Track(self.tracks[pairs[i]].id, box))
            else:
                out.append(Track(self.next_id, box))
                self.next_id += 1
        return out  # tracks no candidate took end here

    def observe(self, xy: np.ndarray, scores: np.ndarray) -> None:
        """The keypoints (N, K, 2) pixels and scores (N, K) found in the boxes ``begin`` gave,
        in its order: each track's box for the next frame comes from them."""
        if self._current is None:
            raise ArgumentError("PoseTracker.observe called before begin()")
        xy = np.asarray(xy, np.float64)
        scores = np.asarray(scores, np.float64)
        n = len(self._current)
        if xy.shape[:1] != (n,) or scores.shape[:1] != (n,) or xy.shape[:-1] != scores.shape:
            raise ArgumentError(
                f"observe() takes keypoints (N, K, 2) and scores (N, K) for the {n} box(es) of this frame, "
                f"got {xy.shape} and {scores.shape}"
            )
        alive = []
        for track, pts, conf in zip(self._current, xy, scores, strict=True):
            box = box_from_keypoints(pts, conf, self.kpt_thr, self.box_expansion, self.min_keypoints)
            box = clip_box(track.box if box is None else box, self._image_hw)
            if box is not None:  # otherwise the person left the image: the track ends
                alive.append(Track(track.id, box, track.box))
        self.tracks = alive
        self._current = None
        self.frame_index += 1
