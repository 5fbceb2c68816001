"""Graphs past protobuf's 2 GiB limit (a 1B-class model's decoder): their weights go to one ONNX
external-data file beside the graph, which the manifest lists and checksums like the graphs; the
cascade decoder graph reads the weights it shares with the decoder graph from the decoder's file.
The tiny model is built with the inline limit at 0 bytes so that every graph takes that path."""

from __future__ import annotations

import json

import onnx
import pytest
from locllm_export import onnx_files
from locllm_export.build import build_onnx_engine
from locllm_export.onnx_files import external_data_files
from locllm_export.quantize import answer_agreement, calibration_scenes, reduce_engine
from locllm_sdk import Pose
from locllm_sdk.errors import EngineError
from locllm_sdk.manifest import ORT_CPU, EngineManifest
from onnx import TensorProto, helper

GRAPHS = ("vision.onnx", "decoder.onnx", "decoder_shared.onnx")
KEYPOINTS = ["nose", "left_wrist", "neck"]


@pytest.fixture(scope="module")
def external(trained, tmp_path_factory):
    """The 2D tiny checkpoint's engine with every graph's weights in external data."""
    ckpt, inline = trained[2]
    out = tmp_path_factory.mktemp("external") / "engine"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_files, "MAX_INLINE_BYTES", 0)
        build_onnx_engine(ckpt, out)
    return inline, out


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_each_graph_keeps_its_weights_in_one_listed_data_file(external):
    inline, out = external
    manifest = EngineManifest.read(out)
    entry = manifest.backend(ORT_CPU)
    assert entry.external_data == ("vision.onnx.data", "decoder.onnx.data")
    # the cascade step is the same weights traced again: it reads them from the decoder's file
    assert external_data_files(out / "decoder_shared.onnx") == ("decoder.onnx.data",)
    assert not (out / "decoder_shared.onnx.data").exists()
    for graph in GRAPHS[:2]:
        assert external_data_files(out / graph) == (graph + ".data",)
        assert external_data_files(inline / graph) == ()
        # the weights moved: the graph file is now a fraction of the inline graph
        assert (out / graph).stat().st_size < (inline / graph).stat().st_size / 4
        # readable as the graph is (onnx writes the data file owner-only)
        assert (out / (graph + ".data")).stat().st_mode & 0o777 == (out / graph).stat().st_mode & 0o777
    assert set(entry.external_data) <= set(manifest.files_of_backend(ORT_CPU))
    assert not list(out.glob(".*.writing")), "the exporter's scratch folders are gone"
    manifest.verify_files(out)
    # an inline engine's manifest does not mention external data at all
    assert "external_data" not in json.loads((inline / "manifest.json").read_text())["backends"][ORT_CPU]


def test_external_data_engine_answers_as_the_inline_one(external):
    inline, out = external
    agreement = answer_agreement(inline, out, calibration_scenes(2))
    assert agreement.answers > 0 and agreement.identical == agreement.answers
    image, boxes = calibration_scenes(1, seed=5)[0]
    a = Pose(inline).locate(image, KEYPOINTS, boxes=boxes)
    b = Pose(out).locate(image, KEYPOINTS, boxes=boxes)
    assert [k.answer for p in a.persons for k in p.keypoints] == [k.answer for p in b.persons for k in p.keypoints]


def test_a_corrupt_or_unlisted_data_file_is_refused_by_name(external, tmp_path):
    import shutil

    _, out = external
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    _flip_byte(broken / "decoder.onnx.data", 100)
    with pytest.raises(EngineError, match=r"decoder\.onnx\.data: sha256 differs"):
        Pose(broken)
    # a manifest whose backend names a data file its files section does not list
    unlisted = tmp_path / "unlisted"
    shutil.copytree(out, unlisted)
    doc = json.loads((unlisted / "manifest.json").read_text())
    del doc["files"]["vision.onnx.data"]
    (unlisted / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(EngineError, match=r"vision\.onnx\.data.*does not list"):
        Pose(unlisted)


@pytest.mark.parametrize("precision", ["int8", "fp16-weights"])
def test_reduced_engines_of_an_external_data_engine_write_their_own_data(external, tmp_path, precision):
    _, out = external
    reduced = tmp_path / precision
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_files, "MAX_INLINE_BYTES", 0)
        reduce_engine(out, reduced, vision=precision, decoder=precision, min_agreement=0.0, calibration_images=1)
    manifest = EngineManifest.read(reduced)
    assert manifest.backend(ORT_CPU).external_data == ("vision.onnx.data", "decoder.onnx.data")
    assert external_data_files(reduced / "decoder_shared.onnx") == ("decoder.onnx.data",)
    for graph in GRAPHS[:2]:
        data = graph + ".data"
        # the reduced weights, not the fp32 file copied over: int8 a quarter, float16 half
        assert (reduced / data).stat().st_size < 0.75 * (out / data).stat().st_size, data
        ops = {n.op_type for n in onnx.load(str(reduced / graph)).graph.node}
        assert ("MatMulInteger" if precision == "int8" else "Cast") in ops
    manifest.verify_files(reduced)
    image, boxes = calibration_scenes(1, seed=5)[0]
    assert len(Pose(reduced).locate(image, KEYPOINTS, boxes=boxes)) == len(boxes)


def _matmul_graph(weights: dict, path) -> None:
    """x @ w1 @ w2 ... with each named weight an initializer, saved with external data."""
    import numpy as np
    from onnx import numpy_helper

    names = list(weights)
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", n], [f"h{i + 1}" if i < len(names) - 1 else "y"])
        for i, n in enumerate(names)
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[numpy_helper.from_array(np.asarray(w, np.float32), n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_files, "MAX_INLINE_BYTES", 0)
        onnx_files.save_graph(model, path)


def test_a_graph_reads_the_weights_it_shares_from_the_other_graphs_file(tmp_path):
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    _matmul_graph({"w1": w1, "w2": w2}, tmp_path / "a.onnx")
    # the same bytes under other names (as a second trace names them), and one weight of its own
    _matmul_graph({"traced_1": w1, "own": w3, "traced_2": w2}, tmp_path / "b.onnx")
    before = ort.InferenceSession(str(tmp_path / "b.onnx")).run(None, {"x": x})[0]
    assert onnx_files.share_external_data(tmp_path / "a.onnx", tmp_path / "b.onnx") == w1.nbytes + w2.nbytes
    assert external_data_files(tmp_path / "b.onnx") == ("a.onnx.data", "b.onnx.data")
    # its own file holds only the weight the other graph lacks
    assert (tmp_path / "b.onnx.data").stat().st_size == w3.nbytes
    got = ort.InferenceSession(str(tmp_path / "b.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, before)
    # a graph whose weights are all held elsewhere keeps no data file of its own
    _matmul_graph({"again": w2}, tmp_path / "c.onnx")
    onnx_files.share_external_data(tmp_path / "a.onnx", tmp_path / "c.onnx")
    assert external_data_files(tmp_path / "c.onnx") == ("a.onnx.data",)
    assert not (tmp_path / "c.onnx.data").exists()
    np.testing.assert_allclose(ort.InferenceSession(str(tmp_path / "c.onnx")).run(None, {"x": x})[0], x @ w2, rtol=1e-4)
    # same shape, other bytes: not shared
    _matmul_graph({"other": w2 + 1}, tmp_path / "d.onnx")
    assert onnx_files.share_external_data(tmp_path / "a.onnx", tmp_path / "d.onnx") == 0
    assert external_data_files(tmp_path / "d.onnx") == ("d.onnx.data",)


def test_a_data_location_outside_the_graph_folder_is_refused(tmp_path):
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    for key, value in (("location", "../elsewhere.bin"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[weight],
    )
    path = tmp_path / "graph.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(EngineError, match=r"'\.\./elsewhere\.bin', not a file beside the graph"):
        external_data_files(path)


@pytest.mark.slow
def test_cpp_runtime_answers_from_external_data_and_checks_it(external, tmp_path):
    """The C++ runtime verifies the data files named in the manifest and ONNX Runtime reads them."""
    import shutil
    import subprocess

    import cv2

    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    from cpp_latency import ensure_built

    build = ensure_built()
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, stdout=subprocess.DEVNULL)
    image, boxes = calibration_scenes(1, seed=5)[0]
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    _, out = external

    def cli(engine):
        args = [str(build / "locllm_cpp"), "locate", str(path), "-m", str(engine), "--json"]
        args += [a for n in KEYPOINTS for a in ("-k", n)]
        args += [a for b in boxes for a in ("--box", ",".join(repr(float(v)) for v in b))]
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    run = cli(out)
    assert run.returncode == 0, run.stderr
    got = [k["answer"] for p in json.loads(run.stdout)["persons"] for k in p["keypoints"]]
    want = Pose(out).locate(str(path), KEYPOINTS, boxes=boxes)
    assert got == [k.answer for p in want.persons for k in p.keypoints]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    _flip_byte(broken / "decoder.onnx.data", 100)
    run = cli(broken)
    assert run.returncode != 0
    assert "decoder.onnx.data: sha256 differs" in run.stderr + run.stdout
