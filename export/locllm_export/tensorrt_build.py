"""Build the NVIDIA targets of an engine directory: TensorRT vision plan + TensorRT-LLM decoder.

Runs on the GPU machine that will serve the engine (plans are specific to the GPU model and
the TensorRT / TensorRT-LLM versions, which the manifest records). tensorrt and tensorrt_llm
are imported inside the functions that need them; the plan itself (what is built, with which
settings) comes from tensorrt_plan.py and is what ``--dry-run`` prints.

API facts used (checked against the TensorRT 10 Python API docs and TensorRT-LLM sources):
  TensorRT: Builder.create_network(flags), OnnxParser(network, logger).parse_from_file,
    create_builder_config, set_memory_pool_limit(MemoryPoolType.WORKSPACE, n),
    create_optimization_profile + set_shape(name, min, opt, max) + add_optimization_profile,
    set_flag(BuilderFlag.FP16 / BF16 / OBEY_PRECISION_CONSTRAINTS), layer.precision and
    layer.set_output_type, create_timing_cache(bytes) / set_timing_cache(cache, False) /
    get_timing_cache().serialize(), build_serialized_network(network, config).
    TensorRT >= 11 has no FP16/BF16 builder flags: networks are created STRONGLY_TYPED and the
    precisions come from the ONNX graph (export_typed_vision_onnx).
  TensorRT-LLM 1.2: LLaMAForCausalLM.from_hugging_face(dir, dtype, ...).save_checkpoint(dir,
    save_config=True); LLaMAForCausalLM.quantize(hf_dir, ckpt_dir, dtype=..., quant_config=...,
    calib_dataset=..., calib_batches=...) for FP8; the ``trtllm-build`` CLI.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from locllm_sdk.backends import gpu_logic
from locllm_sdk.errors import EngineError
from locllm_sdk.manifest import TENSORRT, EngineManifest, files_section

from .build import ExportVerificationError
from .onnx_graphs import OPSET, export_vision_module
from .tensorrt_plan import (
    TRT_DIR,
    TRTLLM_TIMING_CACHE,
    VISION_COSINE_MIN,
    VISION_TIMING_CACHE,
    BuildOptions,
    ModelFacts,
    TensorRTPlan,
    VisionPlan,
    make_plan,
    tensorrt_entry,
)

TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


class GpuBuildUnavailable(RuntimeError):
    """TensorRT / TensorRT-LLM / a CUDA GPU is missing on this machine."""


# --------------------------------------------------------------------------------------
# Build machine


def probe_build_machine(device: int = 0) -> dict:
    try:
        import tensorrt as trt
        import tensorrt_llm
    except ImportError as e:
        raise GpuBuildUnavailable(
            f"--targets tensorrt,trtllm needs TensorRT and TensorRT-LLM 1.2 installed ({e}); see docs/gpu.md"
        ) from e
    devices = gpu_logic.probe_cuda_devices()
    if device >= len(devices) or not torch.cuda.is_available():
        raise GpuBuildUnavailable("--targets tensorrt,trtllm needs a CUDA GPU; none is visible here")
    d = devices[device]
    return {
        "gpu_name": d.name,
        "compute_capability": d.compute_capability,
        "cuda": torch.version.cuda,
        "tensorrt": trt.__version__,
        "tensorrt_llm": tensorrt_llm.__version__,
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------
# Vision


class _Fp32LayerNorm(torch.nn.Module):
    """LayerNorm computed in fp32 inside a low-precision graph (Cast -> LayerNormalization -> Cast)."""

    def __init__(self, ln: torch.nn.LayerNorm):
        super().__init__()
        self.shape, self.eps = ln.normalized_shape, ln.eps
        self.weight = torch.nn.Parameter(ln.weight.detach().float(), requires_grad=False)
        self.bias = torch.nn.Parameter(ln.bias.detach().float(), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.layer_norm(x.float(), self.shape, self.weight, self.bias, self.eps).to(x.dtype)


class _TypedVision(torch.nn.Module):
    """fp32 pixels in, fp32 image tokens out; everything between in ``dtype``."""

    def __init__(self, tower: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.tower, self.dtype = tower, dtype

    def forward(self, pixel_values):
        return self.tower(pixel_values.to(self.dtype)).float()


_FP32_SOFTMAX_ATTENTION = "locllm_fp32_softmax"


def _fp32_softmax_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Dinov2's eager attention with the softmax computed in fp32. (The eager version's
    ``softmax(x, dtype=float32)`` exports as a low-precision Softmax followed by a Cast.)"""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    weights = torch.softmax(weights.float(), dim=-1).to(query.dtype)
    if attention_mask is not None:
        weights = weights * attention_mask
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def export_typed_vision_onnx(merged, path: Path, precision: str, opset: int = OPSET) -> None:
    """The vision tower as an ONNX graph that carries its own precisions (for TensorRT >= 11's
    strongly typed networks): weights and activations fp16/bf16, every LayerNorm and the
    attention softmax in fp32 (explicit casts around them in the graph), I/O fp32."""
    from locllm_training.graphs import VisionTower

    dtype = TORCH_DTYPE[precision]
    # Copy only the vision side (not the LLM); VisionTower binds its position-embedding hook
    # to the copy.
    parts = SimpleNamespace(
        vision=copy.deepcopy(merged.vision), projector=copy.deepcopy(merged.projector), config=merged.config
    )
    tower = VisionTower(parts).eval()
    from transformers import AttentionInterface

    AttentionInterface.register(_FP32_SOFTMAX_ATTENTION, _fp32_softmax_attention)
    tower.vision.config._attn_implementation = _FP32_SOFTMAX_ATTENTION
    tower = tower.to(dtype)
    for _, module in list(tower.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                setattr(module, child_name, _Fp32LayerNorm(child))
    export_vision_module(_TypedVision(tower, dtype).eval(), merged.config.image_size, path, opset)


def onnx_precision_report(path: Path) -> dict:
    """Element types at the inputs of LayerNormalization / Softmax / MatMul nodes (checks a
    typed graph: norms and softmax must be fp32, matmuls low precision)."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(path)))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input})
    types.update({t.name: t.data_type for t in model.graph.initializer})
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    report: dict[str, set] = {}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "MatMul", "Gemm", "Conv"):
            t = types.get(node.input[0])
            report.setdefault(node.op_type, set()).add(names.get(t, str(t)))
    return {k: sorted(v) for k, v in report.items()}


def build_vision_engine(engine_dir: Path, vplan: VisionPlan) -> dict:
    """Build the TensorRT plan of the vision tower; returns the settings actually used."""
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    strongly_typed = major >= 11
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    source = engine_dir / (vplan.typed_onnx if strongly_typed else vplan.onnx)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportVerificationError(f"TensorRT could not parse {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, vplan.workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, shapes in vplan.profile.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    pinned = []
    if not strongly_typed:
        for flag in vplan.tensorrt10["builder_flags"]:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        keep = {getattr(trt.LayerType, t) for t in vplan.tensorrt10["fp32_layer_types"]}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned.append(layer.name)
        if not pinned:
            raise ExportVerificationError(
                f"{source}: no LayerNorm/softmax layers found to keep in fp32 (graph exported differently?)"
            )
    cache_path = engine_dir / vplan.timing_cache
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportVerificationError("TensorRT failed to build the vision engine (see the TensorRT log above)")
    plan_path = engine_dir / vplan.plan
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt_major": major,
        "strongly_typed": strongly_typed,
        "source_onnx": str(source.relative_to(engine_dir)),
        "fp32_layers_pinned": len(pinned),
    }


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of every image token ([N,P,H] vs [N,P,H]) -> [N,P]."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return num / np.maximum(den, 1e-30)


def check_vision_parity(engine_dir: Path, vplan: VisionPlan, seed: int = 0) -> dict:
    """The TensorRT plan against the verified ONNX graph (ONNX Runtime fp32) on the build
    machine: per-token cosine >= VISION_COSINE_MIN at the profile's min, opt and max batch."""
    import onnxruntime as ort
    from locllm_sdk.backends.tensorrt import TrtVisionRunner

    runner = TrtVisionRunner(engine_dir / vplan.plan, vplan.input_name, vplan.output_name)
    session = ort.InferenceSession(str(engine_dir / vplan.onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    shapes = vplan.profile[vplan.input_name]
    worst = 1.0
    for batch in sorted({shapes["min"][0], shapes["opt"][0], shapes["max"][0]}):
        pixels = rng.standard_normal((batch, *shapes["opt"][1:])).astype(np.float32)
        ref = session.run([vplan.output_name], {vplan.input_name: pixels})[0]
        got = runner(pixels)
        worst = min(worst, float(token_cosines(got, ref).min()))
    result = {"vision_min_token_cosine": worst, "threshold": VISION_COSINE_MIN}
    if not worst >= VISION_COSINE_MIN:
        raise ExportVerificationError(
            f"TensorRT vision engine disagrees with vision.onnx: min per-token cosine {worst:.6f} < {VISION_COSINE_MIN}"
        )
    return result


# --------------------------------------------------------------------------------------
# Decoder


def export_hf_llama(merged, hf_dir: Path, tokenizer_dir: Path) -> None:
    """The merged LLM as a plain Hugging Face LlamaForCausalLM (its vocabulary has no
    <im_patch> row: image tokens reach TensorRT-LLM as a prompt table), with the checkpoint's
    tokenizer files beside it: TensorRT-LLM's ModelOpt quantization (fp8) loads a tokenizer
    from this directory (``AutoTokenizer.from_pretrained``) for its calibration text."""
    from locllm_training.model import TOKENIZER_FILES

    hf_dir.mkdir(parents=True, exist_ok=True)
    merged.llm.save_pretrained(str(hf_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, hf_dir / name)


def convert_checkpoint(plan: TensorRTPlan) -> None:
    """HF Llama -> TensorRT-LLM checkpoint (``plan.decoder.convert``)."""
    from tensorrt_llm.models import LLaMAForCausalLM

    d, opts = plan.decoder, plan.options
    if d.precision == "fp8":
        from tensorrt_llm.models.modeling_utils import QuantConfig
        from tensorrt_llm.quantization.mode import QuantAlgo

        LLaMAForCausalLM.quantize(
            d.hf_dir,
            d.checkpoint_dir,
            dtype=d.dtype,
            quant_config=QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8),
            calib_dataset=opts.calib_dataset,
            calib_batches=opts.calib_size,
        )
    else:
        model = LLaMAForCausalLM.from_hugging_face(d.hf_dir, dtype=d.dtype)
        model.save_checkpoint(d.checkpoint_dir, save_config=True)
        del model


def run_trtllm_build(argv: list[str]) -> None:
    exe = shutil.which(argv[0])
    if exe is None:
        raise GpuBuildUnavailable(f"{argv[0]} is not on PATH (it comes with tensorrt_llm)")
    subprocess.run([exe, *argv[1:]], check=True)


# --------------------------------------------------------------------------------------
# Orchestration


def build_tensorrt_targets(engine_dir: str | Path, checkpoint: str | Path, opts: BuildOptions) -> dict:
    """Add ``backends.tensorrt`` to an existing (ONNX-built, verified) engine directory.

    Everything is written under ENGINE/tensorrt/; the manifest is rewritten only once the
    vision plan passed its parity gate and trtllm-build succeeded (on failure tensorrt/ is
    removed and the engine keeps its ONNX backend).
    """
    from locllm_training.model import load_checkpoint

    engine_dir, checkpoint = Path(engine_dir), Path(checkpoint)
    manifest = EngineManifest.read(engine_dir)
    if manifest.model.llm_adapter != "lora":
        raise EngineError(
            f"{engine_dir}: its LM has {manifest.model.llm_adapter} adapters, which the TensorRT-LLM build cannot "
            "hold (it merges LoRA into the weights); serve it with the ONNX backends (docs/gpu.md: "
            "'TensorRT-LLM plan for MoE LoRA')"
        )
    machine = probe_build_machine()
    facts = ModelFacts.from_manifest(engine_dir, manifest)
    out_dir = engine_dir / TRT_DIR
    # Timing caches persist across rebuilds on this machine (TensorRT and trtllm-build load them).
    caches = {}
    for name in (VISION_TIMING_CACHE, TRTLLM_TIMING_CACHE):
        if (engine_dir / name).is_file():
            caches[name] = (engine_dir / name).read_bytes()
    if TENSORRT in manifest.backends or out_dir.exists():
        # A rebuild: first make the directory a consistent ONNX-only engine again, so a failed
        # build never leaves a manifest naming TensorRT files that are gone.
        manifest = manifest.replace(
            backends={n: e for n, e in manifest.backends.items() if n != TENSORRT},
            build_machine=None,
            files={n: m for n, m in manifest.files.items() if not n.startswith(TRT_DIR + "/")},
        )
        manifest.write(engine_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    for name, data in caches.items():
        (engine_dir / name).write_bytes(data)
    try:
        with tempfile.TemporaryDirectory(prefix="locllm-trtllm-") as work:
            plan = make_plan(facts, opts, work_dir=work, engine_dir=str(engine_dir))
            merged = load_checkpoint(checkpoint, with_lora=False)
            if int(machine["tensorrt"].split(".")[0]) >= 11:  # strongly typed: precisions from the graph
                export_typed_vision_onnx(merged, engine_dir / plan.vision.typed_onnx, plan.vision.precision)
            vision_used = build_vision_engine(engine_dir, plan.vision)
            parity = check_vision_parity(engine_dir, plan.vision)
            export_hf_llama(merged, Path(plan.decoder.hf_dir), checkpoint)
            del merged
            convert_checkpoint(plan)
            run_trtllm_build(plan.decoder.trtllm_build)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    entry = tensorrt_entry(plan, {**parity, "decoder": "run benchmarks/parity.py on this machine"}, vision_used)
    files = dict(manifest.files)
    files.update({f"{TRT_DIR}/{n}": e for n, e in files_section(out_dir).items()})
    for name in entry.files():
        if name not in files:
            raise ExportVerificationError(f"the build did not produce {name}")
    manifest = manifest.replace(backends={**manifest.backends, TENSORRT: entry}, build_machine=machine, files=files)
    manifest.write(engine_dir)
    return {"build_machine": machine, "vision": vision_used, "parity": parity, "plan": plan}
