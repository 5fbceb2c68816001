"""``backend="auto"``: the fastest backend this machine can really run for an engine."""

from __future__ import annotations


def choose_backend(manifest: dict) -> str:
    if "onnxruntime" in manifest["backends"]:
        return "onnxruntime"
    from ..engine import EngineError

    raise EngineError(f"no backend of this engine can run here (engine has: {', '.join(manifest['backends'])})")
