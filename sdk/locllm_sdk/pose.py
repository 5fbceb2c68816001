"""``Pose``: load once, then image + boxes + keypoints -> ``Results``.

Thin by design: ``loader.load`` makes the backend, ``pipeline.locate_in_image`` runs crop ->
vision -> prefix -> suffixes -> digits -> coordinates, and this module only turns what the
caller passes into requests and what the pipeline answers into ``Results``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import crop as cropping
from .detectors import detect, detect_scored
from .errors import ArgumentError
from .inputs import usable_detections, validate_boxes
from .loader import LoadedModel, load
from .manifest import AUTO
from .pipeline import DECODING, DEFAULT_MEMORY_BUDGET_MB, StageTimes, locate_in_images
from .protocol import unit_to_depth
from .results import Keypoint, Person, Results
from .sources import Frame
from .tracking import PoseTracker, check_det_frequency

PERSON = "person"  # detector="person": the bundled person detector


class _Item(NamedTuple):
    """One checked image of a call: its boxes ([x, y, w, h]) and, when detected, their scores."""

    image: np.ndarray
    boxes: list
    box_scores: list | None
    detect_ms: float | None


class Pose:
    """A LocLLM keypoint localizer.

    >>> pose = Pose("engines/tiny")                       # an engine dir (or a checkpoint dir)
    >>> res = pose.locate("person.jpg", ["neck", "pelvis"], boxes=[[10, 20, 200, 380]])
    >>> res[0]["neck"].x, res[0]["neck"].y, res[0]["neck"].score
    """

    def __init__(
        self,
        model: str | Path,
        backend: str = AUTO,
        decoding: str = "constrained",
        threads: int | None = None,
        verify: bool | str = "cached",
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        device: int = 0,
    ):
        """``memory_budget_mb`` bounds the working memory of one call: crops go through the
        vision tower, the prefix prefill and the decoding in chunks that fit it (many persons
        x keypoints on a large model run in several chunks, with the same answers). ``device``: the
        GPU index of the GPU backends. ``backend="auto"`` falls back to the next backend (down to
        ONNX Runtime on the CPU) when the fastest one cannot start; an explicit one raises.
        ``verify``: the engine files' sha256, ``"cached"`` (default: hashed once per unchanged
        file), ``"always"`` (or ``True``) or ``"sizes"`` (or ``False``: sizes only)."""
        if decoding not in DECODING:
            raise ArgumentError(f"decoding must be one of {DECODING}, got {decoding!r}")
        if (
            isinstance(memory_budget_mb, bool)
            or not isinstance(memory_budget_mb, (int, float))
            or not memory_budget_mb > 0
        ):
            raise ArgumentError(f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
        self.model: LoadedModel = load(model, backend, threads=threads, verify=verify, device=device)
        self.path, self.decoding, self.memory_budget_mb = Path(model), decoding, memory_budget_mb
        self._person_detector = None  # detector="person", loaded on first use

    # what callers read
    @property
    def spec(self):
        return self.model.spec

    @property
    def backend(self):
        return self.model.backend

    @property
    def backend_name(self) -> str:
        return self.model.backend_name

    @property
    def library(self):
        return self.model.library

    @property
    def manifest(self):
        """The engine's typed manifest (None for a checkpoint run on torch)."""
        return self.model.manifest

    def locate(
        self,
        image: object,
        keypoints: str | Iterable[str] | Mapping[str, str | None],
        boxes: Sequence[Sequence[float]] | None = None,
        flip: bool = False,
        box_format: str = "xywh",
        channels: str = "rgb",
        detector=None,
        score_threshold: float = 0.0,
        classes=None,
    ) -> Results:
        """Locate ``keypoints`` (names, a skeleton name like ``"coco17"``, or a
        ``{name: description}`` mapping) for each person box ``[x, y, w, h]`` (default: the
        whole image). Coordinates come back in image pixels.

        ``flip=True`` is flip test-time augmentation: each crop is also run mirrored, asking
        for the mirrored keypoint (left <-> right), and the two answers are averaged (x, y, z
        and score). About twice the cost; the result is then no longer one answer of the
        model, so ``Keypoint.answer`` holds the plain crop's answer and ``flip_answer`` the
        mirrored crop's.

        ``box_format``: ``"xywh"`` (default), ``"xyxy"`` or ``"cxcywh"``; results report boxes
        as ``[x, y, w, h]``. ``channels``: the channel order of an array image, ``"rgb"``
        (default) or ``"bgr"`` (OpenCV's). Bad input raises an error of the SDK's own type
        (``locllm_sdk.errors``) naming the input and the problem, before any model work.

        ``detector``: ``"person"`` (the bundled SynthPose person detector) or a callable RGB image
        -> ``(N, 4|5|6)`` array ``[x1, y1, x2, y2(, score(, class))]`` (or an ultralytics,
        supervision or rtmlib output: ``detectors``) giving the person boxes instead of ``boxes``:
        detections scoring under ``score_threshold`` or, with ``classes``, of another class are
        dropped; each ``Person`` keeps its ``box_score``. No box (``boxes=[]`` or nothing
        detected) gives an empty result. ``info["timings_ms"]`` holds the time of each stage
        (detect, crop, vision, prefix, decode)."""
        requests = self.library.resolve(keypoints)
        item = self._image_and_boxes(image, boxes, box_format, channels, detector, score_threshold, classes)
        return self._run([item], requests, flip, self.decoding)[0]

    __call__ = locate

    def locate_batch(
        self,
        items: Sequence[tuple[object, Sequence[Sequence[float]] | None]],
        keypoints: str | Iterable[str] | Mapping[str, str | None],
        flip: bool = False,
        box_format: str = "xywh",
        channels: str = "rgb",
        decoding: str | None = None,
    ) -> list[Results]:
        """``locate`` for several ``(image, boxes)`` with the same keypoints, as one batch: the
        crops of all images go through the pipeline together (``pipeline.locate_in_images``;
        the same answers as one ``locate`` per image). ``decoding``: default the Pose's."""
        requests = self.library.resolve(keypoints)
        checked = [self._image_and_boxes(im, b, box_format, channels, None, 0.0, None) for im, b in items]
        return self._run(checked, requests, flip, self.decoding if decoding is None else decoding)

    def person_detector(self, detector: object):
        """``detector=``'s value as a callable: ``"person"`` is the bundled SynthPose person
        detector (``person_detector.PersonDetector``, loaded once per Pose)."""
        if isinstance(detector, str):
            if detector != PERSON:
                raise ArgumentError(f"detector must be a callable or {PERSON!r} (the bundled one), got {detector!r}")
            if self._person_detector is None:
                from .person_detector import PersonDetector

                self._person_detector = PersonDetector()
            return self._person_detector
        return detector

    def _image_and_boxes(self, image, boxes, box_format, channels, detector, score_threshold, classes) -> _Item:
        img = cropping.load_image(image, channels=channels)
        h, w = img.shape[:2]
        box_scores, detect_ms = None, None
        if detector is not None:
            if boxes is not None:
                raise ArgumentError("give boxes or a detector, not both")
            detector = self.person_detector(detector)
            start = time.perf_counter()
            boxes, box_scores = detect_scored(detector, img, score_threshold, classes)
            detect_ms = 1000.0 * (time.perf_counter() - start)
            boxes, box_scores = usable_detections(boxes, box_scores, (h, w))
            box_format = "xywh"
        return _Item(img, validate_boxes(boxes, (h, w), box_format), box_scores, detect_ms)

    def _run(self, items, requests, flip: bool, decoding: str) -> list[Results]:
        """Checked (image, boxes) -> one Results each; images without a box get an empty one."""
        if decoding not in DECODING:
            raise ArgumentError(f"decoding must be one of {DECODING}, got {decoding!r}")
        names = [r.name for r in requests]
        busy = [i for i, item in enumerate(items) if item.boxes]
        out = {}
        times = StageTimes()
        if busy:
            mirrored = [self.library.mirror(r) for r in requests] if flip else None
            pairs = [(items[i].image, items[i].boxes) for i in busy]
            answers = locate_in_images(
                self.backend, self.spec, pairs, requests, decoding, self.memory_budget_mb, mirrored, times
            )
            out = dict(zip(busy, answers))
        three_d = self.spec.coord_dims == 3
        results = []
        for i, (img, boxes, box_scores, detect_ms) in enumerate(items):
            info = {"backend": self.backend_name, "decoding": decoding, "decoder_passes": 0, "flip": flip}
            # per-stage wall time in ms (a batch's stages are shared by its images)
            info["timings_ms"] = ({} if detect_ms is None else {"detect": round(detect_ms, 3)}) | {
                k: round(v, 3) for k, v in times.ms.items()
            }
            persons = []
            if i in out:
                a = out[i]
                info["decoder_passes"] = a.stats.decoder_passes
                calibrated = self.spec.confidence(a.scores) if self.spec.confidence else None
                for b, box in enumerate(boxes):
                    kps = tuple(
                        Keypoint(
                            req.name,
                            float(a.values[b, j, 0]),
                            float(a.values[b, j, 1]),
                            float(a.scores[b, j]),
                            unit_to_depth(float(a.values[b, j, 2])) if three_d else None,
                            a.texts[b][j],
                            a.flip_texts[b][j],
                            None if calibrated is None else float(calibrated[b, j]),
                        )
                        for j, req in enumerate(requests)
                    )
                    score = None if box_scores is None else box_scores[b]
                    persons.append(Person(tuple(box), kps, box_score=score))
            results.append(Results(persons, names, img.shape[:2], info, orig_img=img))
        return results

    def stream(
        self,
        source,
        keypoints,
        progress: bool | None = None,
        track: bool | PoseTracker = False,
        det_frequency: int = 1,
        **locate_kwargs,
    ) -> Iterator[tuple[Frame, Results]]:
        """``(Frame, Results)`` for every frame of ``source``: an image (path or array), a
        folder, a glob, a video file, a webcam index or a stream URL (``sources.frames``),
        each through ``locate(frame.image, keypoints, **locate_kwargs)`` (boxes, detector=,
        flip, ...). ``progress``: a tqdm bar (default: for anything longer than one image).

        ``track=True`` follows people from frame to frame (``tracking.PoseTracker``): the
        ``detector=`` runs only every ``det_frequency`` frames (and when nobody is tracked), in
        between each person's box comes from their keypoints in the previous frame, and every
        ``Person`` carries a ``track_id`` (greedy IoU matching at detections). Give a configured
        ``PoseTracker`` as ``track`` for its other settings (``det_frequency`` is then its own).
        Box propagation reads the keypoints asked for, so they should span the body ("coco17")."""
        from . import sources

        tracker = self._stream_tracker(track, det_frequency, locate_kwargs)
        total = sources.length(source)
        it = sources.frames(source)
        if progress if progress is not None else total != 1:
            from tqdm import tqdm

            it = tqdm(it, total=total, unit="frame", desc=f"locllm {sources.kind(source)}")
        if tracker is None:
            return ((frame, self.locate(frame.image, keypoints, **locate_kwargs)) for frame in it)
        return self._track(it, keypoints, tracker, locate_kwargs)

    @staticmethod
    def _stream_tracker(track: object, det_frequency: object, locate_kwargs: dict) -> PoseTracker | None:
        """The tracker ``stream`` runs (None without tracking), its arguments checked."""
        if isinstance(track, PoseTracker):
            if det_frequency != 1:
                raise ArgumentError("give det_frequency to the PoseTracker passed as track=, not to stream()")
            tracker = track
        elif isinstance(track, (bool, np.bool_)):
            check_det_frequency(det_frequency)
            if not track:
                if det_frequency != 1:
                    raise ArgumentError(
                        f"det_frequency={det_frequency} needs track=True: without tracking every frame is detected"
                    )
                return None
            tracker = PoseTracker(det_frequency=det_frequency)
        else:
            raise ArgumentError(f"track must be True, False or a PoseTracker, got {type(track).__name__}")
        if locate_kwargs.get("detector") is None:
            raise ArgumentError("track=True needs a detector= (the person boxes of the detection frames)")
        for name in ("boxes", "box_format"):
            if name in locate_kwargs:
                raise ArgumentError(f"track=True takes its boxes from the detector and the tracks: {name}= is not used")
        return tracker

    def _track(self, frames, keypoints, tracker: PoseTracker, locate_kwargs: dict) -> Iterator[tuple[Frame, Results]]:
        kwargs = dict(locate_kwargs)
        detector = self.person_detector(kwargs.pop("detector"))
        score_threshold, classes = kwargs.pop("score_threshold", 0.0), kwargs.pop("classes", None)
        channels = kwargs.pop("channels", "rgb")
        tracker.reset()
        for frame in frames:
            img = cropping.load_image(frame.image, channels=channels)
            detections = None
            if tracker.detection_due:
                found = detect(detector, img, score_threshold, classes)  # [x, y, w, h] rows
                detections = np.array([[x, y, x + w, y + h] for x, y, w, h in found], np.float64).reshape(-1, 4)
            tracked = tracker.begin(detections, img.shape[:2])
            res = self.locate(img, keypoints, boxes=tracked.boxes, box_format="xyxy", **kwargs)
            tracker.observe(res.xy, res.conf)
            res.persons = [replace(p, track_id=i) for p, i in zip(res.persons, tracked.ids, strict=True)]
            res.info["detected"] = tracked.detected
            yield frame, res

    def __repr__(self) -> str:
        return (
            f"Pose({str(self.path)!r}, backend={self.backend_name!r}, decoding={self.decoding!r}, "
            f"dims={self.spec.coord_dims})"
        )
