"""Overlay drawing for results (OpenCV only)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .crop import load_image
from .descriptions import DescriptionLibrary
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


def draw_results(
    image: object, results: Results, out: str | Path | None = None, library: DescriptionLibrary | None = None
) -> np.ndarray:
    """Boxes, keypoints (radius by score) and COCO limbs where both ends were asked for."""
    img = load_image(image).copy()
    library = library or DescriptionLibrary.load()
    limbs = []
    coco = library.skeletons.get("coco17")
    if coco:
        limbs = [(coco.keypoints[a], coco.keypoints[b]) for a, b in coco.limbs]
    scale = max(1, round(max(img.shape[:2]) / 400))
    for i, person in enumerate(results):
        color = _PALETTE[i % len(_PALETTE)]
        x, y, w, h = person.box
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), color, scale)
        pts = {k.name: (int(round(k.x)), int(round(k.y))) for k in person}
        for a, b in limbs:
            if a in pts and b in pts:
                cv2.line(img, pts[a], pts[b], color, scale, cv2.LINE_AA)
        for k in person:
            cv2.circle(img, pts[k.name], 2 * scale + 1, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(img, pts[k.name], 2 * scale, color, -1, cv2.LINE_AA)
    if out is not None:
        cv2.imwrite(str(out), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return img
