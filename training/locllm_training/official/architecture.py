"""The model of a public checkpoint, read from its weights (the ViT) and config.json (the LM)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..model import LocLLMConfig, LoraSettings
from .errors import VISION_PREFIX, OfficialCheckpointError

DINOV2_HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) uses 64-dim heads


@dataclass
class VisionLayout:
    width: int
    depth: int
    heads: int
    patch_size: int
    num_channels: int
    ffn: str  # "mlp" or "swiglu"
    mlp_ratio: float
    qkv_bias: bool
    pos_grid: int  # side of the position grid the ViT was trained with (37 for DINOv2)


def _block_index(key: str) -> int | None:
    m = re.match(rf"{re.escape(VISION_PREFIX)}blocks\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _swiglu_hidden(width: int, mlp_ratio: float) -> int:
    # HF Dinov2SwiGLUFFN (and the original SwiGLUFFNFused): 2/3 of the MLP width, rounded up to 8
    return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def infer_vision_layout(keys: Iterable[str], shape_of: Callable[[str], tuple], heads: int | None = None):
    keys = set(keys)
    p = VISION_PREFIX
    needed = [f"{p}patch_embed.proj.weight", f"{p}pos_embed", f"{p}cls_token", f"{p}norm.weight"]
    missing = [k for k in needed if k not in keys]
    if missing:
        raise OfficialCheckpointError(f"vision weights missing: {missing}")
    width, channels, ph, pw = shape_of(f"{p}patch_embed.proj.weight")
    if ph != pw:
        raise OfficialCheckpointError(f"non-square patches {ph}x{pw} are not supported")
    blocks = {b for b in (_block_index(k) for k in keys) if b is not None}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise OfficialCheckpointError(f"vision blocks are not numbered 0..N-1: {sorted(blocks)[:5]}...")
    depth = max(blocks) + 1
    if heads is None:
        if width % DINOV2_HEAD_DIM:
            raise OfficialCheckpointError(
                f"vision width {width} is not a multiple of DINOv2's {DINOV2_HEAD_DIM}-dim heads: give the head count"
            )
        heads = width // DINOV2_HEAD_DIM
    if width % heads:
        raise OfficialCheckpointError(f"vision width {width} is not divisible by {heads} heads")
    if f"{p}blocks.0.mlp.fc1.weight" in keys:
        ffn, hidden = "mlp", shape_of(f"{p}blocks.0.mlp.fc1.weight")[0]
        mlp_ratio = hidden / width
    elif f"{p}blocks.0.mlp.w12.weight" in keys:
        ffn, hidden = "swiglu", shape_of(f"{p}blocks.0.mlp.w12.weight")[0] // 2
        ratios = [r / 4 for r in range(1, 65)]
        fits = [r for r in ratios if _swiglu_hidden(width, r) == hidden]
        if not fits:
            raise OfficialCheckpointError(
                f"SwiGLU hidden size {hidden} does not fit HF Dinov2's rule for width {width}"
            )
        mlp_ratio = 4.0 if 4.0 in fits else fits[0]
    else:
        raise OfficialCheckpointError("vision blocks have neither mlp.fc1/fc2 nor mlp.w12/w3 (SwiGLU) weights")
    n_pos = shape_of(f"{p}pos_embed")[1] - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise OfficialCheckpointError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    return VisionLayout(
        width=int(width),
        depth=depth,
        heads=int(heads),
        patch_size=int(ph),
        num_channels=int(channels),
        ffn=ffn,
        mlp_ratio=float(mlp_ratio),
        qkv_bias=f"{p}blocks.0.attn.qkv.bias" in keys,
        pos_grid=side,
    )


def _enabled(cfg: dict, which: str) -> bool:
    return bool(cfg.get(f"lora_{which}_enable", False)) and int(cfg.get(f"lora_{which}_r", 0)) > 0


LLM_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
)


def build_config(official: dict, vision: VisionLayout, coord_dims: int = 2, log=print) -> LocLLMConfig:
    """Our LocLLMConfig for an official config.json and the ViT layout read from its weights."""
    crop = int(official.get("crop_size", 224))
    if crop % vision.patch_size:
        raise OfficialCheckpointError(f"crop_size {crop} is not a multiple of the patch size {vision.patch_size}")
    num_patches = (crop // vision.patch_size) ** 2
    if "num_patches" in official and int(official["num_patches"]) != num_patches:
        raise OfficialCheckpointError(
            f"config num_patches {official['num_patches']} != (crop_size {crop} // patch {vision.patch_size})^2"
        )
    if "im_patch_token" not in official:
        raise OfficialCheckpointError("config.json has no im_patch_token")
    llm = {k: official[k] for k in LLM_FIELDS if official.get(k) is not None}
    llm.setdefault("num_key_value_heads", llm.get("num_attention_heads"))
    llm.setdefault("tie_word_embeddings", False)
    # The original builds RoPE with transformers 4.31's formula, base 10000, whatever the
    # config says (4.31 has no rope_theta; its LoRA attention ignores rope_scaling).
    if official.get("rope_theta", 10000.0) != 10000.0:
        log(f"note: config rope_theta {official['rope_theta']} ignored: the original uses base 10000")
    llm["rope_theta"] = 10000.0
    if official.get("rope_scaling"):
        if _enabled(official, "llm"):
            log("note: config rope_scaling ignored, as the original's LoRA attention does")
        else:
            llm["rope_scaling"] = official["rope_scaling"]
    if int(official.get("pretraining_tp", 1)) > 1 and _enabled(official, "llm"):
        raise OfficialCheckpointError("pretraining_tp > 1 bypasses the LoRA q/v weights in transformers 4.31")
    vision_cfg = dict(
        hidden_size=vision.width,
        num_hidden_layers=vision.depth,
        num_attention_heads=vision.heads,
        mlp_ratio=vision.mlp_ratio,
        use_swiglu_ffn=vision.ffn == "swiglu",
        qkv_bias=vision.qkv_bias,
        num_channels=vision.num_channels,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )

    def lora(which: str) -> LoraSettings:
        # Original: scaling = alpha / r on both towers (models/lora.py), as peft's default.
        return LoraSettings(
            r=int(official.get(f"lora_{which}_r", 8)),
            alpha=official.get(f"lora_{which}_alpha", 16),
            dropout=float(official.get(f"lora_{which}_dropout", 0.05)),
            enabled=_enabled(official, which),
        )

    return LocLLMConfig(
        vision=vision_cfg,
        llm=llm,
        image_size=crop,
        patch_size=vision.patch_size,
        coord_dims=coord_dims,
        im_patch_token_id=int(official["im_patch_token"]),
        lora_vision=lora("vision"),
        lora_llm=lora("llm"),
        projector_bias=True,
    )
