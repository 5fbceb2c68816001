"""Teach a random-weight checkpoint more of the answer format: continue what
``init_checkpoint.py --teach-format`` started (the same keypoint positions, new samples), e.g.
for the 1B-class preset, whose fit is long on a CPU. The new checkpoint records the steps of
both fits and this fit's settings (``taught_format_continued``).

python training/teach_format.py --checkpoint CKPT --output CKPT2 --steps 100 [--layers 4] [--lr 6e-4]
    [--warmup 10] [--batch 2] [--check-every 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a clone without install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sdk"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint of init_checkpoint.py")
    ap.add_argument("--output", required=True, type=Path, help="the new checkpoint (not --checkpoint)")
    ap.add_argument("--steps", required=True, type=int)
    ap.add_argument("--layers", type=int, metavar="N", help="fit only the last N LM layers, the final norm and head")
    ap.add_argument("--lr", type=float, help="learning rate (default: by width)")
    ap.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear learning-rate warm-up")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--check-every", type=int, default=0, metavar="STEPS", help="stop once greedy answers are well-formed"
    )
    args = ap.parse_args(argv)
    config_file = args.checkpoint / "config.json"
    if not config_file.is_file():
        ap.error(f"--checkpoint {args.checkpoint}: no config.json (not a checkpoint)")
    if args.output.resolve() == args.checkpoint.resolve():
        ap.error("--output must differ from --checkpoint (the checkpoint is read while the new one is written)")
    if args.steps < 1 or args.batch < 1 or min(args.warmup, args.check_every) < 0:
        ap.error("--steps and --batch must be >= 1, --warmup and --check-every >= 0")
    stored = json.loads(config_file.read_text())
    if "preset" not in stored:
        ap.error(f"--checkpoint {args.checkpoint} was not written by init_checkpoint.py (no preset recorded)")

    layers = stored["llm"]["num_hidden_layers"]
    if args.layers is not None and not 0 <= args.layers <= layers:  # checked before a 1B-class model loads
        ap.error(f"--layers must be in [0, {layers}] for this checkpoint")

    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.init import teach_format
    from locllm_training.model import load_checkpoint, save_checkpoint

    model = load_checkpoint(args.checkpoint)
    before = int(stored.get("taught_format_steps", 0))
    seed = int(stored.get("seed", 0))
    fit = teach_format(
        model,
        PromptTokenizer.from_dir(args.checkpoint),
        args.steps,
        seed=seed,
        lr=args.lr,
        batch=args.batch,
        layers=args.layers,
        progress=True,
        warmup=args.warmup,
        check_every=args.check_every,
        data_seed=seed + 1_000_003 + before,  # samples the first fit did not draw
    )
    own = model.config.to_dict()
    extra = {k: v for k, v in stored.items() if k not in own}
    extra["taught_format_steps"] = before + fit.steps
    extra.pop("taught_format_well_formed", None)
    if fit.well_formed is not None:
        extra["taught_format_well_formed"] = fit.well_formed
    # the first fit's settings stay as init_checkpoint.py recorded them; each continuation adds its own
    settings = {"steps": fit.steps, "layers": args.layers, "lr": fit.lr, "warmup": args.warmup, "batch": args.batch}
    extra["taught_format_continued"] = [*stored.get("taught_format_continued", []), settings]
    save_checkpoint(model, args.checkpoint, args.output, extra=extra)
    state = {None: "not checked", True: "well-formed", False: "NOT well-formed"}[fit.well_formed]
    print(f"wrote {args.output}: {fit.steps} more steps ({before + fit.steps} in all); greedy answers {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
