"""Build a LocLLM engine directory from a checkpoint.

    python export/build_engines.py --checkpoint ckpt/tiny --output engines/tiny [--targets onnx]

Merges LoRA (fp32, checked), exports the vision tower and the decoder step to ONNX, writes
the embedding table, tokenizer, descriptions and manifest.json, and verifies the graphs in
ONNX Runtime against PyTorch before the directory appears.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("export", "training", "sdk"):
    sys.path.insert(0, str(_ROOT / _sub))  # run from a clone without install

TARGETS = ("onnx",)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (our format)")
    ap.add_argument("--output", required=True, type=Path, help="engine directory to write")
    ap.add_argument("--targets", default="onnx", help=f"comma-separated, from {TARGETS}")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing engine directory")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; available: {', '.join(TARGETS)}")
    from locllm_export.build import ExportVerificationError, build_onnx_engine

    try:
        report = build_onnx_engine(args.checkpoint, args.output, overwrite=args.overwrite)
    except (ExportVerificationError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
