"""Overlay drawing for results (OpenCV only)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .crop import load_image
from .descriptions import DescriptionLibrary
from .errors import ArgumentError, ImageError
from .results import Results

_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


def _threshold_value(k) -> float:
    return k.score if k.confidence is None else k.confidence


def draw_results(
    image: object,
    results: Results,
    out: str | Path | None = None,
    library: DescriptionLibrary | None = None,
    labels: bool = False,
    kpt_thr: float | None = None,
) -> np.ndarray:
    """Boxes, keypoints and COCO limbs where both ends were asked for (RGB image back).

    ``kpt_thr``: keypoints below it (and their limbs) are not drawn, compared with the calibrated
    ``confidence`` where the engine has one (thresholds from other tools mean something there),
    else with the official score; ``labels``: each box carries "person i" (a tracked person "id
    N", in the track's colour in every frame) and the person score."""
    if kpt_thr is not None and (isinstance(kpt_thr, bool) or not isinstance(kpt_thr, (int, float))):
        raise ArgumentError(f"kpt_thr must be a number (a keypoint score) or None, got {kpt_thr!r}")
    img = load_image(image).copy()
    library = library or DescriptionLibrary.load()
    limbs = []
    coco = library.skeletons.get("coco17")
    if coco:
        limbs = [(coco.keypoints[a], coco.keypoints[b]) for a, b in coco.limbs]
    scale = max(1, round(max(img.shape[:2]) / 400))
    height, width = img.shape[:2]

    def point(x: float, y: float) -> tuple[int, int]:
        # clipped just outside the image: OpenCV's int coordinates overflow on huge values
        return int(round(min(max(x, -1.0), width))), int(round(min(max(y, -1.0), height)))

    for i, person in enumerate(results):
        tracked = getattr(person, "track_id", None) is not None  # a tracked person keeps colour and label
        color = _PALETTE[(person.track_id if tracked else i) % len(_PALETTE)]
        x, y, w, h = person.box
        cv2.rectangle(img, point(x, y), point(x + w, y + h), color, scale)
        if labels:
            org = point(x, y)
            text = f"{f'id {person.track_id}' if tracked else f'person {i}'} {person.score:.2f}"
            cv2.putText(img, text, (org[0] + 2, max(org[1] - 4, 10 * scale)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.35 * scale, color, max(1, scale // 2), cv2.LINE_AA)  # fmt: skip
        shown = [k for k in person if kpt_thr is None or _threshold_value(k) >= kpt_thr]
        pts = {k.name: point(k.x, k.y) for k in shown}
        for a, b in limbs:
            if a in pts and b in pts:
                cv2.line(img, pts[a], pts[b], color, scale, cv2.LINE_AA)
        for k in shown:
            cv2.circle(img, pts[k.name], 2 * scale + 1, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(img, pts[k.name], 2 * scale, color, -1, cv2.LINE_AA)
    if out is not None:
        write_image(out, img)
    return img


def check_image_path(path: str | Path) -> Path:
    """An image file we can write: its folder exists and OpenCV has a writer for its extension.
    Checked before any work, so a run never ends in a failed write."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ImageError(f"cannot write {path}: the folder {path.parent} does not exist")
    if not path.suffix or not cv2.haveImageWriter(str(path)):
        raise ImageError(f"cannot write {path}: unknown image extension {path.suffix!r} (use .png or .jpg)")
    return path


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB image, checking that it was written (cv2.imwrite reports failure by its
    return value, which is easy to miss)."""
    path = check_image_path(path)
    try:
        ok = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    except cv2.error as e:
        raise ImageError(f"cannot write {path}: {e}") from e
    if not ok:
        raise ImageError(f"cannot write {path} (OpenCV could not write the file)")
    return path
