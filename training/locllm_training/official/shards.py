"""Reading the weight files of a public checkpoint: one shard open at a time, tensors only."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from .errors import OfficialCheckpointError


def _weight_map(directory: Path) -> dict[str, str]:
    """key -> file name, in the order the files hold them (reads no tensor data)."""
    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not weight_map:
                raise OfficialCheckpointError(f"{index}: no weight_map")
            missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
            if missing:
                raise OfficialCheckpointError(f"{directory}: shards named in {index_name} are missing: {missing}")
            return dict(weight_map)
    for single in ("pytorch_model.bin", "model.safetensors"):
        if (directory / single).is_file():
            return {k: single for k in _open_shard(directory / single)[0]}
    raise OfficialCheckpointError(
        f"{directory}: no weights (pytorch_model.bin, pytorch_model.bin.index.json + shards, or model.safetensors)"
    )


def _open_shard(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of one weight file and whether they are memory-mapped (then no data is read yet)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out, False
    mapped = True
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch.save format cannot be mmapped
            state, mapped = torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain containers: never unpickled further
        raise OfficialCheckpointError(f"{path}: refused: not a plain tensor file ({str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise OfficialCheckpointError(f"{path}: cannot read the weights (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfficialCheckpointError(f"{path}: not a state dict of tensors")
    return state, mapped


class _ShardCache:
    """At most one input shard open at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.name: str | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.mapped = False

    def get(self, file: str) -> dict[str, torch.Tensor]:
        if file != self.name:
            self.close()
            self.tensors, self.mapped = _open_shard(self.directory / file)
            self.name = file
        return self.tensors

    def close(self) -> None:
        self.tensors, self.name, self.mapped = {}, None, False
