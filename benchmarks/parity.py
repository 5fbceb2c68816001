"""Accuracy parity of every backend of an engine against the PyTorch reference.

    python benchmarks/parity.py --checkpoint CKPT_DIR --engine ENGINE_DIR [--images N] [--json out.json]

For each backend the engine holds, and the machine can run, it locates the same keypoints
on the same crops as the torch backend (the unmerged checkpoint, LoRA live) and reports the
exact-match rate of the decoded answers, the max coordinate difference in pixels and the
max score difference. Exits non-zero when a backend that claims parity disagrees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training"):
    sys.path.insert(0, str(_ROOT / _sub))

from locllm_sdk import Pose  # noqa: E402
from locllm_sdk.manifest import read_manifest  # noqa: E402

SCORE_TOLERANCE = 1e-4
DEFAULT_KEYPOINTS = "coco17"


def test_images(n: int, seed: int) -> list[tuple[np.ndarray, list[list[float]]]]:
    """Deterministic images with 1-3 person boxes: smooth colour fields with shapes, so
    crops differ in content and scale."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(160, 480)), int(rng.integers(160, 480))
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 255, 3)
        for _ in range(12):
            c = tuple(int(v) for v in rng.integers(0, 255, 3))
            cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(5, 60)), c, -1)
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = rng.uniform(0.25, 0.9) * w, rng.uniform(0.25, 0.9) * h
            boxes.append([float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)])
        out.append((img, boxes))
    return out


def gt_images(gt_json: Path, n: int) -> tuple[list, dict]:
    """(image, boxes, ann_ids, image_id) of the first n images of a COCO-keypoints file, and
    the ground truth restricted to them."""
    from locllm_sdk.coco_files import guess_image_dir
    from locllm_sdk.crop import load_image

    doc = json.loads(gt_json.read_text())
    image_dir = guess_image_dir(gt_json, doc)
    anns: dict[int, list] = {}
    for a in doc["annotations"]:
        if not a.get("iscrowd") and a.get("num_keypoints", 1) > 0:
            anns.setdefault(a["image_id"], []).append(a)
    data = []
    for im in doc["images"]:
        if im["id"] not in anns:
            continue
        img = load_image(image_dir / im["file_name"], exif_orientation=False)
        data.append((img, [a["bbox"] for a in anns[im["id"]]], [a["id"] for a in anns[im["id"]]], im["id"]))
        if len(data) >= n:
            break
    keep = {d[3] for d in data}
    sub = {
        **doc,
        "images": [i for i in doc["images"] if i["id"] in keep],
        "annotations": [a for a in doc["annotations"] if a["image_id"] in keep],
    }
    return data, sub


def accuracy(pose: Pose, data, gt_doc: dict) -> dict:
    """PCK@0.05/0.1 and COCO AP of the 17 COCO joints with ground-truth boxes."""
    from locllm_sdk.evaluation import evaluate_2d

    preds = []
    for img, boxes, ann_ids, image_id in data:
        res = pose.locate(img, "coco17", boxes)
        for person, ann_id in zip(res, ann_ids):
            preds.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "ann_id": ann_id,
                    "score": person.score,
                    "keypoints": person.numpy().reshape(-1).tolist(),
                }
            )
    gt17 = {
        **gt_doc,
        "annotations": [{k: v for k, v in a.items() if not k.endswith("_ext")} for a in gt_doc["annotations"]],
    }
    r = evaluate_2d(gt17, preds)
    return {"AP": r["coco"]["AP"], "PCK@0.05": r["PCK@0.05"]["mean"], "PCK@0.1": r["PCK@0.1"]["mean"]}


def compare(reference: Pose, candidate: Pose, data, keypoints) -> dict:
    total = same = 0
    max_px = max_score = 0.0
    for img, boxes in data:
        a = reference.locate(img, keypoints, boxes)
        b = candidate.locate(img, keypoints, boxes)
        for pa, pb in zip(a, b):
            for ka, kb in zip(pa, pb):
                total += 1
                same += ka.answer == kb.answer
                max_px = max(max_px, float(np.hypot(ka.x - kb.x, ka.y - kb.y)))
                max_score = max(max_score, abs(ka.score - kb.score))
    return {"pairs": total, "exact_match": same / total, "max_coord_diff_px": max_px, "max_score_diff": max_score}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--engine", required=True, type=Path)
    ap.add_argument("--images", type=int, default=8, help="number of test images (1-3 persons each)")
    ap.add_argument("--keypoints", default=DEFAULT_KEYPOINTS, help="skeleton name or comma-separated names")
    ap.add_argument("--decoding", default="constrained", choices=("constrained", "free"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gt", type=Path, help="COCO-keypoints file (e.g. SynthPose val): also PCK/AP per backend")
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args(argv)
    keypoints = args.keypoints if "," not in args.keypoints else [k.strip() for k in args.keypoints.split(",")]
    manifest = read_manifest(args.engine)
    gt_doc = None
    if args.gt:
        gt_data, gt_doc = gt_images(args.gt, args.images)
        data = [(img, boxes) for img, boxes, _, _ in gt_data]
    else:
        data = test_images(args.images, args.seed)
    reference = Pose(args.checkpoint, backend="torch", decoding=args.decoding)
    rows, failed = [], False
    for backend in manifest.backends:
        try:
            candidate = Pose(args.engine, backend=backend, decoding=args.decoding)
        except Exception as e:  # a backend this machine cannot run is reported, not hidden
            rows.append({"backend": backend, "status": f"not run: {e}"})
            continue
        entry = manifest.backends[backend]
        # a backend may record its own decoder precision (tensorrt: fp16/bf16/fp8)
        precision = getattr(entry, "decoder_precision", None) or manifest.precision.decoder
        r = compare(reference, candidate, data, keypoints)
        claims_parity = precision == "fp32"
        if gt_doc is not None:
            r["accuracy"] = accuracy(candidate, gt_data, gt_doc)
        ok = r["exact_match"] == 1.0 and r["max_score_diff"] <= SCORE_TOLERANCE
        failed |= claims_parity and not ok
        rows.append(
            {
                "backend": backend,
                "precision": precision,
                **r,
                "status": "ok" if ok else ("FAIL" if claims_parity else "differs (reduced precision)"),
            }
        )
    print(f"parity vs torch reference ({args.checkpoint}), {args.images} images, decoding={args.decoding}")
    print(f"{'backend':<14}{'precision':<11}{'pairs':>7}{'exact':>9}{'max px':>10}{'max score':>12}  status")
    for r in rows:
        if "pairs" in r:
            print(
                f"{r['backend']:<14}{r['precision']:<11}{r['pairs']:>7}{r['exact_match']:>9.4f}"
                f"{r['max_coord_diff_px']:>10.4f}{r['max_score_diff']:>12.2e}  {r['status']}"
            )
        else:
            print(f"{r['backend']:<14}{'':<11}{'':>7}{'':>9}{'':>10}{'':>12}  {r['status']}")
    if gt_doc is not None:
        ref_acc = accuracy(reference, gt_data, gt_doc)
        print(f"\naccuracy on {args.gt} ({len(gt_data)} images, ground-truth boxes, COCO-17 joints)")
        print(f"{'backend':<14}{'AP':>8}{'PCK@0.05':>10}{'PCK@0.1':>10}")
        table = [("torch (ref)", ref_acc)] + [(r["backend"], r["accuracy"]) for r in rows if "accuracy" in r]
        for name, acc in table:
            print(f"{name:<14}{acc['AP']:>8.3f}{acc['PCK@0.05']:>10.3f}{acc['PCK@0.1']:>10.3f}")
        rows.append({"backend": "torch (reference)", "accuracy": ref_acc})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
