"""Keypoint accuracy metrics in plain numpy (no torch): COCO OKS AP/AR, PCK, MPJPE, PA-MPJPE.

Definitions
-----------
* **OKS AP/AR** -- the official COCO keypoint metric computed by pycocotools (imported lazily
  inside :func:`coco_ap`). Per-joint sigmas: the standard COCO values for the 17 COCO joints;
  for other joints (documented here, chosen by analogy with the closest COCO joint):
  ``neck``, ``thorax``, ``pelvis``, ``torso`` -> 0.107 (hip sigma: torso-internal points
  that annotators place about as precisely as hips); ``head_top`` -> 0.089 (ankle-like:
  the crown is a loosely defined point); ``left/right toe`` -> 0.089 (ankle); any unknown
  name -> 0.107.
* **PCK@alpha** -- a GT joint with visibility v > 0 is correct when the matched prediction
  is within ``alpha * max(box_w, box_h)`` pixels (``box`` = the GT person box). Reported per
  joint and as the mean over all valid joints (micro average, as MPII reports its mean).
* **Matching** predictions to GT persons (for PCK / MPJPE): a prediction carrying an explicit
  ``ann_id`` is matched to that GT annotation. Otherwise, per image, predictions are taken
  in descending ``score`` order and greedily matched to the unmatched GT person with the
  highest OKS (needs OKS > 0). GT persons without a matched prediction count as misses
  (all their valid joints are wrong for PCK; they are skipped for MPJPE and reported as
  ``unmatched``).
* **MPJPE** -- mean Euclidean joint error in mm; the CLI aligns the root (pelvis) first
  (Human3.6M protocol #1). **PA-MPJPE** -- after a similarity Procrustes alignment
  (rotation, translation and scale) of each predicted pose to its GT (protocol #2).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .descriptions import coco17
from .errors import DataError, read_json
from .protocol import unit_to_depth

COCO17_NAMES = list(coco17().keypoints)
COCO_SIGMAS = np.array([0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
                        0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089])  # fmt: skip
EXTRA_SIGMAS = {"neck": 0.107, "thorax": 0.107, "pelvis": 0.107, "torso": 0.107,
                "head_top": 0.089, "left toe": 0.089, "right toe": 0.089}  # fmt: skip
DEFAULT_SIGMA = 0.107
SIGMAS: dict[str, float] = dict(zip(COCO17_NAMES, COCO_SIGMAS.tolist(), strict=True)) | EXTRA_SIGMAS


def _norm_name(n: str) -> str:
    n = n.strip().lower()
    return n if n == "head_top" else n.replace("_", " ")


def sigmas_for(names: Sequence[str]) -> np.ndarray:
    """OKS sigma per keypoint name (COCO names accept 'left_eye' or 'left eye')."""
    return np.array([SIGMAS.get(_norm_name(n), DEFAULT_SIGMA) for n in names], float)


# ----------------------------------------------------------------------------- helpers
def pck(pred_xy: np.ndarray, gt_xy: np.ndarray, visible: np.ndarray, norm: np.ndarray, alpha: float) -> dict[str, Any]:
    """PCK: fraction of valid joints with ||pred - gt|| <= alpha * norm[n].

    pred_xy, gt_xy: [N, K, 2]; visible: [N, K] (bool or COCO v, > 0 counts); norm: [N]
    (e.g. max(box w, h)). Returns {"per_joint": [K] (nan where no valid joint), "mean",
    "count": [K]}; missing predictions may be given as nan (they count as wrong).
    """
    pred_xy, gt_xy = np.asarray(pred_xy, float), np.asarray(gt_xy, float)
    valid = np.asarray(visible) > 0
    d = np.linalg.norm(pred_xy - gt_xy, axis=-1)
    thr = alpha * np.asarray(norm, float)[:, None]
    ok = (d <= thr) & valid  # nan distances compare False -> wrong
    cnt = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(cnt > 0, ok.sum(0) / np.maximum(cnt, 1), np.nan)
    mean = float(ok.sum() / valid.sum()) if valid.sum() else float("nan")
    return {"per_joint": per, "mean": mean, "count": cnt}


def mpjpe(pred: np.ndarray, gt: np.ndarray, root_index: int | None = None, valid: np.ndarray | None = None) -> float:
    """Mean per-joint position error (same units as the input, e.g. mm).

    pred, gt: [N, K, 3]. root_index: subtract that joint from both first (root-relative).
    valid: optional [N, K] mask of joints to include.
    """
    pred, gt = np.asarray(pred, float), np.asarray(gt, float)
    if root_index is not None:
        pred = pred - pred[:, root_index : root_index + 1]
        gt = gt - gt[:, root_index : root_index + 1]
    e = np.linalg.norm(pred - gt, axis=-1)
    if valid is not None:
        return float(e[np.asarray(valid) > 0].mean())
    return float(e.mean())


def procrustes_align(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Similarity-align each pred[n] ([N, K, 3]) to gt[n] (Umeyama: rotation, scale, shift)."""
    pred, gt = np.asarray(pred, float), np.asarray(gt, float)
    mp, mg = pred.mean(1, keepdims=True), gt.mean(1, keepdims=True)
    p0, g0 = pred - mp, gt - mg
    H = np.einsum("nki,nkj->nij", p0, g0)
    U, S, Vt = np.linalg.svd(H)
    # Reflection guard: keep a proper rotation.
    sign = np.sign(np.linalg.det(np.einsum("nij,njk->nik", Vt.transpose(0, 2, 1), U.transpose(0, 2, 1))))
    D = np.tile(np.eye(3), (len(pred), 1, 1))
    D[:, 2, 2] = sign
    R = np.einsum("nij,njk,nkl->nil", Vt.transpose(0, 2, 1), D, U.transpose(0, 2, 1))
    var = (p0**2).sum((1, 2))
    scale = np.einsum("ni,nii->n", S, D) / np.maximum(var, 1e-12)
    return scale[:, None, None] * np.einsum("nij,nkj->nki", R, p0) + mg


def pa_mpjpe(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> float:
    """MPJPE after per-sample Procrustes alignment with scale (Human3.6M protocol #2)."""
    return mpjpe(procrustes_align(pred, gt), gt, valid=valid)


def oks_matrix(pred_kpts: np.ndarray, gt_kpts: np.ndarray, gt_areas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """COCO OKS between predictions [P, K, 2+] and GT [G, K, 3] (only GT v > 0 joints)."""
    out = np.zeros((len(pred_kpts), len(gt_kpts)))
    var = (2 * sigmas) ** 2
    for g, (gk, area) in enumerate(zip(gt_kpts, gt_areas, strict=True)):
        vis = gk[:, 2] > 0
        if not vis.any():
            continue
        d2 = ((pred_kpts[:, :, :2] - gk[None, :, :2]) ** 2).sum(-1)
        e = d2 / var / (area + np.spacing(1)) / 2
        out[:, g] = np.exp(-e[:, vis]).sum(1) / vis.sum()
    return out


# ----------------------------------------------------------------------------- COCO files
def load_json(obj: str | Path | dict | list) -> Any:
    """A ground-truth or results document, or the file holding it (DataError naming a bad file)."""
    if isinstance(obj, (dict, list)):
        return obj
    return read_json(obj, DataError)


def _keypoint_names(gt: dict, k: int) -> tuple[list[str], str]:
    """Names for predictions with k joints and the GT field that holds them."""
    cat = gt["categories"][0]
    if len(cat.get("keypoints", [])) == k:
        return list(cat["keypoints"]), "keypoints"
    if len(cat.get("keypoint_names_ext", [])) == k:
        return list(cat["keypoint_names_ext"]), "keypoints_ext"
    if k == 17:
        return list(COCO17_NAMES), "keypoints"
    raise ValueError(
        f"predictions have {k} keypoints; the GT category has "
        f"{len(cat.get('keypoints', []))} (and {len(cat.get('keypoint_names_ext', []))} ext)"
    )


def _gt_view(gt: dict, field: str) -> dict:
    """GT dict whose 'keypoints' are taken from `field` (e.g. keypoints_ext)."""
    if field == "keypoints":
        return gt
    g = copy.deepcopy(gt)
    for a in g["annotations"]:
        a["keypoints"] = a[field]
        a["num_keypoints"] = int((np.asarray(a[field]).reshape(-1, 3)[:, 2] > 0).sum())
    g["categories"][0]["keypoints"] = g["categories"][0]["keypoint_names_ext"]
    g["categories"][0]["skeleton"] = g["categories"][0].get("skeleton_ext", [])
    return g


def coco_ap(
    gt: str | Path | dict,
    preds: str | Path | list,
    sigmas: np.ndarray | None = None,
) -> dict[str, float]:
    """COCO keypoint AP/AR via pycocotools. Predictions with 22 joints are scored against
    SynthPose's ``keypoints_ext``. Returns AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl."""
    from pycocotools.coco import COCO  # lazy: optional dependency
    from pycocotools.cocoeval import COCOeval

    gt_d = load_json(gt)
    preds_l = load_json(preds)
    keys = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
    if not preds_l:
        return dict.fromkeys(keys, 0.0)
    k = len(preds_l[0]["keypoints"]) // 3
    names, field = _keypoint_names(gt_d, k)
    gt_d = _gt_view(gt_d, field)
    if sigmas is None:
        sigmas = sigmas_for(names)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt_d)
        coco.createIndex()
        dets = coco.loadRes(
            [{kk: v for kk, v in p.items() if kk in ("image_id", "category_id", "keypoints", "score")} for p in preds_l]
        )
        ev = COCOeval(coco, dets, "keypoints")
        ev.params.kpt_oks_sigmas = np.asarray(sigmas, float)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {key: float(v) for key, v in zip(keys, ev.stats, strict=True)}


def box_ap(gt: str | Path | dict, detections: str | Path | list, category_id: int = 1) -> dict[str, float]:
    """COCO box AP/AR (pycocotools, iouType ``bbox``) of detections ``[{"image_id", "bbox"
    [x, y, w, h], "score"}]`` against a COCO file's boxes of one category (crowds ignored as COCO
    does). Returns AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_d = load_json(gt)
    dets = [d | {"category_id": d.get("category_id", category_id)} for d in load_json(detections)]
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    if not dets:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt_d)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.params.imgIds = [im["id"] for im in gt_d["images"]]
        ev.params.catIds = [category_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {key: float(v) for key, v in zip(keys, ev.stats, strict=True)}


def match_predictions(
    gt: dict, preds: list[dict], sigmas: np.ndarray | None = None, field: str | None = None
) -> dict[str, Any]:
    """Pair predictions with GT persons (by ``ann_id`` or greedy best OKS, see module doc).

    Returns arrays over all GT persons with v > 0 joints: gt_xy [N,K,2], vis [N,K],
    pred_xy [N,K,2] (nan where unmatched), norm [N] = max(box w, h), ann_ids [N],
    pred_index [N] (-1 if unmatched).
    """
    k = len(preds[0]["keypoints"]) // 3 if preds else len(gt["categories"][0]["keypoints"])
    names, f = _keypoint_names(gt, k)
    field = field or f
    if sigmas is None:
        sigmas = sigmas_for(names)
    anns = [a for a in gt["annotations"] if not a.get("iscrowd", 0)]
    by_img: dict[Any, list[int]] = {}
    for i, a in enumerate(anns):
        by_img.setdefault(a["image_id"], []).append(i)
    gk = np.array([np.asarray(a[field], float).reshape(-1, 3) for a in anns]).reshape(len(anns), k, 3)
    pidx = np.full(len(anns), -1)
    id_to_row = {a["id"]: i for i, a in enumerate(anns)}
    free: list[int] = []
    for j, p in enumerate(preds):
        if "ann_id" in p and p["ann_id"] in id_to_row:
            pidx[id_to_row[p["ann_id"]]] = j
        else:
            free.append(j)
    preds_by_img: dict[Any, list[int]] = {}
    for j in sorted(free, key=lambda j: -float(preds[j].get("score", 1.0))):
        preds_by_img.setdefault(preds[j]["image_id"], []).append(j)
    for img_id, pj in preds_by_img.items():
        rows = [r for r in by_img.get(img_id, []) if pidx[r] < 0]
        if not rows:
            continue
        pk = np.array([np.asarray(preds[j]["keypoints"], float).reshape(-1, 3) for j in pj])
        areas = np.array([float(anns[r].get("area", 0)) for r in rows])
        o = oks_matrix(pk, gk[rows], areas, sigmas)
        taken: set[int] = set()
        for a_i, j in enumerate(pj):  # already in score order
            best, best_o = -1, 0.0
            for b_i, r in enumerate(rows):
                if r not in taken and o[a_i, b_i] > best_o:
                    best, best_o = b_i, o[a_i, b_i]
            if best >= 0:
                taken.add(rows[best])
                pidx[rows[best]] = j
    pred_xy = np.full((len(anns), k, 2), np.nan)
    for r, j in enumerate(pidx):
        if j >= 0:
            pred_xy[r] = np.asarray(preds[j]["keypoints"], float).reshape(-1, 3)[:, :2]
    norm = np.array([max(a["bbox"][2], a["bbox"][3]) for a in anns], float)
    return {
        "gt_xy": gk[:, :, :2],
        "vis": gk[:, :, 2],
        "pred_xy": pred_xy,
        "norm": norm,
        "ann_ids": [a["id"] for a in anns],
        "pred_index": pidx,
        "names": names,
    }


def evaluate_2d(
    gt: str | Path | dict, preds: str | Path | list, alphas: Sequence[float] = (0.05, 0.1)
) -> dict[str, Any]:
    """COCO AP/AR + PCK@alphas (per joint and mean) for a COCO GT file and results list."""
    gt_d, preds_l = load_json(gt), load_json(preds)
    out: dict[str, Any] = {"coco": coco_ap(gt_d, preds_l)}
    m = match_predictions(gt_d, preds_l)
    out["matched"] = int((m["pred_index"] >= 0).sum())
    out["gt_persons"] = len(m["ann_ids"])
    # with an extended joint list (SynthPose), also the mean over the category's own joints
    standard = list(gt_d.get("categories", [{}])[0].get("keypoints") or [])
    std_idx = [i for i, n in enumerate(m["names"]) if n in standard]
    for a in alphas:
        r = pck(m["pred_xy"], m["gt_xy"], m["vis"], m["norm"], a)
        out[f"PCK@{a:g}"] = {
            "mean": r["mean"],
            "per_joint": {
                n: (None if np.isnan(v) else float(v)) for n, v in zip(m["names"], r["per_joint"], strict=True)
            },
        }
        if 0 < len(std_idx) < len(m["names"]):
            s = pck(m["pred_xy"][:, std_idx], m["gt_xy"][:, std_idx], m["vis"][:, std_idx], m["norm"], a)
            out[f"PCK@{a:g}"][f"mean_{len(std_idx)}_standard"] = s["mean"]
    return out


# ----------------------------------------------------------------------------- 3D
_3D_KEYS = ("joints_cam_mm", "joints_cam", "keypoints_cam", "joint_cam", "keypoints_3d")


def lift_to_camera(uv: np.ndarray, z_norm: np.ndarray, root_depth_mm: float, K: np.ndarray) -> np.ndarray:
    """Back-project pixels + LocLLM root-relative depth (0.zzzzzz) to camera-space mm."""
    z = unit_to_depth(np.asarray(z_norm, float)) + root_depth_mm
    uv = np.asarray(uv, float)
    x = (uv[:, 0] - K[0, 2]) * z / K[0, 0]
    y = (uv[:, 1] - K[1, 2]) * z / K[1, 1]
    return np.stack([x, y, z], 1)


def evaluate_3d(
    gt3d: str | Path | dict,
    preds: str | Path | list,
    root_index: int | None = None,
) -> dict[str, Any]:
    """MPJPE / PA-MPJPE (mm) for a 3D companion (or any JSON whose annotations carry one of
    joints_cam_mm / joints_cam / keypoints_cam / joint_cam / keypoints_3d, [K,3] or flat).

    Predictions: {"ann_id" or "image_id", "keypoints_3d": [x,y,z]*K (camera mm)} or
    {"keypoints": [x,y,s]*K, "z_norm": [K]} which is lifted with the GT root depth and the
    image intrinsics (the standard "known root depth" H36M protocol). Without ann_id, a
    prediction is matched within its image to the GT person with the nearest 2D keypoints.
    root_index defaults to the joint named "pelvis" (else 0).
    """
    g, preds_l = load_json(gt3d), load_json(preds)
    names = g.get("joint_names") or []
    if root_index is None:
        root_index = names.index("pelvis") if "pelvis" in names else 0
    imgs = {im["id"]: im for im in g.get("images", [])}

    def gt_joints(a: dict) -> np.ndarray:
        for key in _3D_KEYS:
            if key in a:
                return np.asarray(a[key], float).reshape(-1, 3)
        raise KeyError("GT annotation without 3D joints")

    anns = g["annotations"]
    by_id = {a["id"]: a for a in anns}
    by_img: dict[Any, list[dict]] = {}
    for a in anns:
        by_img.setdefault(a["image_id"], []).append(a)
    P, G, used = [], [], set()
    for p in preds_l:
        a = by_id.get(p.get("ann_id"))
        if a is None:
            cands = [c for c in by_img.get(p.get("image_id"), []) if c["id"] not in used]
            if not cands:
                continue
            if len(cands) > 1 and "keypoints" in p and all("joints_2d" in c for c in cands):
                uv = np.asarray(p["keypoints"], float).reshape(-1, 3)[:, :2]
                a = min(
                    cands,
                    key=lambda c: float(np.nanmean(np.linalg.norm(np.asarray(c["joints_2d"], float) - uv, axis=1))),
                )
            else:
                a = cands[0]
        used.add(a["id"])
        gj = gt_joints(a)
        if "keypoints_3d" in p:
            pj = np.asarray(p["keypoints_3d"], float).reshape(-1, 3)
        else:
            c = imgs[a["image_id"]]["camera"]
            K = np.array([[c["fx"], 0, c["cx"]], [0, c["fy"], c["cy"]], [0, 0, 1.0]])
            uv = np.asarray(p["keypoints"], float).reshape(-1, 3)[:, :2]
            pj = lift_to_camera(uv, p["z_norm"], float(a.get("root_depth_mm", gj[root_index, 2])), K)
        P.append(pj)
        G.append(gj)
    if not P:
        return {"matched": 0, "gt_persons": len(anns), "MPJPE": float("nan"), "PA-MPJPE": float("nan")}
    Pa, Ga = np.stack(P), np.stack(G)
    return {
        "matched": len(P),
        "gt_persons": len(anns),
        "MPJPE": mpjpe(Pa, Ga, root_index=root_index),
        "PA-MPJPE": pa_mpjpe(Pa, Ga),
    }


# ----------------------------------------------------------------------------- MPII lists
def mpii_list_to_coco(items: list[dict], names: Sequence[str] | None = None) -> dict:
    """Convert an HRNet/LocLLM-style MPII list ({"image","joints","joints_vis","center",
    "scale"}) to a COCO-style GT dict. The box is the usual 200*scale square around
    ``center`` (so PCK norm = 200*scale; the official PCKh head boxes live in MPII's .mat)."""
    k = len(items[0]["joints"])
    names = list(names) if names else [f"joint_{i}" for i in range(k)]
    images, anns = {}, []
    for i, it in enumerate(items):
        img_id = images.setdefault(it["image"], len(images) + 1)
        j = np.asarray(it["joints"], float).reshape(-1, 2)
        v = np.asarray(it.get("joints_vis", np.ones(k)), float).reshape(-1)
        side = 200.0 * float(it.get("scale", 1.0))
        cx, cy = it.get("center", j.mean(0))
        kp = np.concatenate([j, (v > 0)[:, None] * 2.0], 1).reshape(-1).tolist()
        anns.append(
            {
                "id": i + 1,
                "image_id": img_id,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [cx - side / 2, cy - side / 2, side, side],
                "area": side * side,
                "keypoints": kp,
                "num_keypoints": int((v > 0).sum()),
            }
        )
    return {
        "images": [{"id": v, "file_name": k_} for k_, v in images.items()],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "keypoints": names}],
    }
