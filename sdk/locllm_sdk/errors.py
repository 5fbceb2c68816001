"""The SDK's error types: every error a caller should handle is one of these.

All derive from ``LocLLMError``; each also derives from the built-in type it refines
(``ValueError`` for bad input, ``RuntimeError`` for a backend that cannot run), so code
written against the built-ins keeps working.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class LocLLMError(Exception):
    """Base of every error raised by locllm_sdk on purpose."""


class EngineError(LocLLMError, ValueError):
    """A malformed, incomplete, corrupt or incompatible engine directory."""


class CheckpointError(LocLLMError, ValueError):
    """A checkpoint directory is missing files or does not match its config."""


class ProtocolError(LocLLMError, ValueError):
    """The tokenizer, a prompt or an answer does not fit the LocLLM protocol."""


class ImageError(LocLLMError, ValueError):
    """The image cannot be used: unreadable, wrong type, shape or dtype."""


class BoxError(LocLLMError, ValueError):
    """A person box is malformed, degenerate or outside the image."""


class KeypointError(LocLLMError, ValueError):
    """The keypoint request is malformed (not names, empty, repeated, bad description)."""


class UnknownKeypointError(LocLLMError, KeyError):
    """A keypoint name that the library does not describe and the caller gave no text for."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


class ArgumentError(LocLLMError, ValueError):
    """An API argument has a value it does not accept (backend, decoding, budget, ...)."""


class DataError(LocLLMError, ValueError):
    """A dataset file (COCO keypoints JSON, its image folder) is missing or malformed."""


class BackendUnavailable(LocLLMError, RuntimeError):
    """The backend asked for cannot run here (missing package, provider, device)."""


def read_json(path: str | Path, error: type[LocLLMError], kind: str | None = None) -> Any:
    """A JSON file, parsed; ``error`` naming the file when it cannot be read or parsed, and
    (with ``kind``, e.g. "a config") when it is not a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise error(f"{path} not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    if kind is not None and not isinstance(data, dict):
        raise error(f"{path}: {kind} is a JSON object, got {type(data).__name__}")
    return data
