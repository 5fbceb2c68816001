"""Reduced-precision engines: post-processing of a verified fp32 engine's graphs, parity-gated on
a calibration set before the engine may exist.

``int8``: ONNX Runtime's dynamic quantization. The weights of MatMul nodes become int8 per
output channel; activations are quantized on the fly (DynamicQuantizeLinear + MatMulInteger,
VNNI kernels where the CPU has them). Only MatMuls with a constant weight are quantized
(``MatMulConstBOnly``), so the attention products over the KV cache and the cache itself stay
fp32. Of the ONNX Runtime quantizations measured on the demo model (benchmarks/README.md,
"Reduced precision"), the fastest for both parts.

``fp16-weights``: the weights are stored as float16 and cast back to float32 when ONNX Runtime
loads the graph (its constant folding removes the casts), so the computation is fp32 on weights
rounded to float16: half the file size, the fp32 speed.

The gate runs the fp32 and the reduced engine through the SDK's own pipeline
(``pipeline.locate_in_image``, constrained decoding) on rendered SynthPose scenes and compares
the answer texts; below ``min_agreement`` the build is refused unless forced.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from locllm_sdk.errors import ArgumentError, EngineError
from locllm_sdk.manifest import ORT_CPU, EngineManifest, Precision, files_section

from .onnx_files import external_data_files, graph_target, graphs_external_data, save_graph, share_external_data

PRECISIONS = ("fp32", "fp16-weights", "int8")
# graphs of each part of the model, as the ONNX build names them
PART_GRAPHS = {"vision": ("vision.onnx",), "decoder": ("decoder.onnx", "decoder_shared.onnx")}
# The project's bar (>= 99% of answers identical to fp32). On the demo model it separates what
# keeps the answers from what changes them (benchmarks/README.md, "Reduced precision"):
# fp16-weights keeps >= 99% of them, every int8 variant measured keeps <= 97% (weight-only int8
# of the vision tower, fp32 compute, no faster) and dynamic int8 of both parts about 35%,
# because a tenth of the demo's answer digits are decided by logit margins under 0.01.
DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_CALIBRATION_IMAGES = 20  # rendered scenes of the gate (1-3 people each, 19 keypoints)
CALIBRATION_SEED = 400  # the renderer's test split with a seed no benchmark or calibration uses
EXTRA_KEYPOINTS = ("neck", "pelvis")  # with COCO-17: the 19 keypoints the demo answers

Quantizer = Callable[[Path, Path], None]


def quantize_graph_int8(src: Path, dst: Path) -> None:
    """``src`` -> ``dst`` with int8 MatMul/Gemm weights (ONNX Runtime's dynamic quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with graph_target(dst) as target:
        quantize_dynamic(
            src,
            target,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=bool(external_data_files(src)),
            extra_options={"MatMulConstBOnly": True},
        )


# below this many elements an initializer (a norm's eps, a shape) is not worth converting
FP16_MIN_ELEMENTS = 1024
FP16_MAX = 65504.0


def store_weights_fp16(src: Path, dst: Path) -> None:
    """``src`` -> ``dst`` with every float32 initializer of at least ``FP16_MIN_ELEMENTS``
    elements stored as float16 and a Cast back to float32 in front of its users. A weight
    beyond float16's range is an EngineError (it would become inf)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or np.prod(tensor.dims) < FP16_MIN_ELEMENTS:
            continue
        weights = numpy_helper.to_array(tensor)
        peak = float(np.abs(weights).max())
        if not peak <= FP16_MAX:
            raise EngineError(f"{src}: initializer {tensor.name} reaches {peak:g}, beyond float16's range")
        name, stored = tensor.name, tensor.name + "_fp16"
        while stored in taken:
            stored += "_"
        taken.add(stored)
        tensor.CopyFrom(numpy_helper.from_array(weights.astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [name], to=onnx.TensorProto.FLOAT, name=stored + "_to_fp32"))
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    save_graph(model, dst)


QUANTIZERS: dict[str, Quantizer] = {"int8": quantize_graph_int8, "fp16-weights": store_weights_fp16}
# what the manifest's precision section records for each reduced part
METHODS = {
    "int8": (
        "onnxruntime quantize_dynamic: int8 symmetric per-output-channel weights of the MatMuls with a "
        "constant weight, uint8 activations quantized per pass (DynamicQuantizeLinear + MatMulInteger); "
        "attention and KV cache fp32"
    ),
    "fp16-weights": "float16-stored weights cast to float32 at load; computed in fp32",
}


@dataclass(frozen=True)
class PrecisionOptions:
    """Reduced precision of the vision and decoder graphs (``quantize.PRECISIONS``), applied
    after the fp32 engine is verified and gated on the calibration answers' agreement."""

    vision: str = "fp32"
    decoder: str = "fp32"
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    force: bool = False
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES

    @property
    def reduced(self) -> bool:
        return (self.vision, self.decoder) != ("fp32", "fp32")


@dataclass(frozen=True)
class Agreement:
    identical: int
    answers: int
    images: int
    persons: int
    keypoints: int

    @property
    def fraction(self) -> float:
        return self.identical / self.answers if self.answers else 0.0


# the gate's figures in a manifest's verification section are named GATE_PREFIX + figure
GATE_PREFIX = "reduced-precision "


def recorded_gate(verification: dict[str, float]) -> dict[str, float]:
    """The parity gate's figures as ``reduce_engine`` recorded them in a manifest's verification
    ("answer agreement", "identical answers", "calibration answers", "calibration images", "min
    agreement", "forced"); empty for an engine that was not reduced."""
    return {k[len(GATE_PREFIX) :]: v for k, v in verification.items() if k.startswith(GATE_PREFIX)}


def check_precision(name: str, value: str) -> str:
    if value not in PRECISIONS:
        raise ArgumentError(f"{name} must be one of {PRECISIONS}, got {value!r}")
    return value


def calibration_scenes(images: int, seed: int = CALIBRATION_SEED, size: int = 256):
    """``images`` rendered SynthPose scenes as (RGB image, people's [x, y, w, h] boxes)."""
    from locllm_training.synthpose.scene import generate_sample

    scenes = []
    for i in range(images):
        sample = generate_sample(seed, i, size, (1, 3), "test")
        scenes.append((np.ascontiguousarray(sample.image[:, :, ::-1]), [p.bbox for p in sample.persons]))
    return scenes


def answer_agreement(
    reference_dir: Path, candidate_dir: Path, scenes: Sequence, keypoints: Sequence[str] | None = None
) -> Agreement:
    """How many (person, keypoint) answer texts of ``candidate_dir`` equal ``reference_dir``'s
    (``keypoints``: default COCO-17 + ``EXTRA_KEYPOINTS``)."""
    from locllm_sdk import loader
    from locllm_sdk.descriptions import coco17
    from locllm_sdk.pipeline import locate_in_image

    ref = loader.load(reference_dir, backend="onnxruntime")
    cand = loader.load(candidate_dir, backend="onnxruntime")
    requests = ref.library.resolve(list(keypoints or (*coco17().keypoints, *EXTRA_KEYPOINTS)))
    same = total = persons = 0
    for image, boxes in scenes:
        a = locate_in_image(ref.backend, ref.spec, image, boxes, requests)
        b = locate_in_image(cand.backend, cand.spec, image, boxes, requests)
        for ta, tb in zip(a.texts, b.texts):
            same += sum(x == y for x, y in zip(ta, tb))
            total += len(ta)
        persons += len(boxes)
    return Agreement(same, total, len(scenes), persons, len(requests))


def reduce_engine(
    fp32_dir: Path,
    out_dir: Path,
    vision: str = "fp32",
    decoder: str = "fp32",
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    force: bool = False,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    quantizers: dict[str, Quantizer] | None = None,
) -> Agreement:
    """Write ``out_dir``: the fp32 engine at ``fp32_dir`` with its vision and/or decoder graphs
    in reduced precision, its manifest recording the precision and the gate's agreement.
    Below ``min_agreement`` (and not ``force``) it raises EngineError and leaves no ``out_dir``.
    ``quantizers``: precision -> graph rewriter (default ``QUANTIZERS``)."""
    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    parts = {
        "vision": check_precision("vision precision", vision),
        "decoder": check_precision("decoder precision", decoder),
    }
    if not 0.0 <= min_agreement <= 1.0:
        raise ArgumentError(f"min_agreement is a fraction in [0, 1], got {min_agreement!r}")
    if calibration_images < 1:
        raise ArgumentError(f"calibration_images must be >= 1, got {calibration_images!r}")
    quantizers = QUANTIZERS if quantizers is None else quantizers
    manifest = EngineManifest.read(fp32_dir)
    reduced = {g: p for part, p in parts.items() if p != "fp32" for g in PART_GRAPHS[part]}
    # a reduced graph writes its own weights (inline or in its own external-data file)
    replaced = {d for g in reduced if g in manifest.files for d in external_data_files(fp32_dir / g)}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    try:
        for name in manifest.files:
            dst = out_dir / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if name in reduced:
                quantizers[reduced[name]](fp32_dir / name, dst)
            elif name not in replaced:
                shutil.copyfile(fp32_dir / name, dst)
        for part, p in parts.items():
            if p != "fp32":  # the part's later graphs read the weights they share from its first's file
                first, *later = PART_GRAPHS[part]
                for graph in later:
                    share_external_data(out_dir / first, out_dir / graph)
        onnx_entry = manifest.backend(ORT_CPU)
        backends = {
            **manifest.backends,
            ORT_CPU: replace(onnx_entry, external_data=graphs_external_data(out_dir, onnx_entry)),
        }
        precision = Precision(
            vision=vision,
            decoder=decoder,
            lora=manifest.precision.lora,
            vision_method=METHODS.get(vision, ""),
            decoder_method=METHODS.get(decoder, ""),
        )
        manifest.replace(precision=precision, backends=backends, files=files_section(out_dir)).write(out_dir)
        agreement = answer_agreement(fp32_dir, out_dir, calibration_scenes(calibration_images))
        label = f"{vision} vision / {decoder} decoder"
        if agreement.fraction < min_agreement and not force:
            raise EngineError(
                f"{label}: {agreement.identical}/{agreement.answers} calibration answers "
                f"({agreement.fraction:.1%}) equal the fp32 engine's, below the required {min_agreement:.1%}; "
                "no engine written (pass --force to keep it anyway, or --min-agreement to lower the bar)"
            )
        gate = {
            GATE_PREFIX + key: value
            for key, value in {
                "answer agreement": agreement.fraction,
                "identical answers": float(agreement.identical),
                "calibration answers": float(agreement.answers),
                "calibration images": float(agreement.images),
                "min agreement": float(min_agreement),
                "forced": float(force and agreement.fraction < min_agreement),
            }.items()
        }
        manifest.replace(
            precision=precision,
            backends=backends,
            files=files_section(out_dir),
            verification={**manifest.verification, **gate},
        ).write(out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return agreement
