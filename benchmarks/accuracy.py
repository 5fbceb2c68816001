#!/usr/bin/env python
"""Score keypoint predictions: COCO OKS AP/AR, PCK@0.05/0.1 and (with 3D) MPJPE/PA-MPJPE.

    python benchmarks/accuracy.py --gt person_keypoints_val.json --pred results.json [--json]
    python benchmarks/accuracy.py --gt3d synthpose3d_val.json --pred results3d.json

--gt: a COCO keypoints file (real COCO, SynthPose, or an MPII list converted on the fly).
--pred: the standard COCO results list [{"image_id","category_id","keypoints","score"}]
(optional "ann_id" pins a prediction to a GT person). Definitions: locllm_sdk.evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import locllm_sdk.evaluation  # noqa: F401
except ImportError:  # run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk"))

from locllm_sdk import evaluation as ev


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", help="COCO keypoints GT json (or an MPII-style list json)")
    ap.add_argument("--gt3d", help="3D GT (SynthPose synthpose3d_*.json or compatible)")
    ap.add_argument("--pred", required=True, help="predictions json (COCO results list)")
    ap.add_argument("--alphas", default="0.05,0.1", help="PCK thresholds (fraction of box size)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = ap.parse_args(argv)
    if not args.gt and not args.gt3d:
        ap.error("give --gt and/or --gt3d")
    preds = ev.load_json(args.pred)
    result: dict = {}
    if args.gt:
        gt = ev.load_json(args.gt)
        if isinstance(gt, list):
            gt = ev.mpii_list_to_coco(gt)
            if preds and "joints" in preds[0]:  # MPII-style predictions, same order as GT
                preds = [
                    {
                        "image_id": a["image_id"],
                        "ann_id": a["id"],
                        "category_id": 1,
                        "score": 1.0,
                        "keypoints": [c for xy in p["joints"] for c in (*xy[:2], 1.0)],
                    }
                    for p, a in zip(preds, gt["annotations"], strict=True)
                ]
        alphas = [float(a) for a in args.alphas.split(",") if a]
        result |= ev.evaluate_2d(gt, preds, alphas)
    if args.gt3d:
        preds3d = [p for p in preds if "keypoints_3d" in p or "z_norm" in p]
        result["3d"] = ev.evaluate_3d(args.gt3d, preds3d)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    if "coco" in result:
        c = result["coco"]
        print("COCO OKS  " + "  ".join(f"{k} {v:.4f}" for k, v in c.items()))
        print(f"matched {result['matched']}/{result['gt_persons']} GT persons")
        for key, r in result.items():
            if key.startswith("PCK@"):
                std = [f"{k.split('_')[1]} standard joints {v:.4f}" for k, v in r.items() if k.startswith("mean_")]
                print(f"{key}  mean {r['mean']:.4f}" + (f"  ({std[0]})" if std else ""))
                for n, v in r["per_joint"].items():
                    print(f"    {n:16s} {'-' if v is None else f'{v:.4f}'}")
    if "3d" in result:
        r = result["3d"]
        print(
            f"3D: matched {r['matched']}/{r['gt_persons']}  MPJPE {r['MPJPE']:.2f} mm  PA-MPJPE {r['PA-MPJPE']:.2f} mm"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
