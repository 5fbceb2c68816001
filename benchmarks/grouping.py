"""Per-keypoint vs grouped protocol: two fine-tunes of one checkpoint, measured side by side.

    python benchmarks/grouping.py --per-keypoint RUNS/per_keypoint/final --grouped RUNS/grouped/final \
        --gt data/synthpose/annotations/person_keypoints_val.json \
        [--runs RUNS] [--latency-images 20] [--out benchmarks/results/grouping_demo.json]

Both checkpoints (fine-tuned from the same start for the same steps and settings, one with
``train.py --protocol grouped``; benchmarks/README.md has the commands) get their ONNX engine
(``demo.engine_for``). Every val image (ground-truth boxes, all 22 SynthPose joints) goes through
``predict.image_predictions`` on both engines in turn, alternating which goes first, so both see the
same machine load: COCO results scored by ``evaluation.evaluate_2d`` (PCK@0.1 / 0.05 per joint),
and one call's wall time over its people as the per-person latency. Then ``--latency-images``
images are run again asking COCO-17 only. Rows and decoder passes per person are read from the
pipeline's own counts (``pipeline.locate_in_image`` stats on one person). ``--runs``: the folder
holding each run's ``NAME.time.N`` (``/usr/bin/time -v`` of each segment) and ``NAME/trainer``
state, for the training time and losses of the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export", "benchmarks"):
    sys.path.insert(0, str(_ROOT / _sub))

from locllm_sdk.coco_files import guess_image_dir, read_coco  # noqa: E402
from locllm_sdk.crop import load_image  # noqa: E402

MODELS = ("per_keypoint", "grouped")


def decode_counts(pose, image: np.ndarray, box: list[float], names: list[str]) -> dict:
    """Rows and decoder passes the pipeline runs for one person asking ``names``."""
    from locllm_sdk.pipeline import locate_in_image

    stats = locate_in_image(pose.backend, pose.spec, image, [box], pose.library.resolve(names)).stats
    return {"rows": stats.rows, "decoder_passes": stats.decoder_passes, "keypoints": len(names)}


def training_record(runs: Path, name: str) -> dict:
    """Wall and CPU time of a run, summed over its segments (``NAME.time.N``, ``/usr/bin/time -v``
    output; a run interrupted from outside resumes from its last saved state in a new
    segment), and its trainer log (steps, first and last logged loss)."""

    def field(text: str, label: str) -> str:
        m = re.search(rf"{re.escape(label)}: (.+)", text)
        return m.group(1).strip() if m else ""

    out: dict = {"segments": []}
    for timing in sorted(runs.glob(f"{name}.time.*"), key=lambda p: int(p.suffix[1:])):
        text = timing.read_text()
        wall = field(text, "Elapsed (wall clock) time (h:mm:ss or m:ss)")
        seconds = sum(float(v) * 60**i for i, v in enumerate(reversed(wall.split(":")))) if wall else 0.0
        cpu = float(field(text, "User time (seconds)") or 0) + float(field(text, "System time (seconds)") or 0)
        out["segments"].append(
            {"wall_s": round(seconds, 1), "cpu_s": round(cpu, 1), "exit": field(text, "Exit status")}
        )
        out["command"] = field(text, "Command being timed").strip('"')
    out["wall_s"] = round(sum(s["wall_s"] for s in out["segments"]), 1)
    out["cpu_s"] = round(sum(s["cpu_s"] for s in out["segments"]), 1)
    states = sorted((runs / name / "trainer").glob("checkpoint-*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    state_file = states[-1] if states else None
    if state_file:
        state = json.loads(state_file.read_text())
        losses = [h for h in state["log_history"] if "loss" in h]
        out["steps"] = state["global_step"]
        out["loss_first_last"] = [losses[0]["loss"], losses[-1]["loss"]] if losses else None
    if out["segments"] and out.get("steps"):
        out["wall_s_per_step"] = round(out["wall_s"] / out["steps"], 2)
        out["cpu_s_per_step"] = round(out["cpu_s"] / out["steps"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    import onnxruntime
    from locllm_sdk import Pose
    from locllm_sdk.demo import engine_for
    from locllm_sdk.descriptions import coco17
    from locllm_sdk.evaluation import evaluate_2d
    from locllm_sdk.predict import image_predictions, keypoint_names, people_by_image
    from throughput import cpu_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--per-keypoint", type=Path, required=True, help="checkpoint trained with the per-keypoint protocol"
    )
    ap.add_argument("--grouped", type=Path, required=True, help="checkpoint trained with --protocol grouped")
    ap.add_argument("--gt", type=Path, required=True, help="COCO keypoints file with person boxes (SynthPose val)")
    ap.add_argument("--runs", type=Path, help="the runs' folder (NAME.time.N, NAME/trainer) for training records")
    ap.add_argument("--images", type=int, help="first N val images only (default: all)")
    ap.add_argument("--latency-images", type=int, default=20, help="images of the COCO-17-only latency pass")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads per engine (default: its own choice)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    checkpoints = {"per_keypoint": args.per_keypoint, "grouped": args.grouped}
    poses = {
        name: Pose(engine_for(ckpt), backend="onnxruntime", threads=args.threads) for name, ckpt in checkpoints.items()
    }
    protocols = {name: pose.spec.protocol_version for name, pose in poses.items()}
    doc = read_coco(args.gt)
    folder = guess_image_dir(args.gt, doc)
    images = people_by_image(doc, args.images)
    names = keypoint_names(doc, poses["per_keypoint"])  # all 22 SynthPose joints
    coco = list(coco17().keypoints)

    preds: dict[str, list] = {m: [] for m in MODELS}
    per_person: dict[str, dict[str, list[float]]] = {m: {"all": [], "coco17": []} for m in MODELS}
    load_before = os.getloadavg()
    start = time.perf_counter()
    for n, (im, people) in enumerate(images):
        image = load_image(folder / im["file_name"], exif_orientation=False)
        order = MODELS if n % 2 == 0 else MODELS[::-1]
        for name in order:
            t0 = time.perf_counter()
            preds[name] += image_predictions(poses[name], image, im["id"], names, people)
            per_person[name]["all"].append((time.perf_counter() - t0) * 1000 / len(people))
        if n < args.latency_images:
            boxes = [a["bbox"] for a in people]
            for name in order:
                t0 = time.perf_counter()
                poses[name].locate(image, coco, boxes)
                per_person[name]["coco17"].append((time.perf_counter() - t0) * 1000 / len(people))
        print(f"image {n + 1}/{len(images)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    first_image, first_people = images[0]
    probe = load_image(folder / first_image["file_name"], exif_orientation=False)
    result: dict = {"gt": str(args.gt), "images": len(images), "persons": sum(len(p) for _, p in images)}
    ids = {im["id"] for im, _ in images}  # score against the images that ran (all, without --images)
    scored = {**doc, "images": [im for im in doc["images"] if im["id"] in ids]}
    scored["annotations"] = [a for a in doc["annotations"] if a["image_id"] in ids]
    for name in MODELS:
        scores = evaluate_2d(scored, preds[name], alphas=(0.05, 0.1))
        result[name] = {
            "checkpoint": str(checkpoints[name]),
            "protocol_version": protocols[name],
            "PCK@0.1": scores["PCK@0.1"],
            "PCK@0.05": scores["PCK@0.05"],
            "coco_AP": scores["coco"].get("AP"),
            "per_person": {
                "all_22": decode_counts(poses[name], probe, first_people[0]["bbox"], names),
                "coco17": decode_counts(poses[name], probe, first_people[0]["bbox"], coco),
            },
            "latency_ms_per_person_median": {k: float(np.median(v)) for k, v in per_person[name].items() if v},
            "latency_ms_per_person": per_person[name],
        }
        if args.runs:
            result[name]["training"] = training_record(args.runs, name)
    result["machine"] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "onnxruntime": onnxruntime.__version__,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in MODELS}, indent=1))
    print(table(result, names))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def table(result: dict, names: list[str]) -> str:
    """The side-by-side table (markdown) of a result."""
    a, b = (result[m] for m in MODELS)
    lines = ["| | per-keypoint | grouped |", "|---|--:|--:|"]
    for label, key in (("PCK@0.1 mean, 17 COCO joints", "mean_17_standard"), ("PCK@0.1 mean, all 22", "mean")):
        lines.append(f"| {label} | {a['PCK@0.1'][key]:.3f} | {b['PCK@0.1'][key]:.3f} |")
    lines.append(
        f"| PCK@0.05 mean, 17 COCO joints | {a['PCK@0.05']['mean_17_standard']:.3f} | "
        f"{b['PCK@0.05']['mean_17_standard']:.3f} |"
    )
    for req in ("coco17", "all_22"):
        ca, cb = a["per_person"][req], b["per_person"][req]
        lines.append(f"| rows per person ({req}) | {ca['rows']} | {cb['rows']} |")
        lines.append(f"| decoder passes per call, 1 person ({req}) | {ca['decoder_passes']} | {cb['decoder_passes']} |")
    for req, label in (("coco17", "COCO-17"), ("all", "all 22")):
        la, lb = a["latency_ms_per_person_median"].get(req), b["latency_ms_per_person_median"].get(req)
        if la and lb:
            lines.append(f"| latency ms/person, median ({label}, ORT) | {la:.0f} | {lb:.0f} |")
    for n in names:
        va, vb = a["PCK@0.1"]["per_joint"][n], b["PCK@0.1"]["per_joint"][n]
        lines.append(f"| PCK@0.1 {n} | {_num(va)} | {_num(vb)} |")
    return "\n".join(lines)


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
