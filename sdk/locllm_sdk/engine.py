"""The engine directory: the contract between export and runtime.

ENGINE_DIR/
  manifest.json        format version, model facts, tokenizer ids, precision, files+sha256
  vision.onnx          crops [N,3,S,S] -> image tokens [N,P,H]   (backend onnxruntime)
  decoder.onnx         one decoder pass with KV cache, logits at asked positions
  embeddings.npy       the LM's token embedding table [V,H]
  tokenizer/           tokenizer.model, tokenizer_config.json, added_tokens.json
  descriptions.yaml    the keypoint description library the engine was built with
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ENGINE_FORMAT = "locllm-engine"
ENGINE_FORMAT_VERSION = 1
# Revision of the exported graphs' computation (same inputs and outputs, faster or fixed
# internals): an engine of an older revision still runs, but cached engines are rebuilt.
# 2: the cascade step runs per-token layers on real tokens only and a two-part softmax.
GRAPH_REVISION = 2
MANIFEST = "manifest.json"


class EngineError(ValueError):
    """A malformed, incomplete, corrupt or incompatible engine directory."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(engine_dir: str | Path) -> dict:
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST
    if not engine_dir.is_dir():
        raise EngineError(f"engine directory not found: {engine_dir}")
    if not path.is_file():
        raise EngineError(f"{engine_dir} is not an engine directory: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != ENGINE_FORMAT:
        raise EngineError(f"{path}: not a {ENGINE_FORMAT} manifest (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != ENGINE_FORMAT_VERSION:
        raise EngineError(
            f"{path}: engine format_version {version!r} is not supported by this locllm_sdk "
            f"(it reads version {ENGINE_FORMAT_VERSION}); rebuild the engine with "
            "export/build_engines.py or install the matching locllm-sdk"
        )
    for key in ("model", "tokenizer", "files", "backends"):
        if key not in manifest:
            raise EngineError(f"{path}: manifest has no {key!r} section")
    return manifest


def verify_files(
    engine_dir: str | Path, manifest: dict, names: list[str] | None = None, checksums: bool = True
) -> None:
    """Every listed file exists with its recorded size (and sha256 when ``checksums``)."""
    engine_dir = Path(engine_dir)
    for name, meta in manifest["files"].items():
        if names is not None and name not in names:
            continue
        path = engine_dir / name
        if not path.is_file():
            raise EngineError(f"{engine_dir}: engine file {name} is missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise EngineError(
                f"{path}: size {size} differs from the manifest's {meta['bytes']} (truncated or replaced)"
            )
        if checksums and sha256_file(path) != meta["sha256"]:
            raise EngineError(f"{path}: sha256 differs from the manifest (corrupt or modified file)")


def files_of_backend(manifest: dict, backend: str) -> list[str]:
    entry = manifest["backends"].get(backend)
    if entry is None:
        raise EngineError(f"this engine has no {backend!r} build (it has: {', '.join(manifest['backends'])})")
    shared = [n for n in manifest["files"] if n.startswith("tokenizer/") or n == "descriptions.yaml"]
    own = [v for v in entry.values() if isinstance(v, str) and v in manifest["files"]]
    return shared + own
