"""Re-write a checkpoint of ours elsewhere, optionally as a delta of another checkpoint.

python training/repack_checkpoint.py SRC OUT [--delta-of PARENT] [--storage-dtype float16]

A delta checkpoint stores only the tensors that differ from PARENT and records PARENT's
path (relative to OUT) and sha256; loading checks both. Use it to move a delta written by
``train.py --delta-of`` next to its parent (models/demo3d beside models/demo).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a clone without install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sdk"))

import torch  # noqa: E402
from locllm_training.model import load_checkpoint, save_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--delta-of", type=Path, help="store only the differences from this checkpoint")
    ap.add_argument("--storage-dtype", choices=("float16", "bfloat16", "float32"))
    args = ap.parse_args(argv)
    config = json.loads((args.src / "config.json").read_text())
    dtype = args.storage_dtype or config.get("storage_dtype")
    model = load_checkpoint(args.src)
    keep = {k: config[k] for k in ("trained",) if k in config}
    save_checkpoint(
        model,
        args.src,
        args.out,
        extra=keep,
        storage_dtype=getattr(torch, dtype) if dtype else None,
        parent=args.delta_of,
    )
    for extra in ("validation.json",):
        if (args.src / extra).is_file():
            shutil.copyfile(args.src / extra, args.out / extra)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MB" + (f", a delta of {args.delta_of})" if args.delta_of else ")"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
