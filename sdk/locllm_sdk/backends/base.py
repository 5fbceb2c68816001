"""The two contracts a backend implements, one of them.

``Backend`` (per-pass, "step" backends: onnxruntime, torch) runs the two graphs of a LocLLM
model and nothing else: the vision tower (crops -> image tokens) and one decoder pass over a
KV cache (embeddings -> logits at the asked positions). Scheduling, prompts, sampling and
parsing are backend-free (decoding.py), driven by the pipeline (pipeline.py).

``RequestBackend`` (whole-request backends: tensorrt) runs the vision tower and then
schedules and generates on its own (TensorRT-LLM's executor: in-flight batching, paged KV,
guided decoding); the pipeline hands it every (crop, keypoint) row at once.

Arrays cross both interfaces as numpy; a KV cache stays in the backend's own type. Backend
names and the backends' error type are defined in manifest.py and errors.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ..errors import BackendUnavailable

KVCache = Any  # backend-owned: a list of arrays/tensors [B, kv_heads, T, head_dim]

__all__ = ["Backend", "BackendUnavailable", "KVCache", "RequestBackend"]


class Backend(ABC):
    """A per-pass backend: the pipeline drives every decoder pass."""

    name: str = "?"

    @abstractmethod
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """[N,3,S,S] float32 normalised crops -> [N,P,H] float32 image tokens."""

    @abstractmethod
    def embed(self, ids: np.ndarray) -> np.ndarray:
        """[B,T] int64 token ids (no <im_patch>) -> [B,T,H] float32 embeddings."""

    @abstractmethod
    def empty_cache(self, batch: int) -> KVCache:
        """A KV cache with no positions, for ``batch`` rows."""

    @abstractmethod
    def select_rows(self, cache: KVCache, rows: np.ndarray) -> KVCache:
        """The cache rows ``rows`` (repeats allowed): shares a prefix across requests."""

    @abstractmethod
    def forward(
        self,
        embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        logits_index: np.ndarray,
        cache: KVCache,
    ) -> tuple[np.ndarray, KVCache]:
        """One decoder pass. ``attention_mask`` [B, past+T] int64, ``position_ids`` [B,T],
        ``logits_index`` [B,K] -> (float32 logits [B,K,V], cache extended by T)."""

    def cache_batch(self, cache: KVCache) -> int:
        """How many rows (or crops) ``cache`` holds."""
        return len(cache[0])

    # Cascade attention: backends that set this run ``forward_shared``, where the prefix KV
    # stays one copy per crop and row caches hold only the rows' own tokens.
    supports_shared_prefix: bool = False

    def forward_shared(
        self,
        embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        logits_index: np.ndarray,
        prefix: KVCache,
        cache: KVCache,
    ) -> tuple[np.ndarray, KVCache]:
        """One decoder pass over ``prefix`` ([N,...], one per crop; rows laid out crop by
        crop, B/N each) and the rows' own ``cache``; ``attention_mask`` covers the rows'
        own tokens only -> (logits [B,K,V], row cache extended by T)."""
        raise BackendUnavailable(f"backend {self.name} has no shared-prefix decoder step")

    def describe(self) -> dict:
        return {"backend": self.name}


class RequestBackend(ABC):
    """A whole-request backend: it decodes every (crop, keypoint) row itself."""

    name: str = "?"

    @abstractmethod
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """[N,3,S,S] float32 normalised crops -> [N,P,H] float32 image tokens."""

    @abstractmethod
    def locate_rows(self, image_tokens: np.ndarray, crop_of_row: np.ndarray, suffixes: list[list[int]], decoding: str):
        """Answers (``protocol.ParsedAnswer``, row order) and ``decoding.DecodeStats`` for
        rows ``suffixes`` (round ids after the prefix), row r on crop ``crop_of_row[r]``."""

    def describe(self) -> dict:
        return {"backend": self.name}
