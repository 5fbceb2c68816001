"""Throughput of `locllm annotate` (Ray Data) with 1 and 2 Pose actors.

    python benchmarks/annotate_speed.py [--images 200] [--workers 1,2] [--model demo] [--out results.json]

Renders --images SynthPose images (seed 200, as the val split) into a temporary folder, then
annotates them from their COCO file (ground-truth boxes) once per worker count into a fresh
results file; images/s is the annotate() wall time with Ray already started (actor start-up
and engine loads included). Ray runs embedded on this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import ray
    from locllm_sdk.annotate import annotate
    from locllm_sdk.demo import engine_for, resolve_model

    sys.path.insert(0, str(ROOT / "training"))
    from make_synthpose import main as render

    engine = engine_for(resolve_model(args.model))
    rows = []
    with tempfile.TemporaryDirectory(prefix="annotate-speed-") as tmp:
        data = Path(tmp) / "synthpose"
        assert render(["--output", str(data), "--images", str(args.images), "--split", "val", "--seed", "200"]) == 0
        gt = data / "annotations" / "person_keypoints_val.json"
        persons = len(json.loads(gt.read_text())["annotations"])
        ray.init(include_dashboard=False, log_to_driver=False)
        try:
            for workers in (int(w) for w in args.workers.split(",")):
                start = time.perf_counter()
                s = annotate(gt, engine, Path(tmp) / f"out{workers}.json", workers=workers,
                             batch_size=args.batch_size, progress=False)  # fmt: skip
                wall = time.perf_counter() - start
                settings = json.loads((Path(tmp) / f"out{workers}.json.parts" / "run.json").read_text())
                row = {
                    "workers": workers,
                    "threads_per_worker": settings["threads"],
                    "images": s.total,
                    "persons": persons,
                    "done": s.done,
                    "failed": s.failed,
                    "wall_s": round(wall, 2),
                    "images_per_s": round(s.total / wall, 3),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            ray.shutdown()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
