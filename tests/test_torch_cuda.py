"""backend="torch-cuda": the SDK's algorithm on PyTorch kernels with one preallocated cascade
buffer per crop and SDPA. On the CPU, in fp32, its answers must equal the torch backend's."""

from __future__ import annotations

import numpy as np
import pytest
from locllm_sdk import BackendUnavailable, Pose
from locllm_sdk.backends.torch_cuda import TorchCudaBackend
from locllm_sdk.pipeline import locate_in_image

NAMES = ["nose", "left wrist", "pelvis", "neck", "right knee", "left ankle"]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("decoding", ["constrained", "free"])
def test_cpu_fp32_answers_equal_the_torch_backend(trained, dims, decoding):
    ckpt, _ = trained[dims]
    ref = Pose(ckpt, backend="torch")
    # a small row capacity makes the buffers grow mid-decoding (the regrid path)
    fast = TorchCudaBackend(ckpt, device="cpu", row_capacity=8)
    rng = np.random.default_rng(dims)
    img = rng.integers(0, 255, (170, 210, 3)).astype(np.uint8)
    boxes = [[10, 10, 120, 140], [60, 20, 110, 140], [0, 0, 210, 170]]
    requests = ref.library.resolve(NAMES)
    a = locate_in_image(ref.backend, ref.spec, img, boxes, requests, decoding)
    b = locate_in_image(fast, ref.spec, img, boxes, requests, decoding)
    assert a.texts == b.texts
    assert len({t for row in a.texts for t in row}) > 1  # answers differ per row: the check can fail
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_allclose(a.values, b.values, atol=1e-6)
    assert a.stats.decoder_passes == b.stats.decoder_passes


def test_without_a_gpu_the_backend_says_so(trained):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        Pose(trained[2][0], backend="torch-cuda")


@pytest.mark.gpu
def test_cuda_fp32_equals_cpu_and_bf16_mostly(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from locllm_training.init import init_checkpoint

    # no LoRA (peft's targets are transformers 4.57's module names), no ONNX export: it builds
    # where only torch + transformers are installed
    ckpt = init_checkpoint("tiny", tmp_path / "ckpt", image_size=56, teach_format_steps=150, lora=False)
    ref = Pose(ckpt, backend="torch")
    img = np.random.default_rng(5).integers(0, 255, (170, 210, 3)).astype(np.uint8)
    boxes = [[10, 10, 120, 140], [60, 20, 110, 140]]
    requests = ref.library.resolve(NAMES)
    a = locate_in_image(ref.backend, ref.spec, img, boxes, requests)
    for dtype, graphs in (("float32", False), ("float32", True)):
        b = locate_in_image(
            TorchCudaBackend(ckpt, device=0, dtype=dtype, cuda_graphs=graphs), ref.spec, img, boxes, requests
        )
        assert a.texts == b.texts, (dtype, graphs)
    b = locate_in_image(TorchCudaBackend(ckpt, device=0), ref.spec, img, boxes, requests)  # bf16
    same = sum(x == y for ra, rb in zip(a.texts, b.texts) for x, y in zip(ra, rb))
    assert same >= 0.9 * len(boxes) * len(NAMES)
