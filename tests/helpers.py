"""Test models: tiny checkpoints taught the answer format in a few seconds (see
``locllm_training.init.teach_format``): well-formed greedy answers that differ per keypoint
and swing with the image, unlike a random model's."""

from __future__ import annotations

from pathlib import Path

from locllm_training.init import init_checkpoint


def format_trained_checkpoint(out: Path, dims: int = 2, steps: int = 150, seed: int = 0, image_size: int = 56) -> Path:
    return init_checkpoint("tiny", out, seed=seed, dims=dims, image_size=image_size, teach_format_steps=steps)
