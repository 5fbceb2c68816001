#!/usr/bin/env python
"""Fit the calibrated keypoint confidence of a model (Platt scaling of the official score) and
report it on a held-out split.

    python training/make_synthpose.py --output data/synthcal --images 100 --split test --seed 300
    python training/calibrate_confidence.py -m demo \
        --fit data/synthcal/annotations/person_keypoints_test.json \
        --eval data/synthpose/annotations/person_keypoints_val.json --write-config models/demo

Prediction runs with the ground-truth boxes (``locllm predict``'s ``predict_coco``); a keypoint is
correct when within PCK@0.1 of the truth. ``--write-config`` records the fit in the checkpoint's
config.json (``confidence_calibration``); engines built from it carry it in their manifest
(``confidence``) and ``Keypoint.confidence`` reports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sdk"))

from locllm_sdk.coco_files import read_coco  # noqa: E402
from locllm_sdk.demo import model_path  # noqa: E402
from locllm_sdk.loader import CONFIDENCE_FIELD, read_config  # noqa: E402
from locllm_sdk.pose import Pose  # noqa: E402
from locllm_sdk.predict import predict_coco  # noqa: E402
from locllm_training.calibration import calibration_of, correctness, name_of, report  # noqa: E402


def scored(pose: Pose, gt_json: str, limit: int | None):
    doc = read_coco(gt_json)
    preds = predict_coco(pose, gt_json, limit=limit, progress=False)
    kept = {p["image_id"] for p in preds}
    sub = doc | {
        "images": [im for im in doc["images"] if im["id"] in kept],
        "annotations": [a for a in doc["annotations"] if a["image_id"] in kept],
    }
    return correctness(sub, preds), len(kept)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="demo", help="engine dir, checkpoint, or demo (default)")
    ap.add_argument("--fit", required=True, help="COCO keypoints file to fit on (never trained on)")
    ap.add_argument("--eval", help="COCO keypoints file to report on")
    ap.add_argument("--limit", type=int, help="first N images of each file")
    ap.add_argument("--write-config", type=Path, help="checkpoint whose config.json records the fit")
    args = ap.parse_args(argv)
    pose = Pose(model_path(args.model))
    (scores, correct), n = scored(pose, args.fit, args.limit)
    cal = calibration_of(scores, correct, name_of(args.fit, n))
    out = {
        "calibration": cal.to_dict(),
        "fit": {"raw_score": report(scores, correct), "confidence": report(cal(scores), correct)},
    }
    if args.eval:
        (s2, c2), _ = scored(pose, args.eval, args.limit)
        out["eval"] = {"file": Path(args.eval).name, "raw_score": report(s2, c2), "confidence": report(cal(s2), c2)}
    if args.write_config:
        cfg_path = args.write_config / "config.json"
        cfg = read_config(args.write_config)
        cfg[CONFIDENCE_FIELD] = cal.to_dict()
        tmp = cfg_path.with_name("config.json.partial")
        tmp.write_text(json.dumps(cfg, indent=2) + "\n")
        tmp.replace(cfg_path)
        out["written"] = str(cfg_path)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
