"""Image -> person crop, and crop coordinates -> image coordinates.

Reproduces the official COCO pipeline (datasets/coco.py): the box is sanitised as COCO
loaders do, turned into center/scale padded to aspect 1.0 (/200, no 1.25 enlargement),
warped with ``cv2.warpAffine`` (INTER_LINEAR) to the model's square input, normalised with
CLIP's mean/std; predictions are mapped back with the inverse affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

PIXEL_STD = 200.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """The image cannot be used: unreadable, wrong type, shape or dtype."""


class BoxError(ValueError):
    """A person box is malformed, degenerate or outside the image."""


def load_image(image: object) -> np.ndarray:
    """Path, PIL image or HxWx3 uint8 RGB array -> contiguous HxWx3 uint8 RGB array."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise ImageError(f"cannot decode image file: {path}")
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if type(image).__module__.startswith("PIL."):
        image = np.asarray(image.convert("RGB"))  # type: ignore[attr-defined]
    if not isinstance(image, np.ndarray):
        raise ImageError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(f"image array must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"image array must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"image is empty: shape {image.shape}")
    return np.ascontiguousarray(image)


@dataclass(frozen=True)
class CropGeometry:
    center: np.ndarray  # (2,) float32
    scale: np.ndarray  # (2,) float32, box size / PIXEL_STD
    size: int
    forward: np.ndarray  # 2x3 image -> crop
    inverse: np.ndarray  # 2x3 crop -> image


def sanitize_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """COCO loaders' clean_bbox: clip to the image; the width used is one pixel less than w."""
    if len(box) != 4:
        raise BoxError(f"a box is [x, y, w, h], got {list(box)!r}")
    x, y, w, h = (float(v) for v in box)
    if not all(np.isfinite([x, y, w, h])):
        raise BoxError(f"box has non-finite values: {list(box)!r}")
    if w <= 0 or h <= 0:
        raise BoxError(f"box {list(box)!r} is degenerate (width and height must be > 0)")
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x >= width or y >= height or x + w <= 0 or y + h <= 0 or x2 < x1 or y2 < y1:
        raise BoxError(f"box {list(box)!r} lies outside the {width}x{height} image")
    return x1, y1, x2 - x1, y2 - y1


def box_to_center_scale(box: Sequence[float], aspect_ratio: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    x, y, w, h = box
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w * 1.0 / PIXEL_STD, h * 1.0 / PIXEL_STD], dtype=np.float32)
    return center, scale


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=np.float32)


def affine_transform(
    center: np.ndarray, scale: np.ndarray, rotation: float, size: int, inverse: bool = False
) -> np.ndarray:
    """The official ``get_affine_transform`` (float32 points, cv2.getAffineTransform)."""
    scale_px = np.asarray(scale, dtype=np.float32) * PIXEL_STD
    src_w = scale_px[0]
    rot = np.pi * rotation / 180.0
    sn, cs = np.sin(rot), np.cos(rot)
    src_dir = np.array([0 * cs - (src_w * -0.5) * sn, 0 * sn + (src_w * -0.5) * cs], dtype=np.float32)
    dst_dir = np.array([0, size * -0.5], np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + src_dir
    dst[0] = [size * 0.5, size * 0.5]
    dst[1] = np.array([size * 0.5, size * 0.5]) + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inverse:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def crop_geometry(box: Sequence[float], image_hw: tuple[int, int], size: int) -> CropGeometry:
    height, width = image_hw
    clean = sanitize_box(box, width, height)
    center, scale = box_to_center_scale(clean)
    return CropGeometry(
        center=center,
        scale=scale,
        size=size,
        forward=affine_transform(center, scale, 0.0, size),
        inverse=affine_transform(center, scale, 0.0, size, inverse=True),
    )


def warp(image: np.ndarray, geometry: CropGeometry) -> np.ndarray:
    return cv2.warpAffine(image, geometry.forward, (geometry.size, geometry.size), flags=cv2.INTER_LINEAR)


def normalize(crops: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W], as torchvision ToTensor + Normalize."""
    x = crops.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_image_coords(points: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Crop-pixel points [K,2] -> image pixels with the inverse affine (official transform_preds)."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ inverse[:, :2].T + inverse[:, 2]
