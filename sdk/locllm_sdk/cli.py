"""``locllm``: the command line.

locllm demo [--seed N] [--out demo.png]           the bundled demo model on a rendered scene
locllm locate SOURCE [-m MODEL] -k neck -k pelvis [--box x,y,w,h | --detector person|none] [--flip] [--json]
              [--draw out.png] [--out-dir DIR] [--video out.mp4] [--coco res.json] [--track --det-frequency N]
              SOURCE: an image, a folder, a glob, a video file, a webcam index or a stream URL
locllm predict GT.json [-m MODEL] --out preds.json [--flip]  COCO results for benchmarks/accuracy.py
locllm annotate SOURCE --out RESULTS [-m MODEL] [--workers N]  a dataset on Ray Data (resumable)
locllm serve [ENGINE] [--port P] [--replicas N] [--no-batching]     an HTTP JSON API on Ray Serve
locllm info ENGINE_DIR

MODEL is an engine directory, or a checkpoint (its engine is built once and cached; with
--backend torch it runs unexported), or demo / demo3d: the bundled models (default demo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import LocLLMError
from .inputs import BOX_FORMATS
from .manifest import BACKEND_NAMES

FLIP_HELP = "flip test-time augmentation: also run each crop mirrored (left <-> right) and average; ~2x time"


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


def _pose(args):
    """The model of -m (engine dir, or checkpoint: its cached engine unless --backend torch);
    default: the bundled demo model."""
    from .pose import Pose

    return Pose(_model_path(args), backend=args.backend, decoding=args.decoding, threads=args.threads)


def _model_path(args) -> Path:
    """-m as a path Pose opens (``demo.model_path``): the bundled demo model by default."""
    from .demo import model_path

    return model_path(args.model, args.backend)


def _locate_kwargs(args) -> dict:
    """Boxes (--box) or the detector (--detector person | none: the whole image)."""
    if args.box:
        return {"boxes": args.box, "box_format": args.box_format}
    if args.detector == "none":
        return {}
    return {"detector": args.detector, "score_threshold": args.det_threshold}


def cmd_locate(args) -> int:
    from . import sources
    from .draw import check_image_path

    for path in (args.draw, args.video):
        if path:
            check_image_path(path) if path is args.draw else _check_video_path(path)
    if args.coco and not args.coco.parent.is_dir():
        raise FileNotFoundError(f"cannot write {args.coco}: the folder {args.coco.parent} does not exist")
    kind = sources.kind(args.source)
    if kind not in ("image", "array") or args.out_dir or args.video or args.coco or args.track:
        return _locate_many(args, kind)
    from .crop import load_image
    from .draw import draw_results

    image = load_image(args.source)
    pose = _pose(args)
    keypoints = args.keypoint or args.skeleton
    res = pose.locate(image, keypoints, flip=args.flip, **_locate_kwargs(args))
    if args.draw:
        draw_results(image, res, args.draw, library=pose.library, labels=True, kpt_thr=args.kpt_thr)
    if args.json:
        print(res.to_json(indent=2))
    else:
        _print_table(res)
    if not res.persons:
        print("no person found (--detector none runs the whole image, --box gives boxes)", file=sys.stderr)
    if args.draw:
        print(f"overlay written to {args.draw}", file=sys.stderr)
    return 0


def _check_video_path(path: Path) -> None:
    if path.suffix.lower() not in (".mp4", ".avi", ".mkv", ".mov"):
        raise ValueError(f"--video {path}: the file name must end in .mp4, .avi, .mkv or .mov")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")


def _locate_many(args, kind: str) -> int:
    """Every frame of a folder, glob, video, webcam or stream: annotated images (--out-dir),
    an annotated video (--video), COCO keypoint results (--coco), with a progress bar."""
    from . import sources
    from .draw import draw_results, write_image

    if args.draw:
        raise ValueError(f"--draw is for one image; a {kind} source writes --out-dir DIR and/or --video OUT.mp4")
    if args.track and not (args.detector != "none" and not args.box):
        raise ValueError("--track follows people found by the detector: drop --box / --detector none")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    pose = _pose(args)
    keypoints = args.keypoint or args.skeleton
    extra = {"track": True, "det_frequency": args.det_frequency} if args.track else {}
    writer, fps = None, sources.frame_rate(args.source) if args.video else None
    results, images, persons, frames = [], [], 0, 0
    try:
        stream = pose.stream(args.source, keypoints, progress=not args.no_progress, flip=args.flip,
                             **_locate_kwargs(args), **extra)  # fmt: skip
        for frame, res in stream:
            frames += 1
            persons += len(res)
            image_id = frames
            results += [r | {"file_name": frame.name} for r in res.to_coco(image_id)]
            images.append({"id": image_id, "file_name": frame.name, "height": res.image_size[0],
                           "width": res.image_size[1]})  # fmt: skip
            if args.out_dir or args.video:
                drawn = draw_results(frame.image, res, library=pose.library, labels=True, kpt_thr=args.kpt_thr)
                if args.out_dir:
                    write_image(args.out_dir / f"{Path(frame.name.replace('#', '_')).stem}.jpg", drawn)
                if args.video:
                    writer = writer or _video_writer(args.video, fps or 25.0, drawn.shape[:2])
                    writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            if args.limit and frames >= args.limit:
                break
    finally:
        if writer is not None:
            writer.release()
    if args.coco:
        tmp = args.coco.with_name(args.coco.name + ".partial")
        tmp.write_text(json.dumps(results) + "\n")
        tmp.replace(args.coco)  # complete or absent
        images_file = args.coco.with_name(args.coco.stem + ".images.json")
        images_file.write_text(json.dumps(images) + "\n")
    print(f"{frames} frame(s), {persons} person(s)", file=sys.stderr)
    written = (("annotated images", args.out_dir), ("annotated video", args.video), ("COCO results", args.coco))
    for what, path in written:
        if path:
            print(f"{what} written to {path}", file=sys.stderr)
    if args.coco:
        print(f"image ids and files of the COCO results: {images_file}", file=sys.stderr)
    return 0


def _video_writer(path: Path, fps: float, hw: tuple[int, int]):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (hw[1], hw[0]))
    if not writer.isOpened():
        raise OSError(f"cannot write the video {path} (OpenCV's VideoWriter with mp4v refused it)")
    return writer


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .draw import check_image_path

    check_image_path(args.out)
    lo, _, hi = args.persons.partition("-")
    run_demo(
        seed=args.seed,
        persons=(int(lo), int(hi or lo)),
        out=args.out,
        backend=args.backend,
        model=args.model,
        detector=None if args.detector == "none" else args.detector,
        eval_images=args.eval_images,
    )
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_coco

    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {args.out}: the folder {args.out.parent} does not exist")
    pose = _pose(args)
    preds = predict_coco(pose, args.gt, args.keypoints, args.images, args.limit, flip=args.flip)
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(json.dumps(preds) + "\n")
    tmp.replace(args.out)  # a results file is complete or absent
    print(f"{len(preds)} person predictions written to {args.out}; score them with:")
    flag = "--gt3d COMPANION.json" if pose.spec.coord_dims == 3 else ""
    print(f"  python benchmarks/accuracy.py --gt {args.gt} {flag} --pred {args.out}".replace("  --", " --"))
    return 0


def cmd_info(args) -> int:
    from .manifest import EngineManifest

    m = EngineManifest.read(args.engine).to_dict()
    keys = ("format_version", "protocol_version", "model", "precision", "backends", "built_with")
    print(json.dumps({k: m[k] for k in keys if k in m}, indent=2))
    return 0


def cmd_annotate(args) -> int:
    from .annotate import annotate

    summary = annotate(
        args.source,
        _model_path(args),
        args.out,
        workers=args.workers,
        threads=args.threads,
        keypoints=args.keypoints,
        image_dir=args.images,
        limit=args.limit,
        flip=args.flip,
        backend=args.backend,
        decoding=args.decoding,
        batch_size=args.batch_size,
        address=args.address,
    )
    print(summary)
    return 0 if summary.failed == 0 else 1


def cmd_serve(args) -> int:
    import signal
    import threading

    from . import serve

    app = serve.service(
        str(_model_path(args)),
        backend=args.backend,
        decoding=args.decoding,
        threads=args.threads,
        replicas=args.replicas,
        batching=not args.no_batching,
        max_batch_size=args.max_batch_size,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
    )
    url = serve.start(app, host=args.host, port=args.port, address=args.address)
    print(f"serving on {url} (POST /v1/locate, /v1/locate/upload; GET /healthz, /docs); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.stop()  # replicas finish the requests they hold, then Ray stops
    print("stopped", file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (argparse prints the usage block first); --help shows it."""

    def error(self, message: str):
        self.exit(2, f"locllm: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="locllm", description="LocLLM keypoint localization")
    sub = ap.add_subparsers(dest="command", required=True)
    loc = sub.add_parser("locate", help="locate keypoints in an image, a folder, a glob, a video or a stream")
    loc.add_argument("source", help="image file, folder, glob ('frames/*.jpg'), video file, webcam index or URL")
    model_help = "engine directory, checkpoint, or demo / demo3d (the bundled models; default demo)"
    loc.add_argument("--model", "-m", help=model_help)
    loc.add_argument("-k", "--keypoint", action="append", help="keypoint name (repeatable); default: the skeleton")
    loc.add_argument("--skeleton", default="coco17", help="skeleton used when no -k is given (default coco17)")
    loc.add_argument("--box", action="append", type=_box, help="person box x,y,w,h (repeatable); default: detected")
    loc.add_argument("--box-format", default="xywh", choices=BOX_FORMATS, help="how --box numbers read (default xywh)")
    det_help = "people found by the bundled person detector (default), or none: the whole image"
    loc.add_argument("--detector", default="person", choices=("person", "none"), help=det_help)
    loc.add_argument("--det-threshold", type=float, default=0.3, help="detector score threshold (default 0.3)")
    loc.add_argument("--track", action="store_true", help="video: track ids, detection every --det-frequency frames")
    loc.add_argument("--det-frequency", type=int, default=1, help="with --track: detect every N frames (default 1)")
    loc.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    loc.add_argument("--decoding", default="constrained", choices=("constrained", "free"))
    loc.add_argument("--threads", type=int, default=None)
    loc.add_argument("--flip", action="store_true", help=FLIP_HELP)
    loc.add_argument("--json", action="store_true", help="one image: print JSON instead of a table")
    loc.add_argument("--draw", type=Path, help="one image: write an overlay PNG")
    loc.add_argument("--kpt-thr", type=float, help="draw only keypoints at or above this confidence (or score)")
    loc.add_argument("--out-dir", type=Path, help="write an annotated image per image or frame into DIR")
    loc.add_argument("--video", type=Path, help="write an annotated video (mp4v)")
    loc.add_argument("--coco", type=Path, help="write COCO keypoint results (+ NAME.images.json: ids and files)")
    loc.add_argument("--limit", type=int, help="first N frames only")
    loc.add_argument("--no-progress", action="store_true", help="no progress bar")
    loc.set_defaults(func=cmd_locate)
    demo = sub.add_parser("demo", help="run the bundled demo model on a rendered SynthPose scene")
    demo.add_argument("--seed", type=int, default=7, help="scene seed (default 7)")
    demo.add_argument("--persons", default="2-3", help="people in the scene: N or MIN-MAX (default 2-3)")
    demo.add_argument("--out", type=Path, default=Path("demo.png"), help="overlay PNG (default demo.png)")
    demo.add_argument("--model", "-m", help="demo (default), demo3d (the bundled 3D model) or a checkpoint")
    demo.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    det_help = "people found by the bundled detector (default) or the scene's true boxes (none)"
    demo.add_argument("--detector", default="person", choices=("person", "none"), help=det_help)
    eval_help = "rendered scenes for detection AP50 and keypoint AP (default 20; 0 skips)"
    demo.add_argument("--eval-images", type=int, default=20, help=eval_help)
    demo.set_defaults(func=cmd_demo)
    pred = sub.add_parser("predict", help="predict every ground-truth person of a COCO-keypoints file")
    pred.add_argument("gt", type=Path, help="COCO keypoints JSON (SynthPose, COCO)")
    pred.add_argument("--model", "-m", help=model_help)
    pred.add_argument("--out", type=Path, required=True, help="COCO results JSON to write")
    pred.add_argument("--keypoints", default="auto", help="auto (the extended list if described), a skeleton, or a,b,c")
    pred.add_argument("--images", type=Path, help="image folder (default: guessed from the layout)")
    pred.add_argument("--limit", type=int, help="first N images only")
    pred.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    pred.add_argument("--decoding", default="constrained", choices=("constrained", "free"))
    pred.add_argument("--threads", type=int, default=None)
    pred.add_argument("--flip", action="store_true", help=FLIP_HELP)
    pred.set_defaults(func=cmd_predict)
    info = sub.add_parser("info", help="describe an engine directory")
    info.add_argument("engine")
    info.set_defaults(func=cmd_info)
    ann = sub.add_parser("annotate", help="COCO keypoint results for a dataset, on Ray Data (resumable)")
    ann.add_argument("source", help="a COCO keypoints JSON (its boxes), or an image folder / glob (detector boxes)")
    ann.add_argument("--out", type=Path, required=True, help="COCO results JSON (errors beside it: *.errors.json)")
    ann.add_argument("--model", "-m", help=model_help)
    ann.add_argument("--workers", type=int, default=1, help="Pose actors (one engine load each)")
    ann.add_argument("--threads", type=int, default=None, help="threads per actor (default: cores // workers)")
    ann.add_argument("--batch-size", type=int, default=4, help="images per actor call (and per shard)")
    ann.add_argument("--keypoints", default="auto", help="auto, a skeleton, or a,b,c")
    ann.add_argument("--images", type=Path, help="image folder of a COCO file (default: guessed)")
    ann.add_argument("--limit", type=int, help="first N images only")
    ann.add_argument("--address", help="a Ray cluster (default: an embedded local Ray)")
    ann.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    ann.add_argument("--decoding", default="constrained", choices=("constrained", "free"))
    ann.add_argument("--flip", action="store_true", help=FLIP_HELP)
    ann.set_defaults(func=cmd_annotate)
    srv = sub.add_parser("serve", help="an HTTP JSON API on Ray Serve")
    srv.add_argument("model", nargs="?", help="the engine to serve: " + model_help)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=int, default=1)
    srv.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per replica")
    srv.add_argument("--no-batching", action="store_true", help="one request per pass (no serve.batch)")
    srv.add_argument("--max-batch-size", type=int, default=8, help="requests gathered into one pass")
    srv.add_argument("--max-ongoing-requests", type=int, default=32, help="per replica")
    srv.add_argument("--max-queued-requests", type=int, default=64, help="beyond: 503 with Retry-After")
    srv.add_argument("--address", help="a Ray cluster (default: an embedded local Ray)")
    srv.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    srv.add_argument("--decoding", default="constrained", choices=("constrained", "free"))
    srv.set_defaults(func=cmd_serve)
    return ap


# Errors a user can cause and fix: one line, exit 2. Anything else is a bug of ours: one line
# saying so, exit 3 (LOCLLM_DEBUG=1 shows the traceback).
USER_ERRORS = (LocLLMError, ValueError, KeyError, OSError, RuntimeError, ImportError)


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("locllm: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("LOCLLM_DEBUG"):
            raise
        print(f"locllm: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("LOCLLM_DEBUG"):
            raise
        print(
            f"locllm: internal error ({type(e).__name__}: {_one_line(e)}); LOCLLM_DEBUG=1 shows the traceback",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
