"""Reduced-precision engines: int8 graphs from ONNX Runtime's quantization and float16-stored
weights, parity-gated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from locllm_export.quantize import (
    FP16_MIN_ELEMENTS,
    METHODS,
    answer_agreement,
    calibration_scenes,
    quantize_graph_int8,
    reduce_engine,
    store_weights_fp16,
)
from locllm_sdk import Pose
from locllm_sdk.errors import ArgumentError, EngineError
from locllm_sdk.manifest import EngineManifest
from onnx import helper, numpy_helper


def _op_count(path, op: str) -> int:
    return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)


def _corrupt_first_weight_scale(src, dst) -> None:
    """Quantize, then scale one quantized MatMul's weight scale by -30 (a broken quantization)."""
    quantize_graph_int8(src, dst)
    model = onnx.load(str(dst))
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
    scale = inits[node.input[1].removesuffix("_quantized") + "_scale"]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * -30.0, scale.name))
    onnx.save(model, str(dst))


def test_int8_engine_of_tiny_loads_answers_and_records_its_agreement(trained, tmp_path):
    _, fp32 = trained[2]
    out = tmp_path / "int8"
    agreement = reduce_engine(fp32, out, vision="int8", decoder="int8", min_agreement=0.0, calibration_images=2)
    for graph in ("vision.onnx", "decoder.onnx", "decoder_shared.onnx"):
        assert _op_count(fp32 / graph, "MatMulInteger") == 0
        assert _op_count(out / graph, "MatMulInteger") > 0, graph
    manifest = EngineManifest.read(out)
    assert (manifest.precision.vision, manifest.precision.decoder) == ("int8", "int8")
    assert manifest.precision.vision_method == manifest.precision.decoder_method == METHODS["int8"]
    # an fp32 engine's precision section has no method fields (written as before they existed)
    assert set(json.loads((fp32 / "manifest.json").read_text())["precision"]) == {"vision", "decoder", "lora"}
    v = manifest.verification
    assert v["reduced-precision identical answers"] == agreement.identical
    assert v["reduced-precision calibration answers"] == agreement.answers == agreement.persons * agreement.keypoints
    assert v["reduced-precision answer agreement"] == pytest.approx(agreement.identical / agreement.answers)
    # the record is what the two engines answer, recounted independently
    assert answer_agreement(fp32, out, calibration_scenes(2)) == agreement
    manifest.verify_files(out)  # checksums of the quantized graphs

    image, boxes = calibration_scenes(1, seed=9)[0]
    res = Pose(out).locate(image, ["neck", "pelvis"], boxes=boxes)
    assert len(res) == len(boxes)
    xy = res.numpy()
    assert xy.shape == (len(boxes), 2, 3) and np.isfinite(xy).all()


@pytest.mark.slow  # three quantized engines, each gated on a calibration scene
def test_gate_refuses_a_broken_quantization_and_leaves_no_engine(trained, tmp_path):
    _, fp32 = trained[2]
    intact = reduce_engine(fp32, tmp_path / "intact", decoder="int8", min_agreement=0.0, calibration_images=1)
    assert intact.fraction > 0
    broken = tmp_path / "broken"
    with pytest.raises(EngineError, match="below the required"):
        reduce_engine(
            fp32,
            broken,
            decoder="int8",
            min_agreement=intact.fraction,  # the intact quantization passes this bar by definition
            calibration_images=1,
            quantizers={"int8": _corrupt_first_weight_scale},
        )
    assert not broken.exists()
    forced = reduce_engine(
        fp32,
        broken,
        decoder="int8",
        min_agreement=intact.fraction,
        force=True,
        calibration_images=1,
        quantizers={"int8": _corrupt_first_weight_scale},
    )
    assert forced.fraction < intact.fraction
    assert EngineManifest.read(broken).verification["reduced-precision forced"] == 1.0


def test_bad_precision_arguments_are_refused(trained, tmp_path):
    _, fp32 = trained[2]
    with pytest.raises(ArgumentError, match="decoder precision"):
        reduce_engine(fp32, tmp_path / "x", decoder="int3")
    with pytest.raises(ArgumentError, match="min_agreement"):
        reduce_engine(fp32, tmp_path / "x", decoder="int8", min_agreement=1.5)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # two engine builds
def test_build_engines_gates_the_reduced_engine(trained, tmp_path, capsys):
    import runpy

    main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "export" / "build_engines.py"))["main"]
    ckpt, _ = trained[2]
    out = tmp_path / "engine"
    argv = ["--checkpoint", str(ckpt), "--output", str(out), "--decoder-precision", "int8", "--calibration-images", "1"]
    rc = main([*argv, "--min-agreement", "1.0"])
    if rc == 1:  # refused: the message says why and no directory (nor a partial one) is left
        assert "below the required 100.0%" in capsys.readouterr().err
        assert not list(tmp_path.iterdir())
    else:  # every calibration answer was identical
        assert rc == 0 and EngineManifest.read(out).verification["reduced-precision answer agreement"] == 1.0
    assert main([*argv, "--min-agreement", "0.0", "--overwrite"]) == 0
    manifest = EngineManifest.read(out)
    assert (manifest.precision.vision, manifest.precision.decoder) == ("fp32", "int8")
    assert manifest.verification["reduced-precision min agreement"] == 0.0


def _large_float_initializers(path) -> dict[str, np.ndarray]:
    return {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(path)).graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and np.prod(t.dims) >= FP16_MIN_ELEMENTS
    }


def test_fp16_weights_engine_stores_rounded_weights_and_keeps_the_answers(trained, tmp_path):
    _, fp32 = trained[2]
    out = tmp_path / "fp16w"
    # weights rounded to float16, computed in fp32, keep nearly every answer. The bar is 0.95, not the
    # default 0.99: the tiny model is trained afresh in each run, and on 76 answers one logit near-tie that
    # flips is 98.7%
    agreement = reduce_engine(
        fp32, out, vision="fp16-weights", decoder="fp16-weights", calibration_images=2, min_agreement=0.95
    )
    assert agreement.fraction >= 0.95
    for graph in ("vision.onnx", "decoder.onnx", "decoder_shared.onnx"):
        before, after = _large_float_initializers(fp32 / graph), _large_float_initializers(out / graph)
        assert before and all(a.dtype == np.float16 for a in after.values()), graph
        assert len(after) == len(before) == _op_count(out / graph, "Cast") - _op_count(fp32 / graph, "Cast")
        for name, weights in before.items():  # each weight is its float16 rounding, under a new name
            np.testing.assert_array_equal(after[name + "_fp16"], weights.astype(np.float16))
        saved = (fp32 / graph).stat().st_size - (out / graph).stat().st_size
        assert saved > 0.95 * 2 * sum(w.size for w in before.values())  # 2 of the 4 bytes of each element
    manifest = EngineManifest.read(out)
    assert manifest.precision.vision_method == METHODS["fp16-weights"]
    assert manifest.verification["reduced-precision forced"] == 0.0
    image, boxes = calibration_scenes(1, seed=9)[0]
    a = Pose(fp32).locate(image, ["neck", "pelvis"], boxes=boxes)
    b = Pose(out).locate(image, ["neck", "pelvis"], boxes=boxes)
    assert len(a) == len(b) == len(boxes)
    assert np.abs(a.numpy() - b.numpy()).max() < 0.05 * max(image.shape)


def test_fp16_weights_refuses_a_weight_beyond_float16(tmp_path):
    weights = np.ones((64, 32), np.float32)
    weights[3, 4] = 1e5  # float16 tops out at 65504
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(weights, "w")],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"))
    with pytest.raises(EngineError, match="w reaches 100000, beyond float16"):
        store_weights_fp16(tmp_path / "g.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
