"""Checkpoints shipped with locllm-sdk (``locllm_sdk._models``): see README.md here."""
