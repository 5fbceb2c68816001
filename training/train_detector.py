#!/usr/bin/env python
"""Train the bundled person detector on SynthPose (HF Trainer), export it to ONNX and score it.

    python training/train_detector.py --train-coco data/synthdet/annotations/person_keypoints_train.json \
        --val-coco data/synthpose/annotations/person_keypoints_val.json --output runs/person_detector --steps 900
    python training/train_detector.py --evaluate models/person_detector --val-coco VAL.json

Writes OUTPUT/model.onnx and OUTPUT/detector.json (input size, normalisation, stride, sha256,
training facts, box AP on the val file); resumes from OUTPUT/trainer/checkpoint-* when rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sdk"))

from locllm_training.detector import DetectorTrainConfig, evaluate_boxes, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-coco")
    ap.add_argument("--val-coco", required=True)
    ap.add_argument("--output")
    ap.add_argument("--evaluate", type=Path, help="only score this detector folder on --val-coco")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--view", type=int, default=192, help="training view size in px (multiple of 32)")
    args = ap.parse_args(argv)
    if args.evaluate:
        print(json.dumps(evaluate_boxes(args.evaluate, args.val_coco), indent=1))
        return 0
    if not (args.train_coco and args.output):
        ap.error("training needs --train-coco and --output")
    cfg = DetectorTrainConfig(
        args.train_coco,
        args.val_coco,
        args.output,
        args.steps,
        args.batch_size,
        args.lr,
        seed=args.seed,
        workers=args.workers,
        view=args.view,
    )
    out = train(cfg)
    print(json.dumps(json.loads((out / "detector.json").read_text()), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
