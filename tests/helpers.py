"""Test models: tiny checkpoints taught the answer format in a few seconds (see
``locllm_training.init.teach_format``): well-formed greedy answers that differ per keypoint
and swing with the image, unlike a random model's."""

from __future__ import annotations

from pathlib import Path

from locllm_training.init import init_checkpoint


def format_trained_checkpoint(
    out: Path, dims: int = 2, steps: int | None = None, seed: int = 0, image_size: int = 56
) -> Path:
    # A 3D answer is twice as long as a 2D one: at 150 steps the tiny 3D model still ran its
    # depth digits on past the bracket ("[0.611,0.611,0.60110.6") and free decoding had
    # almost nothing well-formed to compare; 300 steps gives 32/32 well-formed answers.
    if steps is None:
        steps = 150 if dims == 2 else 300
    return init_checkpoint("tiny", out, seed=seed, dims=dims, image_size=image_size, teach_format_steps=steps)
