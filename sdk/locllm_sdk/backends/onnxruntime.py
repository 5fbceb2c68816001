"""ONNX Runtime backend (CPU; CUDA when onnxruntime-gpu really runs on a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import Backend


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here (missing package, provider, device)."""


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        engine_dir: Path,
        manifest: dict,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - base install has it
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") from e
        files = manifest["backends"]["onnxruntime"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is None:
            threads = int(os.environ.get("LOCLLM_THREADS", "0")) or None
        if threads:
            opts.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.vision = ort.InferenceSession(str(engine_dir / files["vision"]), opts, providers=providers)
        self.decoder = ort.InferenceSession(str(engine_dir / files["decoder"]), opts, providers=providers)
        # engines from format 1 builds before the cascade graph existed lack it: copy path
        shared = files.get("decoder_shared")
        self.shared = ort.InferenceSession(str(engine_dir / shared), opts, providers=providers) if shared else None
        self.supports_shared_prefix = self.shared is not None
        wanted = providers[0]
        actual = self.decoder.get_providers()
        # onnxruntime-gpu falls back to CPU silently: check what the session really uses.
        if wanted not in actual or self.vision.get_providers()[0] != wanted:
            raise BackendUnavailable(
                f"ONNX Runtime did not enable {wanted} (sessions run on {actual}); refusing to pretend"
            )
        self.providers = actual
        if wanted == "CUDAExecutionProvider":
            self.name = "onnxruntime-cuda"
        self.embeddings = np.load(engine_dir / files["embeddings"], mmap_mode="r")
        m = manifest["model"]
        self.num_layers = int(m["num_layers"])
        self.kv_heads = int(m["num_kv_heads"])
        self.head_dim = int(m["head_dim"])
        self.cache_dtype = np.float32
        self._past_names = [n for i in range(self.num_layers) for n in (f"past_key_{i}", f"past_value_{i}")]
        self._prefix_names = [n for i in range(self.num_layers) for n in (f"prefix_key_{i}", f"prefix_value_{i}")]
        self._out_names = ["logits"] + [
            n for i in range(self.num_layers) for n in (f"present_key_{i}", f"present_value_{i}")
        ]

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.vision.run(["image_tokens"], {"pixel_values": np.ascontiguousarray(pixels, np.float32)})[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embeddings[np.asarray(ids, np.int64)], dtype=np.float32)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        return [z] * (2 * self.num_layers)

    def select_rows(self, cache: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
        rows = np.asarray(rows, np.int64)
        return [np.ascontiguousarray(c[rows]) for c in cache]

    def forward(self, embeds, attention_mask, position_ids, logits_index, cache):
        feeds = _step_feeds(embeds, attention_mask, position_ids, logits_index)
        feeds.update(zip(self._past_names, cache))
        out = self.decoder.run(self._out_names, feeds)
        return out[0], out[1:]

    def forward_shared(self, embeds, attention_mask, position_ids, logits_index, prefix, cache):
        feeds = _step_feeds(embeds, attention_mask, position_ids, logits_index)
        feeds.update(zip(self._prefix_names, prefix))
        feeds.update(zip(self._past_names, cache))
        out = self.shared.run(self._out_names, feeds)
        return out[0], out[1:]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.name, "onnxruntime": ort.__version__, "providers": self.providers}


def _step_feeds(embeds, attention_mask, position_ids, logits_index) -> dict:
    return {
        "inputs_embeds": np.ascontiguousarray(embeds, np.float32),
        "attention_mask": np.ascontiguousarray(attention_mask, np.int64),
        "position_ids": np.ascontiguousarray(position_ids, np.int64),
        "logits_index": np.ascontiguousarray(logits_index, np.int64),
    }
