"""Random-weight checkpoints from a size preset (tests, export checks, benchmarks)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .model import LocLLM, LocLLMConfig, LoraSettings, save_checkpoint
from .presets import LLM_DEFAULTS, PRESETS, VISION_DEFAULTS
from .tokenizer_files import write_tokenizer


def preset_config(preset: str, dims: int = 2, image_size: int = 224) -> LocLLMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    return LocLLMConfig(
        vision={**VISION_DEFAULTS, **p["vision"]},
        llm={**LLM_DEFAULTS, **p["llm"]},
        image_size=image_size,
        coord_dims=dims,
        lora_vision=LoraSettings(r=8, alpha=16, dropout=0.05),
        lora_llm=LoraSettings(r=8, alpha=16, dropout=0.05),
    )


def random_model(config: LocLLMConfig, seed: int = 0) -> LocLLM:
    """A random model whose LoRA weights are non-zero, so merging them changes outputs."""
    torch.manual_seed(seed)
    model = LocLLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # peft initialises B to zero; make the adapters matter
                p.normal_(0.0, 0.02)
        # Bigger logits spread make greedy digit choices less tie-prone in parity tests.
        model.llm.lm_head.weight.normal_(0.0, 0.05)
    return model.eval()


def init_checkpoint(preset: str, output: str | Path, seed: int = 0, dims: int = 2, legacy: bool = False) -> Path:
    config = preset_config(preset, dims=dims)
    model = random_model(config, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_tokenizer(tmp, legacy=legacy)
        return save_checkpoint(model, tok, output, extra={"preset": preset, "seed": seed})
