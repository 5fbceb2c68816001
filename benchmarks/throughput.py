"""Latency / throughput of the SDK against the reference way of running LocLLM.

    python benchmarks/throughput.py --preset tiny|small|base [--reps 15] [--keypoints 17] [--out DIR]
    python benchmarks/throughput.py --checkpoint CKPT --engine ENGINE

Same weights, same machine, same run: the methods are interleaved rep by rep after
warm-up, and medians are reported. Methods:
  reference   the official procedure in PyTorch + transformers (K prompts per person, the
              crop through the ViT K times, left padding, HF generate greedy, regex parse)
  sdk-torch   Pose.locate on the torch backend (the SDK's algorithm, PyTorch kernels)
  sdk-ort     Pose.locate on ONNX Runtime (the SDK as deployed)
  sdk-ort-flip  the same with flip test-time augmentation (not in the default --methods)
  sdk-ort-int8  Pose.locate on the engine's int8 variant (--engine-int8, or built from the
              engine under --workdir with quantize.reduce_engine, forced past its parity gate on
              --calibration-images scenes, whose figure is reported; not in the default --methods)
Random-weight presets are created (and their engines built) on first use under --workdir.
The FLOPs per person over the time give the fraction of the machine's matmul peak, measured in
the same run: torch's fp32 matmul, ONNX Runtime's fp32 MatMul and its int8 MatMulInteger
(uint8 x int8 -> int32, the kernel of the int8 engines) on 2048 x 2048 squares. The int8 engine's
fraction is of the time its FLOPs would take at those peaks: its quantized linear layers at the
int8 peak, its attention at the fp32 one.
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

METHODS = ("reference", "sdk-torch", "sdk-ort", "sdk-ort-flip", "sdk-ort-int8")

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export", "benchmarks"):
    sys.path.insert(0, str(_ROOT / _sub))


def ensure_model(preset: str, workdir: Path, teach_format: int, dims: int = 2) -> tuple[Path, Path]:
    """A random-weight preset checkpoint, taught the answer format for ``teach_format`` steps
    (so greedy answers are well-formed and comparable with constrained ones), and its engine."""
    from locllm_export.build import build_onnx_engine
    from locllm_training.init import init_checkpoint

    name = f"{preset}-format{teach_format}" if teach_format else preset
    ckpt, engine = workdir / name / "checkpoint", workdir / name / "engine"
    if not (ckpt / "model.safetensors").is_file():
        print(f"creating the {name} checkpoint in {ckpt} ...")
        init_checkpoint(preset, ckpt, seed=0, dims=dims, teach_format_steps=teach_format)
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


def ort_matmul_peak_gops(
    int8: bool, n: int = 2048, reps: int = 5, threads: int | None = None, cpu_time: bool = False
) -> float:
    """ONNX Runtime's sustained n x n matmul rate (GOP/s, median of reps): fp32 MatMul, or with
    ``int8`` MatMulInteger of a uint8 input and a constant int8 weight (the op the int8 engines'
    DynamicQuantizeMatMul runs; VNNI kernels where the CPU has them). ``cpu_time``: per second
    of this process's CPU time instead of wall time (steadier on a shared machine; with one
    thread, the rate of one core)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "B")
        node, types = helper.make_node("MatMulInteger", ["A", "B"], ["Y"]), (TensorProto.UINT8, TensorProto.INT32)
    else:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
        node, types = helper.make_node("MatMul", ["A", "B"], ["Y"]), (TensorProto.FLOAT, TensorProto.FLOAT)
    graph = helper.make_graph(
        [node],
        "peak",
        [helper.make_tensor_value_info("A", types[0], [n, n])],
        [helper.make_tensor_value_info("Y", types[1], [n, n])],
        [b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"A": a})
    clock = time.process_time if cpu_time else time.perf_counter
    rates = []
    for _ in range(reps):
        t = clock()
        sess.run(None, {"A": a})
        rates.append(2 * n**3 / (clock() - t) / 1e9)
    return statistics.median(rates)


def person_flops(manifest, prefix_len: int, tails: list[int], answer_tokens: int, logits_per_row: int) -> float:
    """Useful FLOPs of the SDK for one person: the ViT once, the prefix once, each row's
    tail (its suffix after the common head) plus the ``answer_tokens`` it is fed, and the
    vocabulary projection at ``logits_per_row`` positions per row (pads not counted).
    Linear layers 2*params*tokens, attention 4*hidden*queries*keys per layer."""
    return sum(person_flop_parts(manifest, prefix_len, tails, answer_tokens, logits_per_row).values())


def _flop_facts(manifest):
    """The model facts of an EngineManifest (or its ModelInfo, or facts alike) that the FLOP
    models need; ValueError for a manifest without the per-part parameter counts."""
    m = getattr(manifest, "model", manifest)
    if m.decoder_layer_parameters is None or m.vision_parameters is None:
        raise ValueError("this engine's manifest predates the per-part parameter counts: rebuild it for FLOPs")
    return m


def _vit_flop_parts(m, crops: int) -> dict[str, float]:
    """``vision_linear`` and ``vision_attention`` of ``crops`` crops through the ViT (CLS + patches)."""
    tokens = m.num_patches + 1
    return {
        "vision_linear": crops * 2 * m.vision_parameters * tokens,
        "vision_attention": crops * m.vision_layers * 4 * tokens * tokens * m.vision_hidden_size,
    }


def person_flop_parts(
    manifest, prefix_len: int, tails: list[int], answer_tokens: int, logits_per_row: int
) -> dict[str, float]:
    """``person_flops`` by part: ``vision_linear``, ``vision_attention``, ``decoder_linear``,
    ``decoder_attention`` and ``lm_head`` (what an int8 engine quantizes: the linear parts)."""
    m = _flop_facts(manifest)
    h, layers, v = m.hidden_size, m.num_layers, m.vocab_size
    lm_params = m.decoder_layer_parameters
    rows = [t + answer_tokens for t in tails]
    lm_tokens = prefix_len + sum(rows)
    keys = prefix_len * prefix_len / 2 + sum(r * (prefix_len + r / 2) for r in rows)  # query-key pairs
    return {
        **_vit_flop_parts(m, crops=1),
        "decoder_linear": 2 * lm_params * lm_tokens,
        "decoder_attention": layers * 4 * h * keys,
        "lm_head": 2 * v * h * (1 + len(rows) * logits_per_row),
    }


def reference_flop_parts(manifest, prompt_lens: list[int], new_tokens: int) -> dict[str, float]:
    """The official procedure's FLOPs for one person (``reference_locate``), by
    ``person_flop_parts``'s parts and counting: the crop through the ViT once per request; the
    prompts (``prompt_lens`` tokens) left-padded to the longest and prefilled together, pads
    computed; then ``new_tokens - 1`` one-token passes per row (HF generate feeds every new token
    but the last) and the vocabulary projection at one position per row and pass. Its ratio to
    the SDK's FLOPs is the speedup the SDK would have at the reference's FLOP rate."""
    m = _flop_facts(manifest)
    h, layers, v = m.hidden_size, m.num_layers, m.vocab_size
    rows, width, fed = len(prompt_lens), max(prompt_lens), new_tokens - 1
    keys = rows * (width * width / 2 + sum(width + j for j in range(1, fed + 1)))  # query-key pairs
    return {
        **_vit_flop_parts(m, crops=rows),
        "decoder_linear": 2 * m.decoder_layer_parameters * rows * (width + fed),
        "decoder_attention": layers * 4 * h * keys,
        "lm_head": 2 * v * h * rows * new_tokens,
    }


def int8_flops(parts: dict[str, float], precision) -> float:
    """The FLOPs an engine of ``precision`` (its manifest's) runs in int8: the linear layers of
    its int8 parts (attention stays fp32)."""
    flops = parts["vision_linear"] if precision.vision == "int8" else 0.0
    if precision.decoder == "int8":
        flops += parts["decoder_linear"] + parts["lm_head"]
    return flops


def grammar_token_counts(grammar) -> tuple[int, int]:
    """(answer tokens fed per row, positions whose logits are computed per row) by
    ``constrained_decode``: every slot before the last number's end is fed, and logits are
    read at the free digits and at every number position (the scores)."""
    needed = set(grammar.free_positions) | {p for a, b in grammar.number_spans for p in range(a, b)}
    return max(needed), len(needed)


def keypoint_requests(library, k: int):
    """k keypoints: COCO-17 first, then the library's others, then relational midpoints."""
    coco = list(library.skeletons["coco17"].keypoints)
    names = {n: library.descriptions[n] for n in coco + [n for n in library.descriptions if n not in coco]}
    for i, a in enumerate(coco):
        for b in coco[i + 1 :]:
            if len(names) >= k:
                break
            names[f"midpoint of the {a} and the {b}"] = f"It is the point halfway between the {a} and the {b}."
    return library.resolve(dict(list(names.items())[:k]))


def timed(fns: dict, reps: int, warmup: int) -> tuple[dict, dict]:
    """Interleaved timing: every rep runs every method once, so load hits all alike."""
    outputs, times = {}, {m: [] for m in fns}
    for m, fn in fns.items():
        for _ in range(warmup):
            outputs[m] = fn()
    for _ in range(reps):
        for m, fn in fns.items():
            t = time.perf_counter()
            outputs[m] = fn()
            times[m].append(time.perf_counter() - t)
    return outputs, times


def cpu_model() -> str:
    """The CPU's model name (the same VM type can land on different hosts from day to day)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def pct(xs, q):
    return float(np.percentile(xs, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small", "base"))
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--engine", type=Path)
    ap.add_argument("--engine-int8", type=Path, help="sdk-ort-int8: the int8 engine (default: built from the engine)")
    ap.add_argument(
        "--calibration-images",
        type=int,
        default=None,
        help="scenes of the parity gate of the int8 engine built here (default: the build's); its figure is reported",
    )
    ap.add_argument(
        "--teach-format",
        type=int,
        default=100,
        metavar="STEPS",
        help="teach the random preset the answer format first (0: purely random weights)",
    )
    ap.add_argument("--workdir", type=Path, default=_ROOT / "runs" / "bench")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--keypoints", type=int, default=17, help="keypoints per person (from coco17 + extras)")
    ap.add_argument("--methods", default="reference,sdk-torch,sdk-ort")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and ORT (default: all cores)")
    ap.add_argument("--sections", default="compare,ablation,scaling", help="compare, ablation, scaling")
    ap.add_argument("--out", type=Path, help="write results JSON (and the scaling plot) here")
    ap.add_argument("--label", help="the model's name in the results (default: the preset or checkpoint folder)")
    args = ap.parse_args(argv)

    import torch
    from locllm_sdk import Pose
    from locllm_sdk.crop import crop_geometry
    from locllm_sdk.manifest import read_manifest
    from locllm_sdk.pipeline import crop_batch
    from locllm_sdk.protocol import MAX_NEW_TOKENS, PromptTokenizer
    from locllm_training.model import load_checkpoint
    from locllm_training.reference import reference_locate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint and args.engine:
        ckpt, engine = args.checkpoint, args.engine
        label = args.label or ckpt.name
    else:
        ckpt, engine = ensure_model(args.preset, args.workdir, args.teach_format)
        label = args.label or args.preset
    manifest = read_manifest(engine)
    sections = {x.strip() for x in args.sections.split(",")}
    methods = [m.strip() for m in args.methods.split(",")] if "compare" in sections else []
    if args.calibration_images is not None and args.calibration_images < 1:
        ap.error(f"--calibration-images must be >= 1, got {args.calibration_images}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")

    ort_pose = Pose(engine, backend="onnxruntime", threads=args.threads)
    int8_pose = None
    if "sdk-ort-int8" in methods:
        int8_dir = args.engine_int8
        if int8_dir is None:
            from locllm_export.quantize import DEFAULT_CALIBRATION_IMAGES
            from precision import reduced_engine

            images = DEFAULT_CALIBRATION_IMAGES if args.calibration_images is None else args.calibration_images
            int8_dir = reduced_engine(Path(engine), args.workdir / "int8", "int8", "int8", calibration_images=images)
        int8_pose = Pose(int8_dir, backend="onnxruntime", threads=args.threads)
        got = int8_pose.manifest.model.checkpoint_sha256, ort_pose.manifest.model.checkpoint_sha256
        if got[0] != got[1]:
            ap.error(f"--engine-int8 {int8_dir} is an engine of another checkpoint than {engine}")
    # only when measured: a 1B-class model's torch copy is 4 GB more resident memory
    torch_pose = Pose(ckpt, backend="torch", threads=args.threads) if "sdk-torch" in methods else None
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

    pixels = crop_batch(img, [crop_geometry(box, img.shape[:2], ort_pose.spec.image_size)], ort_pose.spec)

    def run_reference():
        return reference_locate(ref_model, tok, pixels, [(r.name, r.description) for r in requests])[0]

    runners = {
        "reference": run_reference,
        "sdk-torch": lambda: torch_pose.locate(img, {r.name: r.description for r in requests}, [box]),
        "sdk-ort": lambda: ort_pose.locate(img, {r.name: r.description for r in requests}, [box]),
        "sdk-ort-flip": lambda: ort_pose.locate(img, {r.name: r.description for r in requests}, [box], flip=True),
        "sdk-ort-int8": lambda: int8_pose.locate(img, {r.name: r.description for r in requests}, [box]),
    }
    outputs, times = timed({m: runners[m] for m in methods}, args.reps, args.warmup)

    gflops = matmul_peak_gflops()
    ort_peaks = {"fp32": ort_matmul_peak_gops(False, threads=args.threads)}
    if int8_pose is not None:
        ort_peaks["int8"] = ort_matmul_peak_gops(True, threads=args.threads)
    passes = outputs["sdk-ort"].info["decoder_passes"] if "sdk-ort" in outputs else None
    prefix_len, tails = served_token_counts(ort_pose, requests)
    try:
        parts = person_flop_parts(manifest, prefix_len, tails, *grammar_token_counts(ort_pose.spec.grammar))
        flops = sum(parts.values())
    except ValueError as e:
        print(f"FLOPs not reported: {e}")
        parts, flops = None, None
    ref_passes = MAX_NEW_TOKENS[manifest.model.coord_dims]  # HF generate: one pass per new token
    ref_parts = ref_flops = None
    if parts:
        ref_parts = reference_flop_parts(manifest, [prefix_len + t for t in tails], ref_passes)
        ref_flops = sum(ref_parts.values())
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
        if m == "reference" and ref_flops:
            row["fraction_of_matmul_peak"] = ref_flops / p50 / (gflops * 1e9)
        if m == "sdk-ort" and flops:
            row["fraction_of_matmul_peak"] = flops / p50 / (gflops * 1e9)
            row["fraction_of_ort_fp32_peak"] = flops / p50 / (ort_peaks["fp32"] * 1e9)
        if m == "sdk-ort-int8" and flops:
            quantized = int8_flops(parts, int8_pose.manifest.precision)
            at_peaks = quantized / (ort_peaks["int8"] * 1e9) + (flops - quantized) / (ort_peaks["fp32"] * 1e9)
            row["int8_gflop_per_person"] = quantized / 1e9
            row["fraction_of_mixed_peak"] = at_peaks / p50
            row["fraction_of_ort_int8_peak"] = flops / p50 / (ort_peaks["int8"] * 1e9)
        rows.append(row)
    if "sdk-ort" in times:
        ort50 = statistics.median(times["sdk-ort"])
        for row in rows:
            row["speedup_vs_sdk_ort"] = ort50 / (row["p50_ms"] / 1e3)
    if "reference" in times:
        ref50 = statistics.median(times["reference"])
        for row in rows:
            row["speedup_vs_reference"] = ref50 / (row["p50_ms"] / 1e3)
    if "reference" in outputs:
        for row in rows:
            if row["method"] == "reference":
                row["decoder_passes_per_keypoint"] = ref_passes
    # agreement: the reference's greedy answers vs the SDK's constrained answers
    agreement = None
    if "reference" in outputs and "sdk-ort" in outputs:
        ref_answers = [a.text for a in outputs["reference"]]
        sdk_answers = [kp.answer for kp in outputs["sdk-ort"][0]]
        agreement = sum(a == b for a, b in zip(ref_answers, sdk_answers)) / k
    # exactness of the SDK's computation whatever the weights: its greedy mode must produce the
    # reference's tokens (constrained answers can only equal well-formed greedy ones)
    greedy_agreement = None
    if "reference" in outputs:
        ref_answers = [a.text for a in outputs["reference"]]
        ort_pose.decoding = "free"  # the loaded engine, greedy (a second Pose would inflate peak RSS)
        try:
            free_res = ort_pose.locate(img, {r.name: r.description for r in requests}, [box])
        finally:
            ort_pose.decoding = "constrained"
        greedy_agreement = sum(a == kp.answer for a, kp in zip(ref_answers, free_res[0])) / k
    if agreement is not None:
        complete = [i for i, a in enumerate(outputs["reference"]) if a.complete]
        print(
            f"reference answers complete (all numbers): {len(complete)}/{k}; constrained == reference on them: "
            f"{sum(ref_answers[i] == sdk_answers[i] for i in complete)}/{len(complete)}"
        )
    result = {
        "model": label,
        "parameters": manifest.model.parameters,
        "keypoints": k,
        "persons": 1,
        "reps": args.reps,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort_pose.backend.describe().get("onnxruntime"),
        },
        "matmul_peak_gflops": gflops,
        "ort_matmul_peak_gops": ort_peaks,
        "sdk_person_gflop_parts": {k: v / 1e9 for k, v in parts.items()} if parts else None,
        "sdk_person_gflop": flops / 1e9 if flops else None,
        "reference_person_gflop_parts": {k: v / 1e9 for k, v in ref_parts.items()} if ref_parts else None,
        "reference_person_gflop": ref_flops / 1e9 if ref_flops else None,
        # the speedup the SDK would have at the reference's FLOP rate: what fewer FLOPs alone give
        "reference_over_sdk_flops": ref_flops / flops if flops else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reference_vs_sdk_answer_agreement": agreement,
        "reference_vs_sdk_greedy_agreement": greedy_agreement,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(
        f"{label}: {manifest.model.parameters / 1e6:.1f}M params, {k} keypoints, 1 person, "
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
    print("ONNX Runtime matmul peaks: " + ", ".join(f"{k} {v:.0f} GOP/s" for k, v in ort_peaks.items()) + " (2048^2)")
    if flops:
        print(
            f"FLOPs per person: reference {result['reference_person_gflop']:.1f} G, "
            f"sdk {result['sdk_person_gflop']:.1f} G ({result['reference_over_sdk_flops']:.2f}x fewer: "
            "the speedup at the reference's FLOP rate)"
        )
    for r in rows:
        if r["method"] == "reference" and "fraction_of_matmul_peak" in r:
            print(f"reference: {100 * r['fraction_of_matmul_peak']:.1f}% of the matmul peak (torch)")
        elif "fraction_of_matmul_peak" in r:
            print(
                f"sdk-ort: {result['sdk_person_gflop']:.2f} GFLOP/person = {100 * r['fraction_of_matmul_peak']:.1f}% "
                f"of the matmul peak (torch), {100 * r['fraction_of_ort_fp32_peak']:.1f}% of ONNX Runtime's fp32 peak"
            )
        if "fraction_of_mixed_peak" in r:
            print(
                f"sdk-ort-int8: {r['int8_gflop_per_person']:.2f} of the {result['sdk_person_gflop']:.2f} GFLOP/person "
                f"in int8; {100 * r['fraction_of_mixed_peak']:.1f}% of the int8 + fp32 peaks "
                f"({100 * r['fraction_of_ort_int8_peak']:.1f}% of the int8 peak alone); "
                f"{r.get('speedup_vs_sdk_ort', float('nan')):.2f}x sdk-ort"
            )
    if "sdk-ort-int8" in outputs and "sdk-ort" in outputs:
        same = sum(a.answer == b.answer for a, b in zip(outputs["sdk-ort"][0], outputs["sdk-ort-int8"][0]))
        result["int8_vs_fp32_identical_answers"] = same / k
        print(f"sdk-ort-int8 vs sdk-ort identical answers: {same}/{k}")
    if int8_pose is not None:  # the build's parity gate, as the int8 engine's manifest records it
        from locllm_export.quantize import recorded_gate

        gate = result["int8_engine_gate"] = recorded_gate(int8_pose.manifest.verification)
        if gate.get("calibration answers"):
            print(
                f"int8 engine's parity gate: {gate['identical answers']:.0f}/{gate['calibration answers']:.0f} "
                f"calibration answers equal fp32's ({gate['calibration images']:.0f} scenes)"
            )
    if "sdk-ort-int8" in outputs and "reference" in outputs:
        same = sum(a.text == b.answer for a, b in zip(outputs["reference"], outputs["sdk-ort-int8"][0]))
        result["reference_vs_int8_answer_agreement"] = same / k
        print(f"reference (greedy) vs sdk-ort-int8 (constrained) identical answers: {same}/{k}")
    if agreement is not None:
        print(f"reference (greedy) vs sdk-ort (constrained) identical answers: {100 * agreement:.0f}%")
    if greedy_agreement is not None:
        print(
            f"reference (greedy) vs sdk-ort (decoding='free', greedy) identical answers: {100 * greedy_agreement:.0f}%"
        )
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    save(result, args.out, label)
    if "ablation" in sections:
        result["ablation"] = ablation_ladder(ort_pose, pixels, requests, args.reps, args.warmup, int8_pose)
        save(result, args.out, label)
    if "scaling" in sections:
        result["scaling"] = scaling(ort_pose, img, args.reps, args.warmup, manifest)
        if int8_pose is not None:  # the same sweep on the int8 engine (its FLOPs are the fp32 engine's)
            save(result, args.out, label)
            result["scaling_int8"] = scaling(int8_pose, img, args.reps, args.warmup, manifest, name="sdk-ort-int8")
    if args.out:
        save(result, args.out, label)
        if "scaling" in result:
            plot_scaling(result, args.out / f"scaling_{label}.png")
            print(f"plots: {args.out / f'scaling_{label}.png'}")
    return 0


def save(result: dict, out: Path | None, label: str) -> None:
    """Results are written after every section: a long run that dies keeps what it measured."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"throughput_{label}.json").write_text(json.dumps(result, indent=2) + "\n")


INT8_RUNG = "sdk-int8"  # the last rung on the int8 engine: precision as one more step of the ladder


def ablation_ladder(pose, pixels, requests, reps: int, warmup: int, int8_pose=None) -> list[dict]:
    """Each rung's median time, side by side; with ``int8_pose`` a last rung runs the final
    one on the int8 engine ("answers == previous rung": int8 == fp32)."""
    from ablation import RUNGS, run_rung

    calls = {r: (lambda r=r: run_rung(r, pose, pixels, requests)) for r in RUNGS}
    if int8_pose is not None:
        calls[INT8_RUNG] = lambda: run_rung(RUNGS[-1], int8_pose, pixels, requests)
    outputs, times = timed(calls, reps, warmup)
    base = statistics.median(times[RUNGS[0]])
    rows, prev = [], None
    print(f"ablation ({len(requests)} keypoints, 1 person, onnxruntime):")
    print(f"  {'rung':<22}{'p50 ms':>10}{'vs naive':>10}{'vs prev':>9}  answers == previous rung")
    for r in calls:
        p50 = statistics.median(times[r])
        same = None if prev is None else outputs[r] == outputs[prev]
        rows.append(
            {
                "rung": r,
                "p50_ms": 1e3 * p50,
                "speedup_vs_naive": base / p50,
                "speedup_vs_previous": None if prev is None else statistics.median(times[prev]) / p50,
                "answers_equal_previous": same,
            }
        )
        vs_prev = "" if prev is None else f"{rows[-1]['speedup_vs_previous']:.2f}x"
        print(f"  {r:<22}{1e3 * p50:>10.1f}{base / p50:>9.1f}x{vs_prev:>9}  {'' if same is None else same}")
        prev = r
    return rows


def served_token_counts(pose, requests) -> tuple[int, list[int]]:
    """(prefix tokens, each row's tail tokens) as ``Pose`` feeds them: the rounds' common
    head is prefilled with the prefix."""
    from locllm_sdk.decoding import split_common_head

    head, tails = split_common_head([pose.spec.tokenizer.round_ids(r.name, r.description) for r in requests])
    return len(pose.spec.prefix_ids) + len(head), [len(t) for t in tails]


SCALING_KEYPOINTS = (1, 2, 4, 8, 17, 32, 64)


def extra_keypoint_flop_fraction(manifest: dict, pose) -> float:
    """The FLOP analogue of the measured ratio: slope of FLOPs over the scaling's keypoint
    counts / FLOPs of one keypoint. The latency ratio would equal it if every FLOP ran at
    the same speed."""
    answer_tokens, logits_per_row = grammar_token_counts(pose.spec.grammar)
    flops = []
    for k in SCALING_KEYPOINTS:
        prefix, tails = served_token_counts(pose, keypoint_requests(pose.library, k))
        flops.append(person_flops(manifest, prefix, tails, answer_tokens, logits_per_row))
    slope = float(np.polyfit(np.array(SCALING_KEYPOINTS, float), np.array(flops), 1)[0])
    return slope / flops[0]


def scaling(pose, img, reps: int, warmup: int, manifest: dict | None = None, name: str = "sdk-ort") -> dict:
    rng = np.random.default_rng(1)
    h, w = img.shape[:2]
    out: dict = {"keypoints": [], "persons": []}
    for k in SCALING_KEYPOINTS:
        req = {r.name: r.description for r in keypoint_requests(pose.library, k)}
        _, t = timed({"x": lambda req=req: pose.locate(img, req, [[40.0, 30.0, 260.0, 420.0]])}, reps, warmup)
        out["keypoints"].append({"keypoints": k, "p50_ms": 1e3 * statistics.median(t["x"])})
    req17 = {r.name: r.description for r in keypoint_requests(pose.library, 17)}
    for n in (1, 2, 4, 8, 16):
        boxes = []
        for _ in range(n):
            bw, bh = rng.uniform(0.3, 0.6) * w, rng.uniform(0.4, 0.8) * h
            boxes.append([float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), float(bw), float(bh)])
        _, t = timed({"x": lambda b=boxes: pose.locate(img, req17, b)}, reps, warmup)
        out["persons"].append({"persons": n, "p50_ms": 1e3 * statistics.median(t["x"])})
    ks = np.array([r["keypoints"] for r in out["keypoints"]], float)
    ms = np.array([r["p50_ms"] for r in out["keypoints"]], float)
    slope = float(np.polyfit(ks, ms, 1)[0])  # ms per additional keypoint
    out["ms_per_extra_keypoint"] = slope
    out["one_keypoint_ms"] = float(ms[0])
    out["extra_keypoint_fraction_of_one"] = slope / float(ms[0])
    print(f"scaling ({name}):")
    print("  keypoints: " + ", ".join(f"{r['keypoints']}: {r['p50_ms']:.0f} ms" for r in out["keypoints"]))
    print("  persons (17 kpts): " + ", ".join(f"{r['persons']}: {r['p50_ms']:.0f} ms" for r in out["persons"]))
    print(f"  one more keypoint costs {slope:.1f} ms = {100 * slope / ms[0]:.1f}% of the one-keypoint latency")
    if manifest is not None:
        try:
            floor = extra_keypoint_flop_fraction(manifest, pose)
        except ValueError as e:
            print(f"  FLOP ratio not reported: {e}")
        else:
            out["extra_keypoint_flop_fraction"] = floor
            print(f"  (its FLOPs are {100 * floor:.1f}% of one keypoint's: the ratio at equal speed per FLOP)")
    return out


def plot_scaling(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = result["scaling"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    k = [r["keypoints"] for r in sc["keypoints"]]
    axes[0].plot(k, [r["p50_ms"] for r in sc["keypoints"]], "o-", label="sdk (onnxruntime)")
    int8 = result.get("scaling_int8")
    if int8:
        axes[0].plot(k, [r["p50_ms"] for r in int8["keypoints"]], "s-", label="sdk (onnxruntime, int8 engine)")
    ref = next((r for r in result["rows"] if r["method"] == "reference"), None)
    if ref:
        per_kpt = ref["p50_ms"] / result["keypoints"]
        axes[0].plot(k, [per_kpt * x for x in k], "--", color="gray", label="reference (linear in keypoints)")
    axes[0].set_xlabel("keypoints per person")
    axes[0].set_ylabel("latency p50 (ms)")
    axes[0].set_title("latency vs keypoints (1 person)")
    axes[0].legend()
    p = [r["persons"] for r in sc["persons"]]
    axes[1].plot(p, [r["p50_ms"] for r in sc["persons"]], "o-", label="sdk (onnxruntime)")
    if int8:
        axes[1].plot(p, [r["p50_ms"] for r in int8["persons"]], "s-", label="sdk (onnxruntime, int8 engine)")
        axes[1].legend()
    axes[1].set_xlabel("persons per image")
    axes[1].set_ylabel("latency p50 (ms)")
    axes[1].set_title("latency vs persons (17 keypoints each)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['model']} ({result['parameters'] / 1e6:.0f}M params), {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
