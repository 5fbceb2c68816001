"""Latency / throughput of the SDK against the reference way of running LocLLM.

    python benchmarks/throughput.py --preset tiny|small|base [--reps 15] [--keypoints 17] [--out DIR]
    python benchmarks/throughput.py --checkpoint CKPT --engine ENGINE

Same weights, same machine, same run: the methods are interleaved rep by rep after
warm-up, and medians are reported. Methods:
  reference   the official procedure in PyTorch + transformers (K prompts per person, the
              crop through the ViT K times, left padding, HF generate greedy, regex parse)
  sdk-torch   Pose.locate on the torch backend (the SDK's algorithm, PyTorch kernels)
  sdk-ort     Pose.locate on ONNX Runtime (the SDK as deployed)
Random-weight presets are created (and their engines built) on first use under --workdir.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export"):
    sys.path.insert(0, str(_ROOT / _sub))


def ensure_model(preset: str, workdir: Path, dims: int = 2) -> tuple[Path, Path]:
    from locllm_export.build import build_onnx_engine
    from locllm_training.init import init_checkpoint

    ckpt, engine = workdir / preset / "checkpoint", workdir / preset / "engine"
    if not (ckpt / "model.safetensors").is_file():
        init_checkpoint(preset, ckpt, seed=0, dims=dims)
    if not (engine / "manifest.json").is_file():
        print(build_onnx_engine(ckpt, engine, overwrite=True).summary())
    return ckpt, engine


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """This CPU's sustained fp32 matmul rate (torch, all threads), median of reps."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def person_flops(manifest: dict, prefix_len: int, suffix_len: int, k: int, passes: int, new_tokens: int) -> float:
    """FLOPs of the SDK for one person: ViT once, prefix once, K suffixes, K x passes
    single/few-token steps; linear layers 2*params*tokens plus attention 4*T*ctx*H per layer."""
    m = manifest["model"]
    h, layers, v = m["hidden_size"], m["num_layers"], m["vocab_size"]
    vh, vl = m["vision_hidden_size"], m["vision_layers"]
    layer_params = (m["parameters"] - 2 * v * h) / max(layers, 1)  # rough: LM minus embeddings
    vit_tokens = m["num_patches"] + 1
    vit = vl * (2 * 12 * vh * vh * vit_tokens + 4 * vit_tokens * vit_tokens * vh)
    lm_tokens = prefix_len + k * (suffix_len + new_tokens)
    ctx = prefix_len + suffix_len
    attn = layers * 4 * h * (prefix_len * prefix_len / 2 + k * (suffix_len + new_tokens) * ctx)
    head = 2 * v * h * k * passes * 2
    return vit + 2 * layer_params * lm_tokens + attn + head


def pct(xs, q):
    return float(np.percentile(xs, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small", "base"))
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--engine", type=Path)
    ap.add_argument("--workdir", type=Path, default=_ROOT / "runs" / "bench")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--keypoints", type=int, default=17, help="keypoints per person (from coco17 + extras)")
    ap.add_argument("--methods", default="reference,sdk-torch,sdk-ort")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and ORT (default: all cores)")
    ap.add_argument("--out", type=Path, help="write results JSON here")
    args = ap.parse_args(argv)

    import torch
    from locllm_sdk import Pose
    from locllm_sdk.crop import crop_geometry, normalize, warp
    from locllm_sdk.engine import read_manifest
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.model import load_checkpoint
    from locllm_training.reference import reference_locate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint and args.engine:
        ckpt, engine = args.checkpoint, args.engine
        label = ckpt.name
    else:
        ckpt, engine = ensure_model(args.preset, args.workdir)
        label = args.preset
    manifest = read_manifest(engine)
    methods = [m.strip() for m in args.methods.split(",")]

    ort_pose = Pose(engine, backend="onnxruntime", threads=args.threads)
    torch_pose = Pose(ckpt, backend="torch", threads=args.threads)
    lib = ort_pose.library
    names = list(lib.skeletons["coco17"].keypoints) + [
        n for n in lib.descriptions if n not in lib.skeletons["coco17"].keypoints
    ]
    names = (names * (args.keypoints // len(names) + 1))[: args.keypoints]
    if len(set(names)) < len(names):  # more keypoints than the library: invent descriptions
        names = {f"{n} #{i}": lib.descriptions[n] for i, n in enumerate(names)}
    requests = ort_pose.library.resolve(names)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (480, 360, 3)).astype(np.uint8)
    box = [40.0, 30.0, 260.0, 420.0]
    ref_model = load_checkpoint(ckpt) if "reference" in methods else None
    tok = PromptTokenizer.from_dir(ckpt)

    def run_reference():
        g = crop_geometry(box, img.shape[:2], ref_model.config.image_size)
        px = normalize(warp(img, g)[None])
        return reference_locate(ref_model, tok, px, [(r.name, r.description) for r in requests])[0]

    runners = {
        "reference": run_reference,
        "sdk-torch": lambda: torch_pose.locate(img, {r.name: r.description for r in requests}, [box]),
        "sdk-ort": lambda: ort_pose.locate(img, {r.name: r.description for r in requests}, [box]),
    }
    outputs, times = {}, {m: [] for m in methods}
    for m in methods:
        for _ in range(args.warmup):
            outputs[m] = runners[m]()
    for _ in range(args.reps):
        for m in methods:  # interleaved: the machine's mood hits every method alike
            t = time.perf_counter()
            runners[m]()
            times[m].append(time.perf_counter() - t)

    gflops = matmul_peak_gflops()
    passes = outputs["sdk-ort"].info["decoder_passes"] if "sdk-ort" in outputs else None
    prefix_len = len(ort_pose.spec.prefix_ids)
    suffix_len = int(np.mean([len(ort_pose.spec.tokenizer.round_ids(r.name, r.description)) for r in requests]))
    flops = person_flops(manifest, prefix_len, suffix_len, len(requests), passes or 6, 6)
    k = len(requests)
    rows = []
    for m in methods:
        t = times[m]
        p50 = statistics.median(t)
        row = {
            "method": m,
            "p50_ms": 1e3 * p50,
            "p90_ms": 1e3 * pct(t, 90),
            "persons_per_s": 1 / p50,
            "keypoints_per_s": k / p50,
            "decoder_passes_per_keypoint": (passes if m.startswith("sdk") else None),
        }
        if m == "sdk-ort":
            row["fraction_of_matmul_peak"] = flops / p50 / (gflops * 1e9)
        rows.append(row)
    if "reference" in times:
        ref50 = statistics.median(times["reference"])
        for row in rows:
            row["speedup_vs_reference"] = ref50 / (row["p50_ms"] / 1e3)
    ref_passes = None
    if "reference" in outputs:
        ref_passes = 13  # HF generate: one pass per new token (max_new_tokens)
        for row in rows:
            if row["method"] == "reference":
                row["decoder_passes_per_keypoint"] = ref_passes
    # agreement: the reference's greedy answers vs the SDK's constrained answers
    agreement = None
    if "reference" in outputs and "sdk-ort" in outputs:
        ref_answers = [a.text for a in outputs["reference"]]
        sdk_answers = [kp.answer for kp in outputs["sdk-ort"][0]]
        agreement = sum(a == b for a, b in zip(ref_answers, sdk_answers)) / k
    result = {
        "model": label,
        "parameters": manifest["model"]["parameters"],
        "keypoints": k,
        "persons": 1,
        "reps": args.reps,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "matmul_peak_gflops": gflops,
        "sdk_person_gflop": flops / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reference_vs_sdk_answer_agreement": agreement,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(
        f"{label}: {manifest['model']['parameters'] / 1e6:.1f}M params, {k} keypoints, 1 person, "
        f"{args.reps} reps (medians), matmul peak {gflops:.0f} GFLOP/s"
    )
    print(f"{'method':<12}{'p50 ms':>10}{'p90 ms':>10}{'kpt/s':>10}{'persons/s':>11}{'passes/kpt':>12}{'speedup':>9}")
    for r in rows:
        passes_s = "" if r["decoder_passes_per_keypoint"] is None else str(r["decoder_passes_per_keypoint"])
        sp = f"{r['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in r else ""
        print(
            f"{r['method']:<12}{r['p50_ms']:>10.1f}{r['p90_ms']:>10.1f}{r['keypoints_per_s']:>10.1f}"
            f"{r['persons_per_s']:>11.2f}{passes_s:>12}{sp:>9}"
        )
    for r in rows:
        if "fraction_of_matmul_peak" in r:
            print(
                f"sdk-ort: {result['sdk_person_gflop']:.2f} GFLOP/person = {100 * r['fraction_of_matmul_peak']:.1f}% "
                "of the matmul peak"
            )
    if agreement is not None:
        print(f"reference (greedy) vs sdk-ort (constrained) identical answers: {100 * agreement:.0f}%")
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"throughput_{label}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
