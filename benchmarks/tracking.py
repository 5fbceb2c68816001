"""Tracking on a rendered clip: detection every frame vs every N frames with box propagation.

    python benchmarks/tracking.py [-m demo] [--detector person|gt] [--seed 3] [--frames 40] \
        [--settings none,1,5,10] [--out benchmarks/results/tracking_demo.json]

Renders the SynthPose clip (``training/make_synthpose_clip.py``, seeded) and runs
``Pose.stream`` on its mp4 for the 17 COCO joints under each setting: ``none`` (the detector on
every frame, no tracking) and ``N`` (``track=True, det_frequency=N``). The settings run side by
side in one process, one frame of each in turn, so load on the machine falls on all alike.

Per setting: frames/s (1 / the median over the clip of a frame's wall time: decoding the frame,
detection when due, locate, tracking), the detector's calls and time, id switches against the
clip's ground-truth identities (a GT person matched, IoU > 0.5, to a result box whose track id
differs from the one it was last matched to; untracked runs have no ids), the GT person-frames
matched at IoU > 0.5, and PCK@0.1 of the 17 joints (``evaluation.evaluate_2d``: predictions
matched to GT persons by OKS, missed persons count as wrong).

``--detector person`` is the bundled ``PersonDetector``; ``gt`` is the clip's ground-truth
boxes with N(0, ``--gt-jitter``) pixel noise (a perfect detector, to isolate the tracker).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export"):
    sys.path.insert(0, str(_ROOT / _sub))

import numpy as np  # noqa: E402


def gt_boxes(doc: dict, frame: int) -> tuple[np.ndarray, list[int]]:
    """The clip's GT boxes of a frame (xyxy) and their person ids."""
    anns = [a for a in doc["annotations"] if a["image_id"] == frame + 1]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], float).reshape(-1, 4)
    return boxes, [a["person_id"] for a in anns]


class GroundTruthDetector:
    """Frame ``f``'s GT boxes + noise, for the frames shown in order (``frame`` is set by the caller)."""

    def __init__(self, doc: dict, jitter: float, seed: int = 0):
        self.doc, self.jitter, self.rng, self.frame = doc, jitter, np.random.default_rng(seed), 0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        boxes, _ = gt_boxes(self.doc, self.frame)
        boxes = boxes + self.rng.normal(0, self.jitter, boxes.shape)
        return np.concatenate([boxes, np.ones((len(boxes), 1))], 1)


class Timed:
    """A detector that records how often and how long it ran."""

    def __init__(self, detector):
        self.detector, self.calls, self.seconds = detector, 0, 0.0

    def __call__(self, image: np.ndarray):
        t = time.perf_counter()
        out = self.detector(image)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return out


def id_switches(doc: dict, results: list) -> tuple[int, int]:
    """(id switches, GT person-frames matched at IoU > 0.5) of tracked results, frame by frame."""
    from locllm_sdk.tracking import greedy_match, iou_matrix

    last: dict[int, int] = {}
    switches = matched = 0
    for f, res in enumerate(results):
        gt, pids = gt_boxes(doc, f)
        pred = np.array([[x, y, x + w, y + h] for x, y, w, h in (p.box for p in res)], float).reshape(-1, 4)
        for g, p in greedy_match(iou_matrix(gt, pred), 0.5 + 1e-9):
            matched += 1
            tid = res[p].track_id
            if tid is not None:
                switches += pids[g] in last and last[pids[g]] != tid
                last[pids[g]] = tid
    return switches, matched


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="demo", help="engine directory, or 'demo' (the bundled model)")
    ap.add_argument("--detector", choices=["person", "gt"], default="person")
    ap.add_argument("--gt-jitter", type=float, default=2.0, help="pixels of noise on the gt detector's boxes")
    ap.add_argument("--seed", type=int, default=3, help="the clip's seed")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--settings", default="none,1,5,10", help="'none' (no tracking) and det_frequency values")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(_ROOT / "benchmarks" / "results" / "tracking_demo.json"))
    args = ap.parse_args(argv)

    from locllm_sdk import Pose
    from locllm_sdk.demo import engine_for, resolve_model
    from locllm_sdk.evaluation import evaluate_2d
    from make_synthpose_clip import clip_document, render_clip, write_clip

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    freqs = [None if s == "none" else int(s) for s in settings]
    engine = engine_for(resolve_model(args.model)) if args.model == "demo" else Path(args.model)
    pose = Pose(engine, threads=args.threads)
    clip = render_clip(args.seed, args.frames, args.fps, args.size, (1, 3))
    tmp = tempfile.TemporaryDirectory()
    video = Path(tmp.name) / "clip.mp4"
    write_clip(clip, video, Path(tmp.name) / "clip.json", args.seed)
    doc = clip_document(clip, video.name, args.seed)

    runs = []
    for freq in freqs:
        if args.detector == "person":
            from locllm_sdk.person_detector import PersonDetector

            base = PersonDetector()
        else:
            base = GroundTruthDetector(doc, args.gt_jitter)
        det = Timed(base)
        kw = {"track": True, "det_frequency": freq} if freq is not None else {}
        it = pose.stream(video, "coco17", progress=False, detector=det, **kw)
        runs.append({"setting": settings[len(runs)], "it": it, "det": det, "base": base, "times": [], "results": []})

    for f in range(args.frames):  # one frame of each setting in turn
        for run in runs:
            if isinstance(run["base"], GroundTruthDetector):
                run["base"].frame = f
            t = time.perf_counter()
            _, res = next(run["it"])
            run["times"].append(time.perf_counter() - t)
            run["results"].append(res)

    table = []
    for run in runs:
        results = run["results"]
        preds = [d for f, r in enumerate(results) for d in r.to_coco(f + 1)]
        ev = evaluate_2d(doc, preds, alphas=(0.1,))
        tracked = run["setting"] != "none"
        switches, matched = id_switches(doc, results)
        times = np.array(run["times"])
        row = {
            "setting": "no tracking (detect every frame)" if not tracked else f"track, det_frequency={run['setting']}",
            "det_frequency": None if not tracked else int(run["setting"]),
            "frames_per_s_median": round(float(1 / np.median(times)), 3),
            "frame_ms_median": round(float(np.median(times) * 1000), 1),
            "frame_ms_p90": round(float(np.percentile(times, 90) * 1000), 1),
            "detector_calls": run["det"].calls,
            "detector_ms_total": round(run["det"].seconds * 1000, 1),
            "id_switches": switches if tracked else None,
            "tracks": len({p.track_id for r in results for p in r}) if tracked else None,
            "gt_person_frames_matched": matched,
            "pck@0.1": round(ev["PCK@0.1"]["mean"], 4),
        }
        table.append(row)
    shown = sum(len(p) for p in clip.person_ids)
    out = {
        "command": "python benchmarks/tracking.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "engine": str(engine),
        "backend": pose.backend_name,
        "detector": args.detector if args.detector == "person" else f"gt boxes + N(0, {args.gt_jitter:g} px)",
        "clip": {
            "seed": args.seed,
            "frames": args.frames,
            "fps": args.fps,
            "size": args.size,
            "persons": doc["video"]["persons"],
            "gt_person_frames": shown,
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": _cpus()},
        "results": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    cols = ["setting", "frames_per_s_median", "detector_calls", "id_switches", "gt_person_frames_matched", "pck@0.1"]
    print(f"clip seed {args.seed}: {args.frames} frames, {shown} GT person-frames; detector {out['detector']}")
    print(" | ".join(cols))
    for row in table:
        print(" | ".join(str(row[c]) for c in cols))
    print(f"wrote {args.out}")
    tmp.cleanup()
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
