"""Backends: a string away (``Pose(..., backend="onnxruntime")``)."""

from .base import Backend

__all__ = ["Backend"]
