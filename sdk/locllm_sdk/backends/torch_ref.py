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
            from locllm_training.graphs import DecoderStep, VisionTower, empty_past
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
        t = self._torch
        with t.inference_mode():
            out = self.step(
                t.from_numpy(np.ascontiguousarray(embeds, np.float32)),
                t.from_numpy(np.ascontiguousarray(attention_mask, np.int64)),
                t.from_numpy(np.ascontiguousarray(position_ids, np.int64)),
                t.from_numpy(np.ascontiguousarray(logits_index, np.int64)),
                *cache,
            )
        return out[0].float().numpy(), list(out[1:])

    def describe(self) -> dict:
        return {"backend": self.name, "torch": self._torch.__version__, "lora": "merged" if self.merged else "unmerged"}
