"""Where an engine's ONNX graphs keep their weights: inline, or past protobuf's 2 GiB limit in
one external-data file beside the graph, which the manifest lists and checksums (torch-free)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from locllm_sdk.errors import EngineError

# protobuf refuses messages of 2 GiB or more; a graph whose weights (with a margin for its nodes)
# pass this keeps them in one ONNX external-data file beside it, ``NAME.onnx.data``
MAX_INLINE_BYTES = 2**31 - 2**26
DATA_SUFFIX = ".data"


def _graph_bytes(model) -> int:
    """The serialized size of a graph, summed over its parts (one >2 GiB message cannot be sized)."""
    g = model.graph
    return sum(t.ByteSize() for t in g.initializer) + sum(n.ByteSize() for n in g.node)


def save_graph(model, path: Path) -> None:
    """Write ``model`` to ``path``: one file, or, past ``MAX_INLINE_BYTES``, the graph with every
    weight in ``path.name + DATA_SUFFIX`` (one external-data file; ONNX Runtime and TensorRT's
    parser read it from beside the graph)."""
    import onnx

    data = path.with_name(path.name + DATA_SUFFIX)
    data.unlink(missing_ok=True)
    if _graph_bytes(model) <= MAX_INLINE_BYTES:
        onnx.save(model, str(path))
    else:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        # onnx creates the data file owner-only (0600): give it the graph's mode (the umask's), so
        # an engine readable by its users does not fail on its weights
        data.chmod(path.stat().st_mode & 0o777)


def external_data_files(path: Path) -> tuple[str, ...]:
    """The external-data files the graph at ``path`` reads (names beside it; none for a graph
    that holds its weights). A location outside the graph's folder is an EngineError."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = dict.fromkeys(
        e.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    )
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise EngineError(f"{path}: external data at {name!r}, not a file beside the graph")
    return tuple(names)


def graphs_external_data(engine_dir: Path, entry) -> tuple[str, ...]:
    """The external-data files of an ``OnnxRuntimeEntry``'s graphs in ``engine_dir``."""
    return tuple(dict.fromkeys(d for g in entry.graphs() for d in external_data_files(engine_dir / g)))


@contextlib.contextmanager
def graph_target(path: Path) -> Iterator[Path]:
    """A path to write a graph to (torch's exporter, a quantizer) in a folder of its own: past
    2 GiB they scatter its weights into files of their own naming there. On exit the graph is
    moved to ``path``, in one file or with one ``DATA_SUFFIX`` file (``save_graph``)."""
    scratch = path.with_name(f".{path.name}.writing")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch / path.name
        written = scratch / path.name
        if [p.name for p in scratch.iterdir()] == [path.name] and written.stat().st_size <= MAX_INLINE_BYTES:
            path.with_name(path.name + DATA_SUFFIX).unlink(missing_ok=True)
            written.replace(path)  # the common case: one small file, bytes as written
        else:
            import onnx

            save_graph(onnx.load(str(written)), path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ONNX Runtime on the CPU maps an external tensor from the file when its offset is a multiple of
# the allocation granularity, 4 KiB (64 KiB on Windows; onnxruntime's model_saving_options.h)
DATA_ALIGNMENT = 65536


def _external_fields(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _set_external_fields(tensor, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _read_external(folder: Path, tensor) -> bytes:
    fields = _external_fields(tensor)
    with open(folder / fields["location"], "rb") as f:
        f.seek(int(fields.get("offset", 0)))
        data = f.read(int(fields["length"])) if "length" in fields else f.read()
    return data


def share_external_data(primary: Path, secondary: Path) -> int:
    """Let the graph at ``secondary`` read each external weight that ``primary``'s external data
    already holds (same type, shape and bytes, whatever its name) from ``primary``'s file, and
    keep only the others in its own ``DATA_SUFFIX`` file (removed when none are left). The two
    decoder graphs of a 1B-class model are the same weights traced twice under different
    initializer names; stored once, the engine is about half the size. Returns the bytes no
    longer stored twice (0 when either graph is inline)."""
    import hashlib

    import onnx

    folder = secondary.parent
    if primary.parent != folder:
        raise EngineError(f"{secondary}: shares data only with a graph beside it, not {primary}")
    if not external_data_files(primary) or not external_data_files(secondary):
        return 0

    def key(tensor, data: bytes) -> tuple:
        return tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).digest()

    held = {}
    for tensor in onnx.load(str(primary), load_external_data=False).graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            fields = _external_fields(tensor)
            data = _read_external(folder, tensor)
            held.setdefault(key(tensor, data), (fields["location"], int(fields.get("offset", 0)), len(data)))
    model = onnx.load(str(secondary), load_external_data=False)
    own = secondary.with_name(secondary.name + DATA_SUFFIX)
    fresh = own.with_name(own.name + ".writing")
    shared = 0
    try:
        with open(fresh, "wb") as out:
            for tensor in model.graph.initializer:
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                data = _read_external(folder, tensor)
                found = held.get(key(tensor, data))
                if found is not None:
                    _set_external_fields(tensor, *found)
                    shared += len(data)
                    continue
                out.seek(-out.tell() % DATA_ALIGNMENT, 1)
                offset = out.tell()
                out.write(data)
                _set_external_fields(tensor, own.name, offset, len(data))
        kept = any(_external_fields(t).get("location") == own.name for t in model.graph.initializer)
        if kept:
            fresh.chmod(secondary.stat().st_mode & 0o777)
            fresh.replace(own)
        else:
            fresh.unlink()
            own.unlink(missing_ok=True)
        onnx.save(model, str(secondary))  # the graph alone: its tensors point into the data files
    finally:
        fresh.unlink(missing_ok=True)
    return shared
