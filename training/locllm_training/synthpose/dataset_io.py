"""COCO-keypoints JSON, the 3D companion JSON and LLaVA captions for SynthPose samples.

Layout written by ``training/make_synthpose.py --output DIR --split S``::

    DIR/images/S/00000001.png
    DIR/annotations/person_keypoints_S.json   COCO keypoints (pycocotools-readable)
    DIR/annotations/synthpose3d_S.json        camera-space joints (mm) + intrinsics
    DIR/annotations/captions_S.json           LLaVA conversations (with --captions)

COCO ``keypoints`` holds the 17 COCO joints (x, y, v; v=0 -> x=y=0). ``keypoints_ext``
holds all 22 SynthPose joints in the order of ``category["keypoint_names_ext"]`` (the first 17
equal ``keypoints``), so novel-keypoint experiments can drop the extra joints from training.
Pixel convention: pixel centres at integer coordinates (OpenCV), i.e. ``u = fx*X/Z + cx``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from locllm_sdk.protocol import DEPTH_RANGE_MM, depth_to_unit

from .scene import ROOT, Sample, caption
from .skeleton import COCO17, COCO_LIMBS, EXT_LIMBS, JOINT_NAMES, NUM_COCO

CAPTION_PROMPTS = [
    "Describe the image briefly.",
    "Give a short caption for this image.",
    "What is shown in this picture?",
    "Summarize the visual content of the image.",
    "Describe the people in this image.",
]


def coco_category() -> dict:
    """The COCO person category plus SynthPose's extended keypoint list (1-based skeletons)."""
    return {
        "id": 1, "name": "person", "supercategory": "person",
        "keypoints": list(COCO17),
        "skeleton": [[a + 1, b + 1] for a, b in COCO_LIMBS],
        "keypoint_names_ext": list(JOINT_NAMES),
        "skeleton_ext": [[a + 1, b + 1] for a, b in EXT_LIMBS],
    }  # fmt: skip


def _r(x: float, nd: int) -> float:
    return round(float(x), nd)


def flat_keypoints(uv: np.ndarray, vis: np.ndarray) -> list[float]:
    out: list[float] = []
    for (x, y), v in zip(uv, vis, strict=True):
        out += [_r(x, 2), _r(y, 2), int(v)] if v > 0 else [0, 0, 0]
    return out


def z_norm(joints_cam: np.ndarray) -> np.ndarray:
    """Human3.6M root-relative depth as LocLLM answers it: (z - z_pelvis)/2000 + 0.5."""
    return depth_to_unit(joints_cam[:, 2] - joints_cam[ROOT, 2])


def sample_records(
    sample: Sample, image_id: int, first_ann_id: int, file_name: str
) -> tuple[dict, list[dict], dict, list[dict]]:
    """COCO image + annotations and the matching 3D-companion records for one sample."""
    h, w = sample.image.shape[:2]
    img = {"id": image_id, "file_name": file_name, "width": w, "height": h}
    cam = sample.camera
    img3d = dict(
        img,
        camera={
            "fx": _r(cam.fx, 6),
            "fy": _r(cam.fy, 6),
            "cx": _r(cam.cx, 6),
            "cy": _r(cam.cy, 6),
            "R": [[_r(v, 9) for v in row] for row in cam.R],
            "t": [_r(v, 4) for v in cam.t],
        },
    )
    anns, anns3d = [], []
    for k, p in enumerate(sample.persons):
        aid = first_ann_id + k
        kp_ext = flat_keypoints(p.joints_2d, p.vis)
        anns.append({
            "id": aid, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "bbox": [_r(v, 2) for v in p.bbox], "area": float(p.area),
            "num_keypoints": int((p.vis[:NUM_COCO] > 0).sum()),
            "keypoints": kp_ext[: 3 * NUM_COCO],
            "num_keypoints_ext": int((p.vis > 0).sum()),
            "keypoints_ext": kp_ext,
            "pose": p.kind, "facing": p.facing,
        })  # fmt: skip
        zc = p.joints_cam
        anns3d.append({
            "id": aid, "image_id": image_id,
            "joints_cam_mm": [[_r(v, 1) for v in row] for row in zc],
            "joints_2d": [[_r(v, 2) for v in row] for row in p.joints_2d],
            "visibility": [int(v) for v in p.vis],
            "root_depth_mm": _r(zc[ROOT, 2], 1),
            "z_norm": [_r(v, 6) for v in z_norm(np.round(zc, 1))],
        })  # fmt: skip
    return img, anns, img3d, anns3d


def coco_document(images: list[dict], anns: list[dict], split: str, seed: int) -> dict:
    return {
        "info": {"description": f"SynthPose {split} (seed {seed})", "version": "1.0",
                 "pixel_convention": "pixel centres at integer coordinates"},
        "licenses": [],
        "images": images, "annotations": anns, "categories": [coco_category()],
    }  # fmt: skip


def companion_document(images: list[dict], anns: list[dict], split: str, seed: int) -> dict:
    return {
        "info": {
            "description": f"SynthPose {split} 3D companion (seed {seed})",
            "units": "mm, camera frame (x right, y down, z forward)",
            "projection": "u = fx*X/Z + cx, v = fy*Y/Z + cy",
            "root_joint": JOINT_NAMES[ROOT],
            "z_norm": f"(Z - Z_root) / {DEPTH_RANGE_MM:g} + 0.5 (Human3.6M / LocLLM convention)",
        },
        "joint_names": list(JOINT_NAMES),
        "images": images, "annotations": anns,
    }  # fmt: skip


def caption_record(sample: Sample, image_id: int, image_path: str, rng_index: int) -> dict:
    prompt = CAPTION_PROMPTS[rng_index % len(CAPTION_PROMPTS)]
    return {
        "id": f"synthpose_{image_id:08d}",
        "image": image_path,
        "conversations": [
            {"from": "human", "value": "<image>\n" + prompt},
            {"from": "gpt", "value": caption(sample)},
        ],
    }


def write_json(path: str | Path, obj: object) -> None:
    """Compact, key-order-stable JSON (byte-identical for identical inputs)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"), ensure_ascii=False)


def load_companion(path: str | Path) -> dict:
    """Load a 3D companion; adds numpy views: ann['joints_cam'] [K,3], img['K'] [3,3]."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    for img in doc["images"]:
        c = img["camera"]
        img["K"] = np.array([[c["fx"], 0, c["cx"]], [0, c["fy"], c["cy"]], [0, 0, 1.0]])
    for a in doc["annotations"]:
        a["joints_cam"] = np.asarray(a["joints_cam_mm"], float)
    return doc
