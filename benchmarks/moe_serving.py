"""Serving cost of MoE LoRA: one base, plain LoRA merged vs MoE LoRA unmerged.

    python benchmarks/moe_serving.py [--preset small] [--experts 4 --rank 4 --top-k 2] [--reps 10]
        [--out benchmarks/results]

Both adapters sit on the LM's q/v of the same base checkpoint (a random-weight preset, created
under --workdir on first use), at matched trainable parameter counts: MoE LoRA with E experts
of rank r, a zero expert and a gate per layer, and a plain LoRA whose rank gives the nearest
count. Their B (and the gates) are random, so every adapter changes the outputs. The plain
LoRA is merged into the weights at export (its engine has the base's graphs and shapes,
whatever its rank); the MoE one stays in both decoder graphs (gate, TopK, the stacked experts'
two matmuls on each q/v). On the torch backend both run unmerged. Timed: ms per person for K
keypoints, methods interleaved rep by rep after warm-up (``throughput.timed``), medians of the
wall time and of the process's CPU time per call (on a shared machine the CPU time is the steadier
measure of the work; with ``--threads 1`` it is the work of one thread, no pool spinning in it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export", "benchmarks"):
    sys.path.insert(0, str(_ROOT / _sub))

from throughput import cpu_model, keypoint_requests, pct, timed  # noqa: E402

ADAPTERS = ("plain", "moe")
BACKENDS = {"ort": "onnxruntime", "torch": "torch"}
STAGES = ("vision", "prefix", "decode")


def lm_lora_parameters(model) -> int:
    """Trainable parameters of the LM's adapter (plain LoRA's A and B, or MoE LoRA's experts and gates)."""
    return sum(p.numel() for n, p in model.llm.named_parameters() if ".lora_" in n)


def make_variants(preset: str, workdir: Path, settings, rank: int, seed: int = 0) -> dict:
    """The base checkpoint and its two adapter variants (checkpoint, engine, parameter count, rank)."""
    import torch
    from locllm_export.build import build_onnx_engine
    from locllm_training.init import init_checkpoint
    from locllm_training.model import load_checkpoint, save_checkpoint, to_llm_lora, to_moe_lora

    base = workdir / preset / "base"
    if not (base / "model.safetensors").is_file():
        print(f"creating the {preset} base checkpoint in {base} ...")
        init_checkpoint(preset, base, seed=seed)
    model = load_checkpoint(base)
    moe = to_moe_lora(model, settings, r=rank)
    moe_count = lm_lora_parameters(moe)
    # plain LoRA: r * (in + out) per target Linear; the rank that comes nearest the MoE count
    per_rank = sum(m.in_features + m.out_features for n, m in moe.llm.named_modules() if n.endswith(".base_layer"))
    plain = to_llm_lora(model, r=max(1, round(moe_count / per_rank)))
    variants = {}
    torch.manual_seed(seed)
    for name, variant in (("plain", plain), ("moe", moe)):
        with torch.no_grad():
            for key, p in variant.llm.named_parameters():
                if ".lora_B" in key or ".lora_experts_B" in key:
                    p.normal_(0.0, 0.02)
        ckpt, engine = workdir / preset / name, workdir / preset / f"{name}-engine"
        label = f"{variant.config.moe_llm}" if name == "moe" else f"plain LoRA r={variant.config.lora_llm.r}"
        built = (engine / "manifest.json").is_file() and (ckpt / "config.json").is_file()
        if not built or json.loads((ckpt / "config.json").read_text()).get("benchmark_variant") != label:
            save_checkpoint(variant.eval(), base, ckpt, extra={"benchmark_variant": label})
            print(f"{name}: {label}")
            print(build_onnx_engine(ckpt, engine, overwrite=True).summary())
        variants[name] = {
            "checkpoint": ckpt,
            "engine": engine,
            "adapter": label,
            "lm_adapter_parameters": lm_lora_parameters(variant),
            "rank": variant.config.lora_llm.r,
        }
    return variants


def graph_ops(path: Path) -> dict:
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {"nodes": sum(ops.values()), "MatMul": ops["MatMul"], "TopK": ops["TopK"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=("tiny", "small", "base"))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4, help="rank of each expert")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--no-zero-expert", action="store_true")
    ap.add_argument("--keypoints", type=int, default=17)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backends", default="ort,torch", help=f"from {', '.join(BACKENDS)}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=_ROOT / "runs" / "bench-moe")
    ap.add_argument("--out", type=Path, help="write moe_serving_<preset>.json here")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in BACKENDS for b in backends):
        ap.error(f"--backends takes names from {', '.join(BACKENDS)}, got {args.backends!r}")

    import onnxruntime
    import torch
    from locllm_sdk import Pose
    from locllm_sdk.manifest import read_manifest
    from locllm_training.moe_lora import MoeLoraSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = MoeLoraSettings(experts=args.experts, top_k=args.top_k, zero_expert=not args.no_zero_expert)
    variants = make_variants(args.preset, args.workdir, settings, args.rank)

    poses = {}
    for name, v in variants.items():
        for b in backends:
            source = v["engine"] if b == "ort" else v["checkpoint"]
            poses[f"{name}-{b}"] = Pose(source, backend=BACKENDS[b], threads=args.threads)
    any_pose = next(iter(poses.values()))
    requests = {r.name: r.description for r in keypoint_requests(any_pose.library, args.keypoints)}
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (480, 360, 3)).astype(np.uint8)
    box = [40.0, 30.0, 260.0, 420.0]
    stages = {m: [] for m in poses}
    cpu = {m: [] for m in poses}

    def runner(method: str):
        def run():
            start = time.process_time()
            res = poses[method].locate(img, requests, [box])
            cpu[method].append(time.process_time() - start)
            stages[method].append(res.info["timings_ms"])
            return res

        return run

    # plain and MoE alternate within every rep, on each backend
    methods = [f"{a}-{b}" for b in backends for a in ADAPTERS]
    load_before = os.getloadavg()[0]
    outputs, times = timed({m: runner(m) for m in methods}, args.reps, args.warmup)

    rows = []
    for m in methods:
        adapter, backend = m.split("-")
        t = times[m]
        kept = stages[m][args.warmup :]
        cpu_s = cpu[m][args.warmup :]
        row = {
            "method": m,
            "adapter": variants[adapter]["adapter"],
            "lm_adapter_parameters": variants[adapter]["lm_adapter_parameters"],
            "p50_ms": 1e3 * statistics.median(t),
            "p90_ms": 1e3 * pct(t, 90),
            "stage_p50_ms": {s: statistics.median(k[s] for k in kept) for s in STAGES},
            "cpu_p50_ms": 1e3 * statistics.median(cpu_s),
            "decoder_passes": outputs[m].info["decoder_passes"],
        }
        plain = times[f"plain-{backend}"]
        row["vs_plain"] = statistics.median(t) / statistics.median(plain)
        row["cpu_vs_plain"] = statistics.median(cpu_s) / statistics.median(cpu[f"plain-{backend}"][args.warmup :])
        rows.append(row)
    graphs = {
        name: {g: graph_ops(v["engine"] / g) for g in ("decoder.onnx", "decoder_shared.onnx")}
        for name, v in variants.items()
    }
    manifest = read_manifest(variants["moe"]["engine"])
    result = {
        "model": args.preset,
        "parameters_moe_engine": manifest.model.parameters,
        "parameters_plain_engine": read_manifest(variants["plain"]["engine"]).model.parameters,
        "moe": {
            "experts": settings.experts,
            "rank": args.rank,
            "top_k": settings.top_k,
            "zero_expert": settings.zero_expert,
        },
        "plain_rank": variants["plain"]["rank"],
        "keypoints": len(requests),
        "persons": 1,
        "reps": args.reps,
        "warmup": args.warmup,
        "graphs": graphs,
        # the machine may be shared: its load around the timed reps says how much to trust them
        "machine": {
            "cpu_model": cpu_model(),
            "threads": torch.get_num_threads(),
            "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            "platform": platform.platform(),
        },
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(
        f"{args.preset}: plain LoRA r={result['plain_rank']} ({variants['plain']['lm_adapter_parameters']} LM adapter "
        f"parameters) vs {settings} r={args.rank} ({variants['moe']['lm_adapter_parameters']}); "
        f"{len(requests)} keypoints, 1 person, {args.reps} reps (medians), load average "
        f"{result['machine']['load_average_1m_before_after']}"
    )
    header = ("method", "p50 ms", "p90 ms", "vision", "prefix", "decode", "vs plain", "CPU ms", "CPU vs plain")
    print(f"{header[0]:<12}" + "".join(f"{h:>13}" for h in header[1:]))
    for r in rows:
        s = r["stage_p50_ms"]
        cells = (r["p50_ms"], r["p90_ms"], s["vision"], s["prefix"], s["decode"])
        print(
            f"{r['method']:<12}"
            + "".join(f"{v:>13.1f}" for v in cells)
            + f"{r['vs_plain']:>12.2f}x{r['cpu_p50_ms']:>13.1f}{r['cpu_vs_plain']:>12.2f}x"
        )
    for name, g in graphs.items():
        print(f"{name} decoder graphs: {g}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"moe_serving_{args.preset}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
