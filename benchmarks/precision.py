"""Reduced-precision vs fp32 ONNX engines, side by side: answer agreement, PCK and per-person time.

    python benchmarks/precision.py --gt data/synthpose/annotations/person_keypoints_val.json \
        [--engine FP32_ENGINE] [--configs int8/int8,int8/fp32,fp16-weights/fp16-weights] [--reduced DIR ...] \
        [--images 20 | --images 0] [--threads 1] [--out benchmarks/results/precision_demo.json]

``--engine`` defaults to the bundled demo model's engine. ``--configs``: VISION/DECODER
precisions, each engine built from ``--engine`` under ``--workdir`` on first use
(``quantize.reduce_engine``, forced: the benchmark reports the agreement whatever it is);
``--reduced``: existing reduced engines (of the same checkpoint). Each val image (ground-truth
boxes, COCO-17 + neck + pelvis) runs through ``pipeline.locate_in_image`` on every engine in
turn, the order rotating from image to image so that all see the same machine load. Per person:
the call's wall time and its process CPU time over its people (medians reported; on a shared
machine the CPU time is the steadier of the two, with ``--threads 1`` it counts no spinning
worker threads). The FLOPs per person (``throughput.person_flop_parts``) over the CPU time give
the fraction of this machine's matmul peak per core, measured in the same run on one thread and
in CPU time (``throughput.ort_matmul_peak_gops``): fp32 MatMul for fp32 parts, int8
MatMulInteger for the linear layers of int8 parts. Accuracy: PCK@0.1 (``evaluation.pck``, box-size normalised) of the 19
keypoints against the file's ``keypoints_ext`` (``keypoints`` where a file has no extended
set), and of the COCO-17 alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export", "benchmarks"):
    sys.path.insert(0, str(_ROOT / _sub))

from locllm_sdk.coco_files import guess_image_dir, read_coco  # noqa: E402
from locllm_sdk.crop import load_image  # noqa: E402


def parse_configs(text: str) -> list[tuple[str, str]]:
    from locllm_export.quantize import PRECISIONS

    configs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split("/")
        if len(parts) != 2 or not all(p in PRECISIONS for p in parts):
            raise argparse.ArgumentTypeError(f"--configs takes VISION/DECODER from {PRECISIONS}, got {item!r}")
        configs.append((parts[0], parts[1]))
    return configs


def reduced_engine(fp32_dir: Path, workdir: Path, vision: str, decoder: str, calibration_images: int = 1) -> Path:
    """The (vision, decoder) engine of ``fp32_dir`` under ``workdir``, built (forced past the
    parity gate, whose figure on ``calibration_images`` scenes its manifest records) unless one of
    the same checkpoint, precision and calibration is there."""
    from locllm_export.quantize import recorded_gate, reduce_engine
    from locllm_sdk.errors import EngineError
    from locllm_sdk.manifest import EngineManifest

    fp32 = EngineManifest.read(fp32_dir)
    out = workdir / f"{fp32_dir.name}-{vision}-{decoder}"
    try:
        have = EngineManifest.read(out)
        images = recorded_gate(have.verification).get("calibration images")
        if (have.model.checkpoint_sha256, have.precision.vision, have.precision.decoder, images) == (
            fp32.model.checkpoint_sha256,
            vision,
            decoder,
            calibration_images,
        ):
            return out
    except EngineError:
        pass
    print(f"building {out} ...", file=sys.stderr)
    reduce_engine(fp32_dir, out, vision, decoder, force=True, calibration_images=calibration_images)
    return out


def ground_truth(ann: dict, names: list[str], order: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """([K, 2] xy, [K] visibility) of the requested keypoint names (0 where the file has none)."""
    flat = np.asarray(ann.get("keypoints_ext") or ann["keypoints"], float).reshape(-1, 3)
    xy, vis = np.zeros((len(order), 2)), np.zeros(len(order))
    for k, name in enumerate(order):
        if name in names and names.index(name) < len(flat):
            xy[k], vis[k] = flat[names.index(name), :2], flat[names.index(name), 2]
    return xy, vis


def main(argv: list[str] | None = None) -> int:
    import onnxruntime
    from locllm_export.quantize import EXTRA_KEYPOINTS
    from locllm_sdk import loader
    from locllm_sdk.demo import engine_for, resolve_model
    from locllm_sdk.descriptions import coco17
    from locllm_sdk.evaluation import pck
    from locllm_sdk.pipeline import locate_in_image
    from throughput import (
        cpu_model,
        grammar_token_counts,
        int8_flops,
        ort_matmul_peak_gops,
        person_flop_parts,
        served_token_counts,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", required=True, help="COCO keypoints file with person boxes")
    ap.add_argument("--engine", type=Path, help="fp32 engine (default: the demo model's)")
    ap.add_argument("--configs", type=parse_configs, default=parse_configs("int8/int8"), help="VISION/DECODER,...")
    ap.add_argument("--reduced", type=Path, action="append", default=[], help="an existing reduced engine (repeatable)")
    ap.add_argument("--workdir", type=Path, default=_ROOT / "runs" / "precision", help="where --configs are built")
    ap.add_argument("--images", type=int, default=20, help="first N images with people (0: all)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime threads per engine (default: its own choice)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    fp32_dir = args.engine or engine_for(resolve_model("demo"))
    dirs = {"fp32/fp32": Path(fp32_dir)}
    for vision, decoder in args.configs:
        dirs[f"{vision}/{decoder}"] = reduced_engine(Path(fp32_dir), args.workdir, vision, decoder)
    engines = {label: loader.load(d, "onnxruntime", threads=args.threads) for label, d in dirs.items()}
    for d in args.reduced:
        m = loader.load(d, "onnxruntime", threads=args.threads)
        label = f"{m.manifest.precision.vision}/{m.manifest.precision.decoder} ({d.name})"
        dirs[label], engines[label] = d, m
    reference = engines["fp32/fp32"]
    for label, m in engines.items():
        if m.manifest.model.checkpoint_sha256 != reference.manifest.model.checkpoint_sha256:
            ap.error(f"{dirs[label]} is an engine of another checkpoint than {fp32_dir}")

    doc = read_coco(args.gt)
    folder = guess_image_dir(Path(args.gt), doc)
    category = doc["categories"][0]
    gt_names = category.get("keypoint_names_ext") or category["keypoints"]
    anns: dict[int, list] = {}
    for a in doc["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    images = [im for im in doc["images"] if anns.get(im["id"])]
    images = images[: args.images] if args.images > 0 else images

    order = [*coco17().keypoints, *EXTRA_KEYPOINTS]
    requests = reference.library.resolve(order)
    labels = list(engines)
    wall = {k: [] for k in labels}
    cpu = {k: [] for k in labels}
    points = {k: [] for k in labels}
    texts = {k: [] for k in labels}
    gt_xy, gt_vis, norms = [], [], []
    load_before = os.getloadavg()
    for n, im in enumerate(images):
        image = load_image(folder / im["file_name"], exif_orientation=False)
        people = anns[im["id"]]
        boxes = [a["bbox"] for a in people]
        for k in labels[n % len(labels) :] + labels[: n % len(labels)]:
            m = engines[k]
            t0, c0 = time.perf_counter(), time.process_time()
            out = locate_in_image(m.backend, m.spec, image, boxes, requests)
            cpu[k].append((time.process_time() - c0) * 1000 / len(boxes))
            wall[k].append((time.perf_counter() - t0) * 1000 / len(boxes))
            points[k].append(np.asarray(out.values)[..., :2])
            texts[k].extend(out.texts)
        for a in people:
            xy, vis = ground_truth(a, gt_names, order)
            gt_xy.append(xy)
            gt_vis.append(vis)
            norms.append(max(a["bbox"][2], a["bbox"][3]))
        last = labels[-1]
        same = sum(x == y for a, b in zip(texts["fp32/fp32"], texts[last]) for x, y in zip(a, b))
        print(f"image {n + 1}/{len(images)}: {last} {same}/{len(texts[last]) * len(order)}", file=sys.stderr)

    gt_xy, gt_vis, norms = np.stack(gt_xy), np.stack(gt_vis), np.asarray(norms, float)
    coco = len(coco17().keypoints)
    ref_points = np.concatenate(points["fp32/fp32"])
    rows = {}
    for k in labels:
        pts = np.concatenate(points[k])
        identical = sum(x == y for a, b in zip(texts["fp32/fp32"], texts[k]) for x, y in zip(a, b))
        answers = len(texts[k]) * len(order)
        shift = np.linalg.norm(pts - ref_points, axis=-1).ravel()
        m = engines[k].manifest
        rows[k] = {
            "engine": str(dirs[k]),
            "precision": {"vision": m.precision.vision, "decoder": m.precision.decoder},
            "methods": {"vision": m.precision.vision_method, "decoder": m.precision.decoder_method},
            "engine_bytes": sum(f.bytes for f in m.files.values()),
            "identical_answers": identical,
            "answers": answers,
            "agreement": identical / answers,
            "point_shift_px": {q: float(np.percentile(shift, p)) for q, p in (("p50", 50), ("p90", 90), ("max", 100))},
            "pck@0.1": pck(pts, gt_xy, gt_vis, norms, 0.1)["mean"],
            "pck@0.1_coco17": pck(pts[:, :coco], gt_xy[:, :coco], gt_vis[:, :coco], norms, 0.1)["mean"],
            "per_person_ms_median": float(np.median(wall[k])),
            "per_person_cpu_ms_median": float(np.median(cpu[k])),
            "per_person_ms": wall[k],
            "per_person_cpu_ms": cpu[k],
        }
    peaks = {"fp32": ort_matmul_peak_gops(False, threads=1, cpu_time=True)}
    peaks["int8"] = ort_matmul_peak_gops(True, threads=1, cpu_time=True)
    parts = person_flop_parts(
        reference.manifest, *served_token_counts(reference, requests), *grammar_token_counts(reference.spec.grammar)
    )
    flops = sum(parts.values())
    for k, r in rows.items():
        quantized = int8_flops(parts, engines[k].manifest.precision)
        at_peak_s = quantized / (peaks["int8"] * 1e9) + (flops - quantized) / (peaks["fp32"] * 1e9)
        r["int8_gflop_per_person"] = quantized / 1e9
        r["gflop_per_cpu_second"] = flops / 1e9 / (r["per_person_cpu_ms_median"] / 1e3)
        r["fraction_of_peak_per_core"] = at_peak_s / (r["per_person_cpu_ms_median"] / 1e3)
    base = rows["fp32/fp32"]
    for r in rows.values():
        r["speedup_wall"] = base["per_person_ms_median"] / r["per_person_ms_median"]
        r["speedup_cpu"] = base["per_person_cpu_ms_median"] / r["per_person_cpu_ms_median"]
        r["pck@0.1_minus_fp32"] = r["pck@0.1"] - base["pck@0.1"]
    result = {
        "gt": str(args.gt),
        "images": len(images),
        "persons": len(norms),
        "keypoints": len(order),
        "threads": args.threads,
        "gflop_per_person": flops / 1e9,
        "gflop_per_person_parts": {k: v / 1e9 for k, v in parts.items()},
        "matmul_peak_gops_per_core_cpu_time": peaks,
        "engines": rows,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "onnxruntime": onnxruntime.__version__,
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "engines"}, indent=1))
    print(
        "\n| engine (vision / decoder) | answers identical to fp32 | PCK@0.1 (19 kpts) | PCK@0.1 COCO-17 "
        "| per-person wall (median) | per-person CPU (median) | of the peak per core | point shift p50 / p90 / max "
        "| engine MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        s = r["point_shift_px"]
        print(
            f"| {k} | {r['identical_answers']}/{r['answers']} ({r['agreement']:.1%}) | {r['pck@0.1']:.4f} "
            f"| {r['pck@0.1_coco17']:.4f} | {r['per_person_ms_median']:.0f} ms ({r['speedup_wall']:.2f}x) "
            f"| {r['per_person_cpu_ms_median']:.0f} ms ({r['speedup_cpu']:.2f}x) "
            f"| {r['fraction_of_peak_per_core']:.1%} | {s['p50']:.2f} / {s['p90']:.2f} / {s['max']:.1f} px "
            f"| {r['engine_bytes'] / 1e6:.1f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
