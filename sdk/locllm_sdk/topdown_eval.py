"""Top-down evaluation: person boxes from a detector, then keypoints, against ground truth.

``evaluate_top_down`` runs the detector on each image once, scores its boxes (COCO box AP via
pycocotools), runs ``Pose.locate`` on the detected boxes and on the ground-truth boxes, and
scores both keypoint sets (COCO OKS AP): how much of the keypoint AP survives replacing the
ground-truth boxes by detected ones. ``locllm demo`` and ``benchmarks/detection.py`` call it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from .evaluation import box_ap, coco_ap

# Boxes scored for AP down to this detector score (AP counts low-ranked detections); keypoints
# are located only for boxes at or above the pose threshold (the detector's default).
BOX_AP_THRESHOLD = 0.05


def subset(gt: dict, image_ids: Iterable[int]) -> dict:
    """The COCO document restricted to ``image_ids``."""
    keep = set(image_ids)
    return gt | {
        "images": [im for im in gt["images"] if im["id"] in keep],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in keep],
    }


def evaluate_top_down(
    pose,
    detector: Callable[[np.ndarray], np.ndarray],
    images: Iterable[tuple[int, np.ndarray]],
    gt: dict,
    keypoints: str = "coco17",
    pose_threshold: float = 0.3,
) -> dict:
    """``images``: (image id, RGB array) pairs of ``gt``'s images; ``detector``: RGB -> (N, 5)
    xyxy + score rows (run with a low threshold: ``BOX_AP_THRESHOLD``). Returns the box AP
    (pycocotools' stats), the keypoint AP with detected and with ground-truth boxes, their
    ratio, and the median detector time per image."""
    gt_boxes: dict[int, list] = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd"):
            gt_boxes.setdefault(a["image_id"], []).append(a["bbox"])
    detections, with_detected, with_gt, ids, detect_ms = [], [], [], [], []
    for image_id, rgb in images:
        ids.append(image_id)
        start = time.perf_counter()
        rows = np.asarray(detector(rgb), np.float64).reshape(-1, 5)
        detect_ms.append(1000.0 * (time.perf_counter() - start))
        detections += [
            {"image_id": image_id, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            for x1, y1, x2, y2, s in rows.tolist()
        ]
        found = pose.locate(rgb, keypoints, detector=lambda _, r=rows: r, score_threshold=pose_threshold)
        with_detected += found.to_coco(image_id)
        with_gt += pose.locate(rgb, keypoints, boxes=gt_boxes.get(image_id, [])).to_coco(image_id)
    doc = subset(gt, ids)
    kp_det, kp_gt = coco_ap(doc, with_detected), coco_ap(doc, with_gt)
    return {
        "images": len(ids),
        "persons": len(doc["annotations"]),
        "box": box_ap(doc, detections),
        "keypoints_detected_boxes": kp_det,
        "keypoints_gt_boxes": kp_gt,
        "keypoint_ap_ratio": kp_det["AP"] / kp_gt["AP"] if kp_gt["AP"] > 0 else float("nan"),
        "detector_ms_median": float(np.median(detect_ms)) if detect_ms else float("nan"),
        "pose_threshold": pose_threshold,
    }
