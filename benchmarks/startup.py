"""Start-up of the CLI and of ``Pose`` with checksums hashed at every start vs remembered.

    python benchmarks/startup.py [-m demo] [--repeat 5] [--out benchmarks/results/startup_demo.json]

"before" is the behaviour without the checksum record (every engine file hashed at every
start: ``verify="always"``, and the CLI with an empty record folder); "after" is the default
(``verify="cached"``: files unchanged since they were hashed are not hashed again). The CLI
runs ``locllm locate IMAGE --box ... -k nose`` in a fresh process (interpreter start, imports,
engine load, one keypoint); runs alternate before/after so load on the machine falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export"):
    sys.path.insert(0, str(_ROOT / _sub))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from locllm_sdk.demo import engine_for, resolve_model
    from locllm_sdk.pose import Pose

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="demo")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    engine = engine_for(resolve_model(args.model))
    image = _ROOT / "tests" / "data" / "astronaut.jpg"
    size = sum(f.stat().st_size for f in engine.rglob("*") if f.is_file())
    pose_s = {"before": [], "after": []}
    cli_s = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        env = {**os.environ, "LOCLLM_CACHE": str(warm)}
        Pose(engine)  # fills the default record for in-process "after"
        cmd = [sys.executable, "-m", "locllm_sdk.cli", "locate", str(image), "-m", str(engine)]
        cmd += ["--box", "10,10,200,300", "-k", "nose", "--json"]
        subprocess.run(cmd, env=env, capture_output=True, check=True)  # fills the warm record
        for i in range(args.repeat):
            for label, verify in (("before", "always"), ("after", "cached")):
                t0 = time.perf_counter()
                Pose(engine, verify=verify)
                pose_s[label].append(time.perf_counter() - t0)
            for label in ("before", "after"):
                cache = Path(tmp) / f"cold{i}" if label == "before" else warm  # an empty record: everything hashed
                t0 = time.perf_counter()
                subprocess.run(cmd, env={**os.environ, "LOCLLM_CACHE": str(cache)}, capture_output=True, check=True)
                cli_s[label].append(time.perf_counter() - t0)
    med = {k: {s: float(np.median(v[s])) for s in v} for k, v in (("pose", pose_s), ("cli", cli_s))}
    out = {
        "engine_bytes": size,
        "repeat": args.repeat,
        "median_s": med,
        "runs_s": {"pose": pose_s, "cli": cli_s},
    }
    print(json.dumps(out, indent=1))
    print(
        f"Pose(): {med['pose']['before']:.2f} s hashing every start -> {med['pose']['after']:.2f} s remembered; "
        f"CLI locate: {med['cli']['before']:.2f} s -> {med['cli']['after']:.2f} s (medians of {args.repeat})",
        file=sys.stderr,
    )
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
