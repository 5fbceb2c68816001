"""Person detection and top-down keypoints on a held-out COCO file (SynthPose val).

    python benchmarks/detection.py --gt data/synthpose/annotations/person_keypoints_val.json \
        [-m demo] [--detector models/person_detector] [--limit N] [--out benchmarks/results/detection_demo.json]

Runs the person detector on every image (scores down to ``BOX_AP_THRESHOLD`` for box AP), then
``Pose.locate`` on the detected boxes (score >= ``--pose-threshold``) and on the ground-truth
boxes, and scores all three with pycocotools (``locllm_sdk.topdown_eval.evaluate_top_down``):
person box AP/AP50, keypoint OKS AP (17 COCO joints) with detected and with ground-truth boxes,
their ratio, and the detector's median time per image.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export"):
    sys.path.insert(0, str(_ROOT / _sub))

from locllm_sdk.coco_files import guess_image_dir, read_coco  # noqa: E402
from locllm_sdk.crop import load_image  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from locllm_sdk.demo import model_path
    from locllm_sdk.person_detector import PersonDetector
    from locllm_sdk.pose import Pose
    from locllm_sdk.topdown_eval import BOX_AP_THRESHOLD, evaluate_top_down

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", required=True, help="COCO keypoints file with person boxes")
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("--detector", help="detector folder (default: the bundled one)")
    ap.add_argument("--limit", type=int, help="first N images")
    ap.add_argument("--pose-threshold", type=float, default=0.3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    doc = read_coco(args.gt)
    folder = guess_image_dir(Path(args.gt), doc)
    images = doc["images"][: args.limit]
    pose = Pose(model_path(args.model))
    detector = PersonDetector(args.detector, score_threshold=BOX_AP_THRESHOLD)
    pairs = ((im["id"], load_image(folder / im["file_name"], exif_orientation=False)) for im in images)
    r = evaluate_top_down(pose, detector, pairs, doc, pose_threshold=args.pose_threshold)
    r["gt"] = Path(args.gt).name
    r["detector"] = str(detector.path.name)
    r["machine"] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    print(json.dumps(r, indent=1))
    print(
        f"\n{r['images']} images, {r['persons']} people: box AP50 {r['box']['AP50']:.3f} (AP {r['box']['AP']:.3f}); "
        f"keypoint AP {r['keypoints_detected_boxes']['AP']:.3f} with detected boxes vs "
        f"{r['keypoints_gt_boxes']['AP']:.3f} with GT boxes (ratio {r['keypoint_ap_ratio']:.3f}); "
        f"detector {r['detector_ms_median']:.2f} ms/image (median)",
        file=sys.stderr,
    )
    if args.out:
        args.out.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
