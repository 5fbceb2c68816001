"""The NVIDIA path on a real GPU: TensorRT vision plan + TensorRT-LLM decoder built from a
format-trained checkpoint, run through Pose, compared with ONNX Runtime; ONNX Runtime's CUDA
provider. Everything here is skipped (with the reason) on machines without an NVIDIA GPU,
TensorRT 10.x and TensorRT-LLM 1.2.x, or onnxruntime-gpu; this project's CI has none of them.

    pytest -m gpu tests/test_gpu.py
"""

import json
import re
import shutil

import numpy as np
import pytest
from locllm_sdk.backends import gpu_logic

pytestmark = pytest.mark.gpu

KEYPOINTS = ["nose", "left eye", "right shoulder", "left wrist", "right hip", "neck", "pelvis", "left ankle"]
PATTERN = {2: r"\[0\.\d{3},0\.\d{3}\]", 3: r"\[0\.\d{3},0\.\d{3},0\.\d{6}\]"}


def _cuda_or_skip():
    if not gpu_logic.has_cuda_gpu():
        pytest.skip("no CUDA GPU visible to the driver (libcuda probe found none)")


def _tensorrt_or_skip():
    _cuda_or_skip()
    pytest.importorskip("tensorrt", reason="TensorRT 10.x is not installed (pip index https://pypi.nvidia.com)")
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM 1.2.x is not installed (see docs/gpu.md)")


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 255, (int(rng.integers(160, 320)), int(rng.integers(160, 320)), 3)).astype(np.uint8)
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def trt_engines(request, tmp_path_factory):
    """Copies of the ONNX engines of the trained fixture, extended with tensorrt,trtllm (fp16)."""
    _tensorrt_or_skip()  # before the (slow) trained checkpoints are made
    trained = request.getfixturevalue("trained")
    from locllm_export.tensorrt_build import build_tensorrt_targets
    from locllm_export.tensorrt_plan import BuildOptions

    out = {}
    for dims, (ckpt, engine) in trained.items():
        dst = tmp_path_factory.mktemp(f"trt{dims}d") / "engine"
        shutil.copytree(engine, dst)
        build_tensorrt_targets(dst, ckpt, BuildOptions(precision="fp16", max_batch_size=32, vision_batch=(1, 2, 8)))
        out[dims] = (ckpt, dst)
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_manifest_records_the_build(trt_engines, dims):
    _, engine = trt_engines[dims]
    m = json.loads((engine / "manifest.json").read_text())
    trt = m["backends"]["tensorrt"]
    assert set(gpu_logic.BUILD_MACHINE_KEYS) <= set(m["build_machine"])
    assert trt["parity"]["vision_min_token_cosine"] >= 0.999
    for key in ("vision_plan", "trtllm_engine", "trtllm_config"):
        assert trt[key] in m["files"]


@pytest.mark.parametrize("dims", [2, 3])
def test_tensorrt_pose_matches_onnxruntime(trt_engines, request, dims):
    from locllm_sdk import Pose

    trained = request.getfixturevalue("trained")
    _, engine = trt_engines[dims]
    trt_pose = Pose(engine, backend="tensorrt")
    ort_pose = Pose(trained[dims][1], backend="onnxruntime")
    same = total = 0
    max_score = 0.0
    for img in _images(3, seed=dims):
        a = trt_pose.locate(img, KEYPOINTS)
        b = ort_pose.locate(img, KEYPOINTS)
        assert a.info["backend"] == "tensorrt"
        for ka, kb in zip(a[0], b[0]):
            assert re.fullmatch(PATTERN[dims], ka.answer), ka.answer
            assert 0.0 < ka.score <= 1.0
            same += ka.answer == kb.answer
            total += 1
            max_score = max(max_score, abs(ka.score - kb.score))
    # fp16 decoder vs fp32 ONNX: nearly every answer identical, scores close.
    assert same / total >= 0.9, (same, total)
    assert max_score <= 0.05


def test_tensorrt_free_decoding_is_well_formed(trt_engines):
    from locllm_sdk import Pose

    pose = Pose(trt_engines[2][1], backend="tensorrt", decoding="free")
    res = pose.locate(_images(1, seed=7)[0], KEYPOINTS)
    assert len(res[0]) == len(KEYPOINTS)


def test_auto_picks_tensorrt(trt_engines):
    from locllm_sdk import Pose

    assert Pose(trt_engines[2][1]).backend_name == "tensorrt"


def test_engine_from_another_gpu_is_refused(trt_engines, tmp_path):
    from locllm_sdk import Pose

    engine = tmp_path / "moved"
    shutil.copytree(trt_engines[2][1], engine)
    m = json.loads((engine / "manifest.json").read_text())
    m["build_machine"]["gpu_name"] = "Some Other GPU"
    (engine / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(gpu_logic.IncompatibleEngine, match="Some Other GPU"):
        Pose(engine, backend="tensorrt")


def test_onnxruntime_cuda_really_runs_on_cuda(request):
    _cuda_or_skip()
    if not gpu_logic.ort_cuda_provider_listed():
        pytest.skip("onnxruntime-gpu is not installed (onnxruntime lists no CUDAExecutionProvider)")
    from locllm_sdk import Pose

    ckpt, engine = request.getfixturevalue("trained")[2]
    gpu = Pose(engine, backend="onnxruntime-cuda")
    cpu = Pose(engine, backend="onnxruntime")
    assert gpu.backend.providers[0] == "CUDAExecutionProvider"
    img = _images(1, seed=3)[0]
    a, b = gpu.locate(img, KEYPOINTS), cpu.locate(img, KEYPOINTS)
    assert a.info["backend"] == "onnxruntime-cuda"
    matches = [ka.answer == kb.answer for ka, kb in zip(a[0], b[0])]
    assert np.mean(matches) >= 0.9
