"""Official tensor names and layouts -> our checkpoint's state-dict entries, tensor by tensor."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..model import LocLLMConfig
from ..pretrained import resize_position_embeddings
from .architecture import VisionLayout
from .errors import VISION_PREFIX, OfficialCheckpointError
from .shards import _open_shard

LAYERSCALE_SOURCES = ("checkpoint", "dino-file")


# One input tensor -> [(our key, tensor)]
Converted = list[tuple[str, torch.Tensor]]


class KeyMapper:
    """Maps official tensors (one at a time) to our checkpoint's state-dict entries."""

    def __init__(self, config: LocLLMConfig, vision: VisionLayout, gammas: dict[str, torch.Tensor] | None = None):
        self.config, self.vision = config, vision
        self.grid = config.image_size // config.patch_size
        self.vlora = config.lora_vision.enabled
        self.llora = config.lora_llm.enabled
        self.gammas = gammas  # "N.ls1" -> tensor, from a DINOv2 file (--layerscale dino-file)

    def __call__(self, key: str, t: torch.Tensor) -> Converted:
        if key.startswith(VISION_PREFIX):
            return self._vision(key[len(VISION_PREFIX) :], t)
        if key.startswith("mm_projector."):
            return [("projector." + key[len("mm_projector.") :], t)]
        if key.startswith("model.") or key.startswith("lm_head."):
            return self._llm(key, t)
        raise OfficialCheckpointError(f"unexpected tensor {key!r}")

    def _llm(self, key: str, t: torch.Tensor) -> Converted:
        if key.endswith("rotary_emb.inv_freq"):
            return []  # bf16-rounded and unused by the original: RoPE is rebuilt from the config
        m = re.fullmatch(r"(model\.layers\.\d+\.self_attn\.[qv]_proj)\.(weight|lora_A|lora_B)", key)
        if m and m.group(2) != "weight" and not self.llora:
            raise OfficialCheckpointError(f"{key}: LoRA weights present but lora_llm_enable is false in config.json")
        if m and self.llora:
            leaf = {"weight": "base_layer.weight", "lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}
            return [(f"llm.{m.group(1)}.{leaf[m.group(2)]}", t)]
        return [("llm." + key, t)]

    def _vision(self, key: str, t: torch.Tensor) -> Converted:
        e = "vision.embeddings."
        simple = {
            "cls_token": e + "cls_token",
            "mask_token": e + "mask_token",
            "patch_embed.proj.weight": e + "patch_embeddings.projection.weight",
            "patch_embed.proj.bias": e + "patch_embeddings.projection.bias",
            "norm.weight": "vision.layernorm.weight",
            "norm.bias": "vision.layernorm.bias",
        }
        if key in simple:
            if key == "mask_token":
                t = t.reshape(1, -1)
            return [(simple[key], t)]
        if key == "pos_embed":
            return [(e + "position_embeddings", resize_position_embeddings(t, self.grid, dtype=torch.float32))]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if not m:
            raise OfficialCheckpointError(f"unexpected vision tensor {VISION_PREFIX}{key!r}")
        n, rest = m.group(1), m.group(2)
        layer = f"vision.encoder.layer.{n}."
        att = layer + "attention.attention."
        c = self.vision.width
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            leaf = rest.rsplit(".", 1)[1]
            if t.shape[0] != 3 * c:
                raise OfficialCheckpointError(f"{key}: fused qkv has {t.shape[0]} rows, expected 3 x {c}")
            q, k, v = t[:c], t[c : 2 * c], t[2 * c :]
            base = "base_layer." if self.vlora else ""
            return [(f"{att}query.{base}{leaf}", q), (f"{att}key.{leaf}", k), (f"{att}value.{base}{leaf}", v)]
        m2 = re.fullmatch(r"attn\.lora_([AB])_([qv])", rest)
        if m2:
            if not self.vlora:
                raise OfficialCheckpointError(f"{key}: LoRA weights present but lora_vision_enable is false")
            target = {"q": "query", "v": "value"}[m2.group(2)]
            return [(f"{att}{target}.lora_{m2.group(1)}.default.weight", t)]
        m3 = re.fullmatch(r"ls([12])\.gamma", rest)
        if m3:
            if self.gammas is not None:
                g = self.gammas.get(f"{n}.ls{m3.group(1)}")
                if g is None or g.shape != t.shape:
                    raise OfficialCheckpointError(
                        f"DINOv2 weights file has no blocks.{n}.ls{m3.group(1)}.gamma {t.shape}"
                    )
                t = g
            return [(f"{layer}layer_scale{m3.group(1)}.lambda1", t)]
        table = {
            "norm1.weight": "norm1.weight",
            "norm1.bias": "norm1.bias",
            "norm2.weight": "norm2.weight",
            "norm2.bias": "norm2.bias",
            "attn.proj.weight": "attention.output.dense.weight",
            "attn.proj.bias": "attention.output.dense.bias",
            "mlp.fc1.weight": "mlp.fc1.weight",
            "mlp.fc1.bias": "mlp.fc1.bias",
            "mlp.fc2.weight": "mlp.fc2.weight",
            "mlp.fc2.bias": "mlp.fc2.bias",
            "mlp.w12.weight": "mlp.weights_in.weight",
            "mlp.w12.bias": "mlp.weights_in.bias",
            "mlp.w3.weight": "mlp.weights_out.weight",
            "mlp.w3.bias": "mlp.weights_out.bias",
        }
        if rest in table:
            return [(layer + table[rest], t)]
        raise OfficialCheckpointError(f"unexpected vision tensor {VISION_PREFIX}{key!r}")


def load_dino_gammas(path: str | Path, depth: int) -> dict[str, torch.Tensor]:
    """LayerScale gammas of a DINOv2 weights file (``blocks.N.ls1.gamma``), torch.load weights_only."""
    state, _ = _open_shard(Path(path))
    out = {}
    for key, t in state.items():
        m = re.search(r"blocks\.(?:\d+\.)?(\d+)\.(ls[12])\.gamma$", key)
        if m:
            out[f"{m.group(1)}.{m.group(2)}"] = t.detach().clone()
    want = {f"{n}.ls{i}" for n in range(depth) for i in (1, 2)}
    if not want <= set(out):
        raise OfficialCheckpointError(
            f"{path}: LayerScale gammas missing for {sorted(want - set(out))[:4]}... (is it a DINOv2 file?)"
        )
    return out
