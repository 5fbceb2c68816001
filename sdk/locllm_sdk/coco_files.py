"""Where a COCO-keypoints file's images are."""

from __future__ import annotations

from pathlib import Path


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
    raise FileNotFoundError(
        f"cannot find the images of {gt_json} (looked for {first or '?'} under "
        f"{', '.join(str(c) for c in candidates)}): pass the image folder explicitly (--images DIR)"
    )
