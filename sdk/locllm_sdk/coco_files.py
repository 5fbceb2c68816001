"""COCO-keypoints files: reading one (checked) and finding its images."""

from __future__ import annotations

from pathlib import Path

from .errors import DataError, read_json


def read_coco(gt_json: str | Path) -> dict:
    """A COCO-keypoints file, checked for what the SDK reads of it; DataError naming the file
    and the field otherwise."""
    path = Path(gt_json)
    if not path.is_file():
        raise DataError(f"COCO file not found: {path}")
    doc = read_json(path, DataError, "a COCO file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise DataError(f"{path}: no {key!r} list (is it a COCO keypoints file?)")
    if not doc["categories"] or not isinstance(doc["categories"][0], dict) or "keypoints" not in doc["categories"][0]:
        raise DataError(f"{path}: categories[0] has no 'keypoints' list")
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
    for i, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict) or not all(k in a for k in ("id", "image_id", "bbox")):
            raise DataError(f"{path}: annotations[{i}] needs 'id', 'image_id' and 'bbox'")
    return doc


def guess_image_dir(gt_json: str | Path, doc: dict) -> Path:
    """SynthPose (DIR/annotations/x_<split>.json + DIR/images/<split>/), COCO
    (DIR/annotations/person_keypoints_<split>2017.json + DIR/<split>2017/) or beside the file:
    the first of these that holds the file's first image."""
    gt_json = Path(gt_json)
    split = gt_json.stem.rsplit("_", 1)[-1]
    root = gt_json.parent.parent
    candidates = (root / "images" / split, root / split, root / "images", gt_json.parent)
    first = doc["images"][0]["file_name"] if doc.get("images") else None
    for cand in candidates:
        if first and (cand / first).is_file():
            return cand
    raise DataError(
        f"cannot find the images of {gt_json} (looked for {first or '?'} under "
        f"{', '.join(str(c) for c in candidates)}): pass the image folder explicitly (--images DIR)"
    )
