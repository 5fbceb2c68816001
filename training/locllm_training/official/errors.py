"""Errors of the public-checkpoint conversion."""

from __future__ import annotations

from locllm_sdk.errors import CheckpointError

SOURCE_FORMAT = "locllm-official"
VISION_PREFIX = "vision_model."  # the original DINOv2 code's names, under the LocLLM model
IM_PATCH = "<im_patch>"


class OfficialCheckpointError(CheckpointError):
    """A public LocLLM directory that cannot be converted faithfully."""


class PromptIdsMismatchError(OfficialCheckpointError):
    """Our prompt ids differ from the checkpoint's own slow tokenizer."""
