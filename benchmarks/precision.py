"""Reduced-precision (int8) vs fp32 ONNX engine: answer agreement and per-person latency, side by side.

    python benchmarks/precision.py --gt data/synthpose/annotations/person_keypoints_val.json \
        [--engine FP32_ENGINE] [--reduced INT8_ENGINE] [--vision-precision int8] [--decoder-precision int8] \
        [--images 20] [--out benchmarks/results/precision_demo.json]

``--engine`` defaults to the bundled demo model's engine. ``--reduced``: an existing reduced
engine, or where to build one from ``--engine`` (``quantize.reduce_engine``, forced: the
benchmark reports the agreement whatever it is). Each val image (ground-truth boxes, COCO-17 +
neck + pelvis) runs through ``pipeline.locate_in_image`` on both engines in turn, alternating
which goes first, so both see the same machine load; per-person latency is one call's wall time
over its people, reported as medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export"):
    sys.path.insert(0, str(_ROOT / _sub))

from locllm_sdk.coco_files import guess_image_dir, read_coco  # noqa: E402
from locllm_sdk.crop import load_image  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import onnxruntime
    from locllm_export.quantize import EXTRA_KEYPOINTS, PRECISIONS, reduce_engine
    from locllm_sdk import loader
    from locllm_sdk.demo import engine_for, resolve_model
    from locllm_sdk.descriptions import coco17
    from locllm_sdk.pipeline import locate_in_image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", required=True, help="COCO keypoints file with person boxes")
    ap.add_argument("--engine", type=Path, help="fp32 engine (default: the demo model's)")
    ap.add_argument("--reduced", type=Path, default=Path("engines/demo-int8"), help="reduced engine (built if absent)")
    ap.add_argument("--vision-precision", choices=PRECISIONS, default="int8")
    ap.add_argument("--decoder-precision", choices=PRECISIONS, default="int8")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads per engine (default: its own choice)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    fp32_dir = args.engine or engine_for(resolve_model("demo"))
    if not args.reduced.exists():
        reduce_engine(
            fp32_dir, args.reduced, args.vision_precision, args.decoder_precision, force=True, calibration_images=1
        )
    doc = read_coco(args.gt)
    folder = guess_image_dir(Path(args.gt), doc)
    boxes_of: dict[int, list] = {}
    for a in doc["annotations"]:
        boxes_of.setdefault(a["image_id"], []).append(a["bbox"])
    images = [im for im in doc["images"] if boxes_of.get(im["id"])][: args.images]

    engines = {
        "fp32": loader.load(fp32_dir, "onnxruntime", threads=args.threads),
        "reduced": loader.load(args.reduced, "onnxruntime", threads=args.threads),
    }
    requests = engines["fp32"].library.resolve([*coco17().keypoints, *EXTRA_KEYPOINTS])
    per_person = {name: [] for name in engines}
    same = total = persons = 0
    shifts: list[float] = []  # per answer: distance between the two engines' points, image pixels
    load_before = os.getloadavg()
    for n, im in enumerate(images):
        image = load_image(folder / im["file_name"], exif_orientation=False)
        boxes = boxes_of[im["id"]]
        order = list(engines) if n % 2 == 0 else list(engines)[::-1]
        texts, values = {}, {}
        for name in order:
            m = engines[name]
            t0 = time.perf_counter()
            out = locate_in_image(m.backend, m.spec, image, boxes, requests)
            per_person[name].append((time.perf_counter() - t0) * 1000 / len(boxes))
            texts[name], values[name] = out.texts, out.values[..., :2]
        for a, b in zip(texts["fp32"], texts["reduced"]):
            same += sum(x == y for x, y in zip(a, b))
            total += len(a)
        persons += len(boxes)
        shifts.extend(np.linalg.norm(values["fp32"] - values["reduced"], axis=-1).ravel())
        print(f"image {n + 1}/{len(images)}: {same}/{total} identical so far", file=sys.stderr)
    medians = {name: float(np.median(v)) for name, v in per_person.items()}
    precision = engines["reduced"].manifest.precision
    r = {
        "fp32_engine": str(fp32_dir),
        "reduced_engine": str(args.reduced),
        "reduced_precision": {"vision": precision.vision, "decoder": precision.decoder},
        "images": len(images),
        "persons": persons,
        "keypoints": len(requests),
        "identical_answers": same,
        "answers": total,
        "agreement": same / total if total else 0.0,
        "point_shift_px": {q: float(np.percentile(shifts, p)) for q, p in (("p50", 50), ("p90", 90), ("max", 100))},
        "per_person_ms_median": medians,
        "speedup_of_medians": medians["fp32"] / medians["reduced"],
        "per_person_ms": per_person,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "onnxruntime": onnxruntime.__version__,
        },
    }
    print(json.dumps({k: v for k, v in r.items() if k != "per_person_ms"}, indent=1))
    print(
        f"\n{persons} people x {len(requests)} keypoints: {same}/{total} ({r['agreement']:.1%}) answers identical; "
        f"per-person median fp32 {medians['fp32']:.0f} ms vs {precision.vision}/{precision.decoder} "
        f"{medians['reduced']:.0f} ms ({r['speedup_of_medians']:.2f}x)",
        file=sys.stderr,
    )
    if args.out:
        args.out.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
