"""Build a LocLLM engine directory from a checkpoint.

    python export/build_engines.py --checkpoint ckpt/tiny --output engines/tiny [--targets onnx]
    python export/build_engines.py --checkpoint CKPT --output ENGINE --targets onnx,tensorrt,trtllm --precision fp16
    python export/build_engines.py --checkpoint CKPT --output ENGINE --targets tensorrt,trtllm --dry-run
    python export/build_engines.py --checkpoint CKPT --output ENGINE --decoder-precision int8 [--min-agreement 0.95]
    python export/build_engines.py --checkpoint CKPT --output ENGINE --targets triton [--triton-repository DIR]

onnx: merges LoRA (fp32, checked), exports the vision tower and the decoder step to ONNX,
writes the embedding table, tokenizer, descriptions and manifest.json, and verifies the
graphs in ONNX Runtime against PyTorch before the directory appears. With reduced-precision
graphs (--precision, --vision-precision, --decoder-precision: int8 = ONNX Runtime's dynamic
quantization, int8 MatMul weights with the KV cache fp32; fp16-weights = float16-stored weights
computed in fp32) the verified fp32 graphs are rewritten and the engine appears only if the
answers on rendered calibration scenes agree with the fp32 engine's (--min-agreement,
--calibration-images; --force keeps it anyway); the manifest records the precision, its method
and the agreement.

tensorrt,trtllm (on the NVIDIA GPU that will serve the engine; see docs/gpu.md): a TensorRT
plan of the vision tower (parity-gated against vision.onnx) and a TensorRT-LLM engine of the
decoder, added to the engine directory as backends.tensorrt. They build on the ONNX target:
without ``onnx`` in --targets an existing ONNX engine directory at --output is extended.
--dry-run prints the exact plan and builds nothing (no GPU, TensorRT or ONNX export needed).

triton: a Triton Inference Server model repository for the engine's TensorRT build (an ensemble
of a Python preprocessing model, the vision plan and the tensorrtllm backend; see docs/gpu.md),
written after the other targets to --triton-repository (default: ENGINE-triton next to it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("export", "training", "sdk"):
    sys.path.insert(0, str(_ROOT / _sub))  # run from a clone without install

TARGETS = ("onnx", "tensorrt", "trtllm", "triton")


def _vision_batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError("--vision-batch takes MIN,OPT,MAX (e.g. 1,4,32)") from e
    return lo, opt, hi


def _parser() -> argparse.ArgumentParser:
    from locllm_export.tensorrt_plan import DECODER_PRECISIONS, VISION_PRECISIONS, BuildOptions

    d = BuildOptions()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (our format)")
    ap.add_argument("--output", required=True, type=Path, help="engine directory to write")
    ap.add_argument("--targets", default="onnx", help=f"comma-separated, from {TARGETS}")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing engine directory")
    ap.add_argument(
        "--layerscale",
        choices=("checkpoint", "dino-file"),
        default="checkpoint",
        help="public LocLLM dirs: LayerScale gammas from the checkpoint or from --dino-weights",
    )
    ap.add_argument("--dino-weights", type=Path, help="DINOv2 weights file for --layerscale dino-file")
    ap.add_argument("--dry-run", action="store_true", help="print the TensorRT/TensorRT-LLM plan, build nothing")
    from locllm_export.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MIN_AGREEMENT, PRECISIONS

    every = tuple(dict.fromkeys((*PRECISIONS, *DECODER_PRECISIONS, *VISION_PRECISIONS)))
    prec = ap.add_argument_group(
        "precision",
        f"ONNX graphs: {', '.join(PRECISIONS)} (default fp32; reduced ones are parity-gated against the fp32 engine); "
        f"TensorRT: decoder {', '.join(DECODER_PRECISIONS)}, vision {', '.join(VISION_PRECISIONS)} "
        f"(default {d.precision}/{d.vision_precision}). A value applies to the targets that have it.",
    )
    prec.add_argument("--precision", choices=every, help="the decoder's (TensorRT) or both graphs' (ONNX)")
    prec.add_argument("--vision-precision", choices=every, help="the vision tower (TensorRT: LayerNorm, softmax fp32)")
    prec.add_argument("--decoder-precision", choices=PRECISIONS, help="the ONNX decoder graphs (over --precision)")
    prec.add_argument(
        "--min-agreement",
        type=float,
        default=DEFAULT_MIN_AGREEMENT,
        help="reduced ONNX precision: the least fraction of calibration answers equal to fp32's",
    )
    prec.add_argument("--force", action="store_true", help="keep a reduced-precision engine below --min-agreement")
    prec.add_argument(
        "--calibration-images",
        type=int,
        default=DEFAULT_CALIBRATION_IMAGES,
        help="rendered SynthPose scenes of the parity gate",
    )
    gpu = ap.add_argument_group("tensorrt / trtllm targets")
    gpu.add_argument(
        "--max-batch-size", type=int, default=d.max_batch_size, help="keypoint requests in flight in TensorRT-LLM"
    )
    gpu.add_argument(
        "--vision-batch", type=_vision_batch, default=d.vision_batch, help="ViT optimization profile MIN,OPT,MAX crops"
    )
    gpu.add_argument("--tokens-per-block", type=int, default=d.tokens_per_block, help="paged KV block size")
    gpu.add_argument("--max-description-tokens", type=int, default=d.max_description_tokens)
    gpu.add_argument("--workspace-gib", type=float, default=d.workspace_gib)
    gpu.add_argument("--calib-dataset", default=d.calib_dataset, help="fp8 calibration dataset (TensorRT-LLM)")
    gpu.add_argument("--calib-size", type=int, default=d.calib_size)
    ap.add_argument("--triton-repository", type=Path, help="triton target: the model repository to write")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; available: {', '.join(TARGETS)}")
    nvidia = [t for t in targets if t in ("tensorrt", "trtllm")]
    if nvidia and set(nvidia) != {"tensorrt", "trtllm"}:
        ap.error("the tensorrt backend needs both targets: pass --targets tensorrt,trtllm (with onnx if not built yet)")
    if args.dry_run and not nvidia:
        ap.error("--dry-run prints the TensorRT/TensorRT-LLM plan: add --targets tensorrt,trtllm")
    if targets == ["triton"]:  # reads the manifest only: no exporter (torch) import
        if any((args.precision, args.vision_precision, args.decoder_precision)):
            ap.error("precision flags apply to the onnx, tensorrt and trtllm targets, not to triton alone")
        return _write_triton(args)
    onnx_precision, trt_precision = _split_precisions(ap, args, "onnx" in targets, bool(nvidia))

    if nvidia:
        from locllm_export.tensorrt_plan import BuildOptions, PlanError

        opts = BuildOptions(
            **trt_precision,
            max_batch_size=args.max_batch_size,
            vision_batch=args.vision_batch,
            tokens_per_block=args.tokens_per_block,
            max_description_tokens=args.max_description_tokens,
            workspace_gib=args.workspace_gib,
            calib_dataset=args.calib_dataset,
            calib_size=args.calib_size,
        )
        try:
            opts.validate()
        except PlanError as e:
            ap.error(str(e))
        if args.dry_run:
            return _dry_run(args, targets, opts)

    from locllm_export.build import ExportVerificationError, build_onnx_engine
    from locllm_sdk.errors import LocLLMError

    if nvidia:
        # a public LocLLM dir is converted once, for every target (the ONNX build would do it alone)
        from locllm_training.official import convert_official, is_official_checkpoint

        if is_official_checkpoint(args.checkpoint):
            import tempfile

            tmp = tempfile.TemporaryDirectory(prefix="locllm-converted-")
            convert_official(
                args.checkpoint,
                Path(tmp.name) / "checkpoint",
                layerscale=args.layerscale,
                dino_weights=args.dino_weights,
            )
            args.checkpoint = Path(tmp.name) / "checkpoint"
    if "onnx" in targets:
        try:
            report = build_onnx_engine(
                args.checkpoint,
                args.output,
                overwrite=args.overwrite,
                layerscale=args.layerscale,
                dino_weights=args.dino_weights,
                precision=onnx_precision,
            )
        except (ExportVerificationError, LocLLMError, FileExistsError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(report.summary())
    if nvidia:
        from locllm_export.tensorrt_build import GpuBuildUnavailable, build_tensorrt_targets
        from locllm_sdk.errors import EngineError

        try:
            result = build_tensorrt_targets(args.output, args.checkpoint, opts)
        except (GpuBuildUnavailable, EngineError, ExportVerificationError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"tensorrt/trtllm written to {args.output / 'tensorrt'} on {result['build_machine']['gpu_name']}")
        print(f"  vision min per-token cosine vs vision.onnx: {result['parity']['vision_min_token_cosine']:.6f}")
        print(
            f"  decoder precision {opts.precision}: run benchmarks/parity.py --checkpoint "
            f"{args.checkpoint} --engine {args.output} for its parity report"
        )
    return _write_triton(args) if "triton" in targets else 0


def _write_triton(args) -> int:
    """The Triton model repository of the engine at --output (its manifest's TensorRT build)."""
    from locllm_export.triton import write_repository
    from locllm_sdk.errors import EngineError
    from locllm_sdk.manifest import read_manifest

    out = args.triton_repository or args.output.with_name(args.output.name + "-triton")
    try:
        write_repository(args.output, read_manifest(args.output), out, overwrite=args.overwrite)
    except (EngineError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"triton model repository written to {out} (ensemble 'locllm')")
    return 0


def _split_precisions(ap: argparse.ArgumentParser, args, onnx: bool, nvidia: bool):
    """(PrecisionOptions for the ONNX graphs, BuildOptions precision fields for TensorRT): each
    precision flag goes to the target family whose precisions include its value."""
    from locllm_export.quantize import PRECISIONS, PrecisionOptions
    from locllm_export.tensorrt_plan import DECODER_PRECISIONS, VISION_PRECISIONS

    flags = {"--precision": args.precision, "--vision-precision": args.vision_precision}
    flags["--decoder-precision"] = args.decoder_precision
    for flag, value in flags.items():
        trt_set = VISION_PRECISIONS if flag == "--vision-precision" else DECODER_PRECISIONS
        if value is not None and not ((onnx and value in PRECISIONS) or (nvidia and value in trt_set)):
            where = "the ONNX graphs" if value in PRECISIONS else "TensorRT"
            ap.error(f"{flag} {value} is a precision of {where}, which --targets does not build")

    def onnx_value(*values: str | None) -> str:
        return next((v for v in values if v in PRECISIONS), "fp32")

    onnx_precision = PrecisionOptions(
        vision=onnx_value(args.vision_precision, args.precision),
        decoder=onnx_value(args.decoder_precision, args.precision),
        min_agreement=args.min_agreement,
        force=args.force,
        calibration_images=args.calibration_images,
    )
    trt = {}
    if args.precision in DECODER_PRECISIONS:
        trt["precision"] = args.precision
    if args.vision_precision in VISION_PRECISIONS:
        trt["vision_precision"] = args.vision_precision
    return onnx_precision, trt


def _dry_run(args, targets: list[str], opts) -> int:
    """Print the plan from the checkpoint's facts (pure: no torch, no TensorRT, no GPU)."""
    from locllm_export.tensorrt_plan import ModelFacts, PlanError, format_plan, make_plan
    from locllm_sdk.errors import EngineError
    from locllm_sdk.manifest import read_manifest

    existing = None
    if "onnx" not in targets:
        try:
            existing = read_manifest(args.output)
        except EngineError as e:
            print(f"error: {e} (add onnx to --targets to build it first)", file=sys.stderr)
            return 1
    try:
        facts = (
            ModelFacts.from_manifest(args.output, existing)
            if existing is not None
            else ModelFacts.from_checkpoint(args.checkpoint)
        )
        plan = make_plan(facts, opts, work_dir="<tmp>", engine_dir=str(args.output))
    except (PlanError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if existing is not None:
        note = f"reuse the existing ONNX engine at {args.output} (not rebuilt)"
    else:
        note = (
            f"would run build_onnx_engine({str(args.checkpoint)!r}, {str(args.output)!r}) first (skipped in a dry run)"
        )
    print(format_plan(plan, note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
