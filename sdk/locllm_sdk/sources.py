"""Where images come from: one image, a folder, a glob, a video file, a webcam, a stream URL.

``frames(source)`` yields ``Frame``s (RGB uint8) in order; ``Pose.stream`` runs ``locate`` on
each. Image files are read with ``crop.load_image`` (all its checks); videos, webcams and
streams with OpenCV's ``VideoCapture`` (frames converted from BGR to RGB).
"""

from __future__ import annotations

import glob as globbing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .crop import IMAGE_SUFFIXES, load_image
from .errors import DataError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # HxWx3 uint8 RGB
    index: int  # position in the source (frame number for videos)
    name: str  # the file, or "<source>#<frame>" for videos and streams


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def kind(source: object) -> str:
    """``array``, ``image``, ``folder``, ``glob``, ``video``, ``camera`` or ``stream``."""
    if isinstance(source, np.ndarray) or type(source).__module__.startswith("PIL."):
        return "array"
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        return "camera"
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"a source is a path, a glob, a URL, a webcam index or an image, got {type(source).__name__}")
    text = os.fspath(source)
    if "://" in text:
        return "stream"
    path = Path(text)
    if path.is_dir():
        return "folder"
    if _is_glob(text) and not path.exists():
        return "glob"
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return "video"
    return "image"


def image_files(source: str | os.PathLike) -> list[Path]:
    """The image files of a folder (sorted, not recursive) or of a glob (sorted)."""
    text = os.fspath(source)
    if Path(text).is_dir():
        files = [p for p in Path(text).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    else:
        files = [Path(p) for p in globbing.glob(text, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES]
    files = sorted(files)
    if not files:
        raise DataError(f"{text}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def length(source: object) -> int | None:
    """How many frames ``frames(source)`` yields, when known in advance (for progress)."""
    k = kind(source)
    if k in ("array", "image"):
        return 1
    if k in ("folder", "glob"):
        return len(image_files(source))
    if k == "video":
        import cv2

        if not Path(os.fspath(source)).is_file():
            raise DataError(f"video file not found: {os.fspath(source)}")
        cap = cv2.VideoCapture(os.fspath(source))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        return n or None
    return None  # cameras and streams run until they stop


def frame_rate(source: object) -> float | None:
    """Frames per second of a video file, webcam or stream as OpenCV reads it (None for images,
    or when the container does not say)."""
    k = kind(source)
    if k not in ("video", "camera", "stream"):
        return None
    import cv2

    cap = cv2.VideoCapture(int(source) if k == "camera" else os.fspath(source))
    fps = float(cap.get(cv2.CAP_PROP_FPS)) if cap.isOpened() else 0.0
    cap.release()
    return fps if fps > 0 else None


def frames(source: object, exif_orientation: bool = True) -> Iterator[Frame]:
    k = kind(source)
    if k == "array":
        yield Frame(load_image(source), 0, "<array>")
    elif k == "image":
        yield Frame(load_image(source, exif_orientation=exif_orientation), 0, os.fspath(source))
    elif k in ("folder", "glob"):
        for i, path in enumerate(image_files(source)):
            yield Frame(load_image(path, exif_orientation=exif_orientation), i, str(path))
    else:
        yield from _capture(source, k)


def _capture(source: object, k: str) -> Iterator[Frame]:
    import cv2

    name = str(source)
    if k == "video" and not Path(name).is_file():
        raise DataError(f"video file not found: {name}")
    cap = cv2.VideoCapture(int(source) if k == "camera" else name)
    if not cap.isOpened():
        raise DataError(f"OpenCV cannot open the {k} {name!r}")
    try:
        i = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            yield Frame(np.ascontiguousarray(bgr[:, :, ::-1]), i, f"{name}#{i}")
            i += 1
    finally:
        cap.release()
    if k == "video" and i == 0:
        raise DataError(f"{name}: no frame could be decoded")
