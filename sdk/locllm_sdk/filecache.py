"""The SDK's cache folder, and the record of engine files whose sha256 was already checked.

Hashing a 211 MB engine costs about a second at every start. ``verified_sha256`` hashes a
file once and remembers the result under its identity on disk (device, inode, size,
modification time in ns); a later check of an unchanged file reads the record instead. Any
write to the file changes its mtime (and usually its size), so a modified file is hashed
again. The record guards against damage (a truncated copy, a replaced file), not against
someone able to write both the engine and this cache: ``verify="always"`` hashes every time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .manifest import sha256_file

VERIFY_MODES = ("cached", "always", "sizes")
_RECORD = "verified-files.json"


def cache_dir() -> Path:
    """``$LOCLLM_CACHE``, else ``$XDG_CACHE_HOME/locllm``, else ``~/.cache/locllm``."""
    if os.environ.get("LOCLLM_CACHE"):
        return Path(os.environ["LOCLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "locllm"


def verify_mode(verify: bool | str) -> str:
    """``True`` is ``"always"``, ``False`` is ``"sizes"``; otherwise one of ``VERIFY_MODES``."""
    from .errors import ArgumentError

    if verify is True:
        return "always"
    if verify is False:
        return "sizes"
    if verify not in VERIFY_MODES:
        raise ArgumentError(f"verify must be True, False or one of {VERIFY_MODES}, got {verify!r}")
    return verify


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _read_record(record: Path) -> dict:
    try:
        data = json.loads(record.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no record, or a damaged one: hash again


def verified_sha256(path: str | Path, mode: str = "cached") -> str:
    """The sha256 of ``path``: computed, or with ``mode="cached"`` read from the record when
    the file is unchanged since it was last hashed (and recorded after hashing)."""
    path = Path(path).resolve()
    if mode != "cached":
        return sha256_file(path)
    record = cache_dir() / _RECORD
    key, ident = str(path), _identity(path)
    entry = _read_record(record).get(key)
    if isinstance(entry, dict) and entry.get("identity") == ident and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    if _identity(path) == ident:  # unchanged while hashing: safe to remember
        _remember(record, key, {"identity": ident, "sha256": digest})
    return digest


def _remember(record: Path, key: str, entry: dict) -> None:
    """Add one entry; a read-only or missing cache only costs the next start a hash."""
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        data = _read_record(record)
        data[key] = entry
        tmp = record.with_name(f"{_RECORD}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(data))
        tmp.replace(record)
    except OSError:
        pass
