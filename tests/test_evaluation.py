"""locllm_sdk.evaluation: COCO AP, PCK, matching, MPJPE / PA-MPJPE and the accuracy CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from locllm_sdk import evaluation as ev

ROOT_DIR = Path(__file__).resolve().parents[1]


def _gt(n_img: int = 6, seed: int = 0) -> dict:
    """Small COCO keypoints GT: 1-2 persons per image, some joints unlabelled."""
    rng = np.random.default_rng(seed)
    anns = []
    for img in range(1, n_img + 1):
        for _ in range(1 + img % 2):
            x0, y0 = rng.uniform(0, 300, 2)
            w, h = rng.uniform(60, 200, 2)
            kp = np.zeros((17, 3))
            kp[:, 0] = x0 + rng.uniform(0, w, 17)
            kp[:, 1] = y0 + rng.uniform(0, h, 17)
            kp[:, 2] = rng.choice([1, 2], 17)
            kp[rng.random(17) < 0.15] = 0
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "keypoints": kp.ravel().tolist(),
                    "num_keypoints": int((kp[:, 2] > 0).sum()),
                }
            )
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 500, "height": 500} for i in range(1, n_img + 1)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person", "keypoints": ev.COCO17_NAMES, "skeleton": [[16, 14]]}],
    }


def _preds(gt: dict, noise: float, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for a in gt["annotations"]:
        kp = np.array(a["keypoints"], float).reshape(-1, 3)
        kp[:, :2] += rng.normal(0, 1, (17, 2)) * noise * max(a["bbox"][2:])
        kp[:, 2] = 1.0
        out.append({"image_id": a["image_id"], "category_id": 1, "score": 0.9, "keypoints": kp.ravel().tolist()})
    return out


def test_ground_truth_scores_perfectly() -> None:
    gt = _gt()
    res = ev.evaluate_2d(gt, _preds(gt, 0.0))
    assert res["coco"]["AP"] == pytest.approx(1.0) and res["coco"]["AR"] == pytest.approx(1.0)
    assert res["PCK@0.05"]["mean"] == 1.0 and res["PCK@0.1"]["mean"] == 1.0
    assert res["matched"] == res["gt_persons"] == len(gt["annotations"])


def test_noise_lowers_scores_monotonically() -> None:
    gt = _gt(10)
    aps, pcks = [], []
    for noise in (0.0, 0.02, 0.05, 0.1, 0.2):
        r = ev.evaluate_2d(gt, _preds(gt, noise))
        aps.append(r["coco"]["AP"])
        pcks.append(r["PCK@0.05"]["mean"])
    assert all(a > b for a, b in zip(aps, aps[1:], strict=False)), aps
    assert all(a > b for a, b in zip(pcks, pcks[1:], strict=False)), pcks
    assert aps[-1] < 0.3 and pcks[-1] < 0.6


def test_pck_hand_computed() -> None:
    gt = np.zeros((2, 3, 2))
    pred = gt.copy()
    pred[0, :, 0] = [1.0, 4.0, 11.0]  # norm 100: alpha 0.05 -> 5 px, alpha 0.1 -> 10 px
    pred[1, :, 0] = [np.nan, 0.0, 30.0]
    vis = np.array([[2, 1, 2], [2, 2, 0]])
    r = ev.pck(pred, gt, vis, np.array([100.0, 100.0]), 0.05)
    np.testing.assert_allclose(r["per_joint"], [0.5, 1.0, 0.0])
    assert r["mean"] == pytest.approx(3 / 5)
    assert ev.pck(pred, gt, vis, np.array([100.0, 100.0]), 0.2)["mean"] == pytest.approx(4 / 5)


def test_matching_by_ann_id_and_by_oks() -> None:
    gt = _gt(4)
    preds = _preds(gt, 0.0)
    swapped = preds[::-1]  # order does not matter with OKS matching
    m = ev.match_predictions(gt, swapped)
    assert (m["pred_index"] >= 0).all()
    np.testing.assert_allclose(np.nan_to_num(m["pred_xy"]), m["gt_xy"])
    # explicit ann_id wins even when the keypoints are far away
    wrong = [
        dict(p, ann_id=a["id"], keypoints=(np.array(p["keypoints"]) + 500).tolist())
        for p, a in zip(preds, gt["annotations"], strict=True)
    ]
    m2 = ev.match_predictions(gt, wrong)
    assert list(m2["pred_index"]) == list(range(len(wrong)))
    assert ev.pck(m2["pred_xy"], m2["gt_xy"], m2["vis"], m2["norm"], 0.1)["mean"] == 0.0


def test_mpjpe_and_pa_mpjpe() -> None:
    rng = np.random.default_rng(0)
    gt = rng.normal(0, 300, (5, 17, 3))
    assert ev.mpjpe(gt + [10.0, 0, 0], gt) == pytest.approx(10.0)
    assert ev.mpjpe(gt + [10.0, 0, 0], gt, root_index=0) == pytest.approx(0.0, abs=1e-9)
    a = np.radians(40)
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    moved = 1.7 * gt @ R.T + [100.0, -50, 3000]
    assert ev.mpjpe(moved, gt) > 100
    assert ev.pa_mpjpe(moved, gt) == pytest.approx(0.0, abs=1e-6)
    mirrored = gt * [-1, 1, 1]  # a reflection is not a rotation: must stay > 0
    assert ev.pa_mpjpe(mirrored, gt) > 1.0
    noisy = gt + rng.normal(0, 20, gt.shape)
    assert 0 < ev.pa_mpjpe(noisy, gt) < ev.mpjpe(noisy, gt)


def test_synthpose_files_end_to_end(tmp_path: Path) -> None:
    """SynthPose GT as predictions: AP 1 (17 and 22 joints), 3D via z_norm lifting = 0 mm."""
    sys.path.insert(0, str(ROOT_DIR / "training"))
    from make_synthpose import main

    main(["--output", str(tmp_path), "--images", "4", "--size", "128", "--persons", "2-2"])
    gt_path = tmp_path / "annotations" / "person_keypoints_train.json"
    gt = json.loads(gt_path.read_text())
    comp = json.loads((tmp_path / "annotations" / "synthpose3d_train.json").read_text())
    z = {a["id"]: a["z_norm"] for a in comp["annotations"]}
    for field in ("keypoints", "keypoints_ext"):
        preds = [
            {"image_id": a["image_id"], "category_id": 1, "score": 1.0, "keypoints": a[field], "z_norm": z[a["id"]]}
            for a in gt["annotations"]
            if a["num_keypoints"] > 0
        ]
        assert ev.coco_ap(gt_path, preds)["AP"] == pytest.approx(1.0)
    preds_path = tmp_path / "pred.json"
    full = [
        {
            "image_id": a["image_id"],
            "ann_id": a["id"],
            "category_id": 1,
            "score": 1.0,
            "keypoints": [c for xy in a["joints_2d"] for c in (*xy, 1.0)],
            "z_norm": a["z_norm"],
        }
        for a in comp["annotations"]
    ]
    preds_path.write_text(json.dumps(full))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT_DIR / "benchmarks" / "accuracy.py"),
            "--gt",
            str(gt_path),
            "--gt3d",
            str(tmp_path / "annotations" / "synthpose3d_train.json"),
            "--pred",
            str(preds_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(out.stdout)
    assert res["coco"]["AP"] == pytest.approx(1.0)
    assert res["PCK@0.05"]["mean"] == 1.0
    assert res["3d"]["matched"] == len(full) and res["3d"]["MPJPE"] < 1.0
    assert res["3d"]["PA-MPJPE"] < 1.0
    # extended joints far off: the overall mean drops, the standard 17 joints' mean does not
    for p in full:
        p["keypoints"][17 * 3 :: 3] = [x + 1000 for x in p["keypoints"][17 * 3 :: 3]]
    r = ev.evaluate_2d(gt_path, full)["PCK@0.1"]
    assert r["mean_17_standard"] == 1.0 and r["mean"] < 0.9
