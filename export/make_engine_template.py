"""Write a checkpoint's engine template: what the runtime assembles its ONNX engine from
without torch (locllm_sdk.engine_assembly; format and guarantee described there).

    python export/make_engine_template.py --checkpoint models/demo
    python export/make_engine_template.py --checkpoint CKPT --engine ENGINE --output CKPT/engine_template

Without --engine the ONNX engine is built first (torch, as export/build_engines.py does) into
a temporary directory. The template goes to CHECKPOINT/engine_template by default, where
``locllm_sdk.demo.engine_for`` finds it; it is assembled and checked byte for byte against the
engine before it is written. Regenerate it whenever the checkpoint or the graph revision changes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("export", "training", "sdk"):
    sys.path.insert(0, str(_ROOT / _sub))  # run from a clone without install


def main(argv: list[str] | None = None) -> int:
    from locllm_sdk.engine_assembly import TEMPLATE_DIR

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (our format)")
    ap.add_argument("--engine", type=Path, help="an ONNX engine already built from it (default: build one)")
    ap.add_argument("--output", type=Path, help=f"template directory (default CHECKPOINT/{TEMPLATE_DIR})")
    args = ap.parse_args(argv)

    from locllm_export.build import build_onnx_engine
    from locllm_export.engine_template import checkpoint_sources, write_engine_template

    output = args.output or args.checkpoint / TEMPLATE_DIR
    with tempfile.TemporaryDirectory(prefix="locllm-template-engine-") as tmp:
        engine = args.engine
        if engine is None:
            start = time.perf_counter()
            engine = Path(tmp) / "engine"
            build_onnx_engine(args.checkpoint, engine)
            print(f"engine built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        report = write_engine_template(engine, args.checkpoint, output, checkpoint_sources(args.checkpoint))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
