"""Run a model over a COCO-keypoints file with its ground-truth person boxes.

Writes the standard COCO results list (plus ``ann_id``, and ``z_norm`` for 3D models) that
``benchmarks/accuracy.py`` scores: PCK, COCO AP, and with a 3D companion MPJPE.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from .coco_files import guess_image_dir, read_coco
from .crop import load_image
from .pose import Pose
from .protocol import depth_to_unit


def keypoint_names(doc: dict, pose: Pose, keypoints: str | Sequence[str] = "auto") -> list[str]:
    """``auto``: the file's extended keypoint list when the model's library describes them
    all (SynthPose: COCO-17 + neck, pelvis, head_top, thorax, torso), else its COCO list."""
    cat = doc["categories"][0]
    if keypoints == "auto":
        ext = cat.get("keypoint_names_ext") or []
        if ext and all(n in pose.library for n in ext):
            return list(ext)
        return list(cat["keypoints"])
    if isinstance(keypoints, str):
        if keypoints in pose.library.skeletons:
            return list(pose.library.skeletons[keypoints].keypoints)
        return [k.strip() for k in keypoints.split(",") if k.strip()]
    return list(keypoints)


def predict_coco(
    pose: Pose,
    gt_json: str | Path,
    keypoints: str | Sequence[str] = "auto",
    image_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    flip: bool = False,
) -> list[dict]:
    """``flip``: flip test-time augmentation (see ``Pose.locate``)."""
    gt_json = Path(gt_json)
    doc = read_coco(gt_json)
    image_dir = Path(image_dir) if image_dir else guess_image_dir(gt_json, doc)
    names = keypoint_names(doc, pose, keypoints)
    anns: dict = {}
    for a in doc["annotations"]:
        if not a.get("iscrowd") and a.get("num_keypoints", 1) > 0:
            anns.setdefault(a["image_id"], []).append(a)
    images = [im for im in doc["images"] if im["id"] in anns][:limit]
    preds = []
    for i, im in enumerate(images):
        people = anns[im["id"]]
        res = pose.locate(
            load_image(image_dir / im["file_name"], exif_orientation=False),
            names,
            [a["bbox"] for a in people],
            flip=flip,
        )
        for person, a in zip(res, people):
            p = {
                "image_id": im["id"],
                "category_id": a.get("category_id", 1),
                "ann_id": a["id"],
                "score": person.score,
                "keypoints": [round(v, 3) for k in person for v in (k.x, k.y, k.score)],
            }
            if pose.spec.coord_dims == 3:
                p["z_norm"] = [round(depth_to_unit(k.z), 6) for k in person]
            preds.append(p)
        if progress and (i + 1) % 25 == 0:
            print(f"  {i + 1}/{len(images)} images", file=sys.stderr)
    return preds
