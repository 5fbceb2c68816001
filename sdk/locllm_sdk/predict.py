"""Run a model over a COCO-keypoints file with its ground-truth person boxes.

Writes the standard COCO results list (plus ``ann_id``, and ``z_norm`` for 3D models) that
``benchmarks/accuracy.py`` scores: PCK, COCO AP, and with a 3D companion MPJPE.
"""

from __future__ import annotations

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


def people_by_image(doc: dict, limit: int | None = None) -> list[tuple[dict, list[dict]]]:
    """(image record, its annotated people) for every image with a non-crowd person that has
    keypoints, in the file's order (the first ``limit``)."""
    anns: dict = {}
    for a in doc["annotations"]:
        if not a.get("iscrowd") and a.get("num_keypoints", 1) > 0:
            anns.setdefault(a["image_id"], []).append(a)
    return [(im, anns[im["id"]]) for im in doc["images"] if im["id"] in anns][:limit]


def image_predictions(
    pose: Pose,
    image: object,
    image_id: int,
    keypoints: str | Sequence[str],
    people: Sequence[dict] | None = None,
    flip: bool = False,
    detector=None,
) -> list[dict]:
    """COCO keypoint results (``Results.to_coco``) of one image: the boxes of ``people`` (COCO
    annotations: each result also carries their ``ann_id`` and ``category_id``) or, without
    them, those of ``detector``; 3D models add ``z_norm`` (the protocol's depth unit)."""
    boxes = [a["bbox"] for a in people] if people is not None else None
    res = pose.locate(image, keypoints, boxes, flip=flip, detector=detector)
    preds = res.to_coco(image_id)
    for i, (p, person) in enumerate(zip(preds, res)):
        if people is not None:
            p["category_id"] = people[i].get("category_id", 1)
            p["ann_id"] = people[i]["id"]
        if pose.spec.coord_dims == 3:
            p["z_norm"] = [round(depth_to_unit(k.z), 6) for k in person]
    return preds


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
    images = people_by_image(doc, limit)
    from tqdm import tqdm

    preds = []
    for im, people in tqdm(images, desc="locllm predict", unit="image", disable=not progress):
        image = load_image(image_dir / im["file_name"], exif_orientation=False)
        preds += image_predictions(pose, image, im["id"], names, people, flip)
    return preds
