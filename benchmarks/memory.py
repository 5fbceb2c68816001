"""Peak memory of one ``Pose.locate`` call against the number of person boxes.

    python benchmarks/memory.py [--engine ENGINE | -m demo] [--boxes 1,10,100,1000] [--budget-mb 1024]

Each count runs in a fresh process (peak RSS only grows within a process): load the engine,
locate the 17 COCO keypoints for N boxes on a 640x480 image, report the process's peak RSS
before and after the call and the wall time. The pipeline chunks crops and rows under
``memory_budget_mb``, so the peak should stop growing once a chunk is full.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export"):
    sys.path.insert(0, str(_ROOT / _sub))


def _boxes(n: int, w: int, h: int, seed: int = 0) -> list[list[float]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bw, bh = rng.uniform(0.2, 0.6) * w, rng.uniform(0.3, 0.9) * h
        out.append([float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)])
    return out


def measure(engine: str, n: int, budget_mb: float) -> dict:
    """One count, in this process."""
    import numpy as np
    from locllm_sdk import Pose

    pose = Pose(engine, memory_budget_mb=budget_mb)
    img = np.random.default_rng(1).integers(0, 255, (480, 640, 3)).astype(np.uint8)
    boxes = _boxes(n, 640, 480)
    pose.locate(img, "coco17", boxes[:1])  # warm-up: sessions' first-run allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    res = pose.locate(img, "coco17", boxes)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "boxes": n,
        "persons": len(res),
        "peak_rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "seconds": round(seconds, 2),
        "decoder_passes": res.info["decoder_passes"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", help="engine directory")
    ap.add_argument("-m", "--model", default="demo", help="a checkpoint (its cached engine) when no --engine")
    ap.add_argument("--boxes", default="1,10,100,1000")
    ap.add_argument("--budget-mb", type=float, default=1024.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a single count, in this process
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure(args.engine, args.one, args.budget_mb)))
        return 0
    engine = args.engine
    if engine is None:
        from locllm_sdk.demo import engine_for, resolve_model

        engine = str(engine_for(resolve_model(args.model)))
    rows = []
    for n in (int(v) for v in args.boxes.split(",")):
        cmd = [sys.executable, __file__, "--engine", engine, "--one", str(n), "--budget-mb", str(args.budget_mb)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['boxes']:>6} boxes: peak RSS {r['peak_rss_mb']:>8.1f} MB"
            f" (before the call {r['peak_rss_before_mb']:.1f}), {r['seconds']:.1f} s,"
            f" {r['decoder_passes']} decoder passes",
            flush=True,
        )
    if len(rows) > 1:
        big = {r["boxes"]: r["peak_rss_mb"] for r in rows}
        if 100 in big and 1000 in big:
            print(f"growth from 100 to 1000 boxes: {big[1000] - big[100]:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps({"engine": engine, "budget_mb": args.budget_mb, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
