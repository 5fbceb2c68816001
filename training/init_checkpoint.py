"""Write a random-weight LocLLM checkpoint in our format.

python training/init_checkpoint.py --preset tiny --output ckpt/tiny [--seed 0] [--dims 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a clone without install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sdk"))

from locllm_training.init import init_checkpoint  # noqa: E402
from locllm_training.presets import PRESETS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ap.add_argument(
        "--legacy", action="store_true", help="tokenizer_config legacy: true (default false, as Vicuna v1.5)"
    )
    ap.add_argument("--image-size", type=int, help="crop size (multiple of 14); default from the preset")
    ap.add_argument(
        "--teach-format",
        type=int,
        default=0,
        metavar="STEPS",
        help="fit the random model STEPS steps to answer in the protocol's format (benchmarks, tests)",
    )
    ap.add_argument(
        "--teach-format-layers",
        type=int,
        metavar="N",
        help="fit only the last N LM layers, the final norm and the LM head (default: every weight)",
    )
    ap.add_argument("--teach-format-lr", type=float, help="learning rate of the format fit (default: by width)")
    ap.add_argument("--teach-format-batch", type=int, default=4, metavar="N", help="samples per step (default 4)")
    ap.add_argument(
        "--teach-format-warmup", type=int, default=0, metavar="STEPS", help="linear learning-rate warm-up (default 0)"
    )
    ap.add_argument(
        "--teach-format-check-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="check greedy answers every STEPS steps and stop once they are well-formed (default: no check)",
    )
    args = ap.parse_args(argv)
    if args.teach_format_batch < 1 or min(args.teach_format_warmup, args.teach_format_check_every) < 0:
        # checked before a 1B-class model is built
        ap.error("--teach-format-batch must be >= 1, --teach-format-warmup and --teach-format-check-every >= 0")
    if args.teach_format_layers is not None:
        layers = PRESETS[args.preset]["llm"]["num_hidden_layers"]
        if not args.teach_format:
            ap.error("--teach-format-layers needs --teach-format STEPS")
        if not 0 <= args.teach_format_layers <= layers:
            ap.error(f"--teach-format-layers must be in [0, {layers}] for the {args.preset} preset")
    out = init_checkpoint(
        args.preset,
        args.output,
        seed=args.seed,
        dims=args.dims,
        legacy=args.legacy,
        image_size=args.image_size,
        teach_format_steps=args.teach_format,
        teach_format_layers=args.teach_format_layers,
        teach_format_lr=args.teach_format_lr,
        teach_format_batch=args.teach_format_batch,
        teach_format_warmup=args.teach_format_warmup,
        teach_format_check_every=args.teach_format_check_every,
        progress=True,
    )
    from locllm_training.model import load_checkpoint

    n = sum(p.numel() for p in load_checkpoint(out).parameters())
    print(f"wrote {args.preset} checkpoint ({n / 1e6:.1f}M parameters, {args.dims}D) to {out}")
    config = json.loads((out / "config.json").read_text())
    if "taught_format_well_formed" in config:
        state = "well-formed" if config["taught_format_well_formed"] else "NOT well-formed"
        print(f"format taught in {config['taught_format_steps']} steps; greedy answers {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
