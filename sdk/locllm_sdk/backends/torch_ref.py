"""The PyTorch reference backend: the unmerged checkpoint (LoRA live), same decoding.

It is the parity oracle for every exported backend. torch is imported only here, only
when this backend is chosen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, checkpoint: Path | None = None, threads: int | None = None, merged: bool = False, model=None):
        """From a checkpoint directory, or (``model=``) a LocLLM already in memory."""
        try:
            import torch
            from locllm_training.graphs import DecoderStep, SharedPrefixStep, VisionTower, empty_past
            from locllm_training.model import load_checkpoint
        except ImportError as e:
            raise ImportError(
                "backend='torch' needs the training extra: pip install 'locllm-sdk[train]' (torch, transformers, peft)"
            ) from e
        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.model = model if model is not None else load_checkpoint(checkpoint, with_lora=not merged)
        self.vision = VisionTower(self.model).eval()
        self.step = DecoderStep(self.model.llm).eval()
        self.shared_step = SharedPrefixStep(self.model.llm).eval()
        self._empty_past = lambda b: empty_past(self.model.llm.config, b)
        self.merged = merged

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.vision(self._torch.from_numpy(np.ascontiguousarray(pixels, np.float32))).numpy()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model.embed_tokens(self._torch.from_numpy(np.asarray(ids, np.int64))).numpy()

    def empty_cache(self, batch: int):
        return self._empty_past(batch)

    def select_rows(self, cache, rows: np.ndarray):
        idx = self._torch.from_numpy(np.asarray(rows, np.int64))
        return [c.index_select(0, idx) for c in cache]

    def forward(self, embeds, attention_mask, position_ids, logits_index, cache):
        return self._run(self.step, (embeds, attention_mask, position_ids, logits_index), cache)

    supports_shared_prefix = True

    def forward_shared(self, embeds, attention_mask, position_ids, logits_index, prefix, cache):
        return self._run(self.shared_step, (embeds, attention_mask, position_ids, logits_index), [*prefix, *cache])

    def _run(self, graph, arrays, caches):
        t = self._torch
        dtypes = (np.float32, np.int64, np.int64, np.int64)
        with t.inference_mode():
            out = graph(*(t.from_numpy(np.ascontiguousarray(a, d)) for a, d in zip(arrays, dtypes)), *caches)
        return out[0].float().numpy(), list(out[1:])

    def describe(self) -> dict:
        return {"backend": self.name, "torch": self._torch.__version__, "lora": "merged" if self.merged else "unmerged"}
