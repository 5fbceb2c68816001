"""Re-write a checkpoint of ours elsewhere, optionally as a delta of another checkpoint.

python training/repack_checkpoint.py SRC OUT [--delta-of PARENT] [--storage-dtype float16]
                                     [--image-size PIXELS]

A delta checkpoint stores only the tensors that differ from PARENT and records PARENT's
path (relative to OUT) and sha256; loading checks both. Use it to move a delta written by
``train.py --delta-of`` next to its parent (models/demo3d beside models/demo).

``--image-size`` re-grids a checkpoint to another crop size, as the start of a fine-tune at
that size (``train.py --init OUT``): the ViT's patch, projector and LM weights do not depend
on the grid, and a checkpoint that references its pretrained ViT base (``vision_weights``)
stores no position embeddings: they are interpolated from the pretrained ones at load, as
for any new checkpoint. A checkpoint that stores its own ViT base is refused.
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
from locllm_training.model import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--delta-of", type=Path, help="store only the differences from this checkpoint")
    ap.add_argument("--storage-dtype", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--image-size", type=int, help="re-grid to this crop size (a multiple of the patch size)")
    args = ap.parse_args(argv)
    config = json.loads((args.src / "config.json").read_text())
    dtype = args.storage_dtype or config.get("storage_dtype")
    try:
        model = load_checkpoint(args.src, image_size=args.image_size)
    except CheckpointError as e:
        raise SystemExit(f"--image-size: {e}" if args.image_size else str(e)) from None
    regridded = model.config.image_size != config["image_size"]
    # "trained" describes these weights at the crop size they were trained at
    keep = {k: config[k] for k in ("trained",) if k in config and not regridded}
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
