"""A streaming safetensors writer: header first, then tensor by tensor, so that writing a
shard never holds it in memory; memory-mapped inputs give their pages back once written."""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
from pathlib import Path

import torch
from locllm_sdk.errors import CheckpointError

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_PAGE = mmap.PAGESIZE
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - non-POSIX
    _libc = None
_MADV_DONTNEED = 4


def _release_pages(t: torch.Tensor) -> None:
    """Drop the (clean, file-backed) pages a memory-mapped input tensor touched from our RSS."""
    if _libc is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a = (start + _PAGE - 1) // _PAGE * _PAGE  # only whole pages inside the tensor
    b = end // _PAGE * _PAGE
    if b > a:
        _libc.madvise(a, b - a, _MADV_DONTNEED)


def write_safetensors_streaming(path: Path, entries: list[tuple[str, torch.Tensor, bool]]) -> int:
    """Write ``entries`` (key, tensor, tensor is a view of a memory-mapped input) in order as
    one safetensors file: header first, then tensor by tensor. Mapped inputs give their pages
    back once written, so the resident set does not grow with the shard."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t, _ in entries:
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{key}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t, mapped in entries:
            data = t.contiguous()
            if data.numel():
                f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            if mapped and data.data_ptr() == t.data_ptr():
                _release_pages(t)
            del data
    return offset
