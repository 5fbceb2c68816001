"""Reduced-precision engines: ONNX Runtime dynamic int8 quantization of a verified fp32
engine's graphs, parity-gated on a calibration set before the engine may exist.

The weights of MatMul/Gemm nodes become int8 (per output channel where ONNX Runtime supports
it); activations are quantized on the fly (DynamicQuantizeLinear + MatMulInteger). Only
MatMuls with a constant weight are quantized (``MatMulConstBOnly``), so the attention products
over the KV cache and the cache itself stay fp32.

The gate runs the fp32 and the reduced engine through the SDK's own pipeline
(``pipeline.locate_in_image``, constrained decoding) on rendered SynthPose scenes and compares
the answer texts; below ``min_agreement`` the build is refused unless forced.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from locllm_sdk.errors import ArgumentError, EngineError
from locllm_sdk.manifest import EngineManifest, Precision, files_section

PRECISIONS = ("fp32", "int8")
# graphs of each part of the model, as the ONNX build names them
PART_GRAPHS = {"vision": ("vision.onnx",), "decoder": ("decoder.onnx", "decoder_shared.onnx")}
# The bar of the project's target for the demo model (>= 99% of answers identical to fp32).
# Measured on the demo model (3 calibration scenes, 7 people x 19 keypoints): dynamic int8 of
# both parts 45/133 identical, of the decoder alone 49/133, so the default refuses them there.
DEFAULT_MIN_AGREEMENT = 0.99
CALIBRATION_SEED = 400  # the renderer's test split with a seed no benchmark or calibration uses
EXTRA_KEYPOINTS = ("neck", "pelvis")  # with COCO-17: the 19 keypoints the demo answers

Quantizer = Callable[[Path, Path], None]


def quantize_graph_int8(src: Path, dst: Path) -> None:
    """``src`` -> ``dst`` with int8 MatMul/Gemm weights (ONNX Runtime's dynamic quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src,
        dst,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )


QUANTIZERS: dict[str, Quantizer] = {"int8": quantize_graph_int8}


@dataclass(frozen=True)
class PrecisionOptions:
    """Reduced precision of the vision and decoder graphs (``quantize.PRECISIONS``), applied
    after the fp32 engine is verified and gated on the calibration answers' agreement."""

    vision: str = "fp32"
    decoder: str = "fp32"
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    force: bool = False
    calibration_images: int = 20

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
    calibration_images: int = 20,
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
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    try:
        for name in manifest.files:
            dst = out_dir / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if name in reduced:
                quantizers[reduced[name]](fp32_dir / name, dst)
            else:
                shutil.copyfile(fp32_dir / name, dst)
        precision = Precision(vision=vision, decoder=decoder, lora=manifest.precision.lora)
        manifest.replace(precision=precision, files=files_section(out_dir)).write(out_dir)
        agreement = answer_agreement(fp32_dir, out_dir, calibration_scenes(calibration_images))
        label = f"{vision} vision / {decoder} decoder"
        if agreement.fraction < min_agreement and not force:
            raise EngineError(
                f"{label}: {agreement.identical}/{agreement.answers} calibration answers "
                f"({agreement.fraction:.1%}) equal the fp32 engine's, below the required {min_agreement:.1%}; "
                "no engine written (pass --force to keep it anyway, or --min-agreement to lower the bar)"
            )
        gate = {
            "reduced-precision answer agreement": agreement.fraction,
            "reduced-precision identical answers": float(agreement.identical),
            "reduced-precision calibration answers": float(agreement.answers),
            "reduced-precision calibration images": float(agreement.images),
            "reduced-precision min agreement": float(min_agreement),
            "reduced-precision forced": float(force and agreement.fraction < min_agreement),
        }
        manifest.replace(
            precision=precision, files=files_section(out_dir), verification={**manifest.verification, **gate}
        ).write(out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return agreement
