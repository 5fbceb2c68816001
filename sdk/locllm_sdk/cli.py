"""``locllm``: the command line.

locllm locate IMAGE --model ENGINE_DIR -k neck -k pelvis [--box x,y,w,h] [--json] [--draw out.png]
locllm info ENGINE_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .pose import BACKENDS


def _box(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"box must be x,y,w,h numbers, got {text!r}") from e
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"box must be x,y,w,h (4 numbers), got {text!r}")
    return vals


def _print_table(res) -> None:
    three_d = bool(res.persons) and res.persons[0].keypoints[0].z is not None
    for i, person in enumerate(res):
        print(f"person {i}  box={[round(v, 1) for v in person.box]}  score={person.score:.3f}")
        head = f"  {'keypoint':<16}{'x':>9}{'y':>9}" + (f"{'z (mm)':>10}" if three_d else "") + f"{'score':>8}  answer"
        print(head)
        for k in person:
            z = f"{k.z:>10.1f}" if three_d else ""
            print(f"  {k.name:<16}{k.x:>9.1f}{k.y:>9.1f}{z}{k.score:>8.3f}  {k.answer}")


def cmd_locate(args) -> int:
    from .pose import Pose

    pose = Pose(args.model, backend=args.backend, decoding=args.decoding, threads=args.threads)
    keypoints = args.keypoint or args.skeleton
    res = pose.locate(args.image, keypoints, boxes=args.box or None)
    if args.json:
        print(res.to_json(indent=2))
    else:
        _print_table(res)
    if args.draw:
        from .draw import draw_results

        draw_results(args.image, res, args.draw)
        print(f"overlay written to {args.draw}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .engine import read_manifest

    m = read_manifest(args.engine)
    print(
        json.dumps(
            {
                k: m[k]
                for k in ("format_version", "protocol_version", "model", "precision", "backends", "built_with")
                if k in m
            },
            indent=2,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="locllm", description="LocLLM keypoint localization")
    sub = ap.add_subparsers(dest="command", required=True)
    loc = sub.add_parser("locate", help="locate keypoints in an image")
    loc.add_argument("image", help="image file")
    loc.add_argument("--model", "-m", required=True, help="engine directory (or checkpoint dir with --backend torch)")
    loc.add_argument("-k", "--keypoint", action="append", help="keypoint name (repeatable); default: the skeleton")
    loc.add_argument("--skeleton", default="coco17", help="skeleton used when no -k is given (default coco17)")
    loc.add_argument("--box", action="append", type=_box, help="person box x,y,w,h (repeatable); default whole image")
    loc.add_argument("--backend", default="auto", choices=BACKENDS)
    loc.add_argument("--decoding", default="constrained", choices=("constrained", "free"))
    loc.add_argument("--threads", type=int, default=None)
    loc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    loc.add_argument("--draw", type=Path, help="write an overlay PNG")
    loc.set_defaults(func=cmd_locate)
    info = sub.add_parser("info", help="describe an engine directory")
    info.add_argument("engine")
    info.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"locllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
