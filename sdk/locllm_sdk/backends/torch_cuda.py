"""``backend="torch-cuda"``: the SDK's algorithm on PyTorch kernels, for GPUs without TensorRT.

The LoRA is merged (in fp32) and the LM runs in bf16 on CUDA (fp32 on the CPU, where the
same code is tested against the torch backend); the ViT and projector stay fp32, RMSNorm
computes in fp32 (HF's LlamaRMSNorm), matmuls accumulate in fp32 (cuBLAS), as the
reference keeps its numerics. Decoder passes:

* prefill (``forward`` from an empty cache): HF's Llama through ``graphs.DecoderStep``;
* the rows' passes (``forward_shared``): cascade attention on one preallocated buffer per
  crop and layer, ``[prefix | row 0 slots | row 1 slots | ...]`` (keys and values): the
  prefix is written once, each pass writes only its new tokens in place, and one
  ``scaled_dot_product_attention`` per layer reads the crop's whole buffer with a boolean
  mask (prefix visible to every row, a row's own slots causally, other rows' never). No
  prefix copy per row, no growing concatenation, fixed shapes from pass to pass;
* with ``cuda_graphs=True`` on CUDA, each pass shape (rows, tokens, past) is captured once as
  a CUDA graph and replayed (static input buffers; the KV buffers are static already).

torch is imported only when this backend is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..manifest import TORCH_CUDA
from .base import Backend, BackendUnavailable


@dataclass
class CascadeCache:
    """The rows' KV of one decoding: per layer one [N, kv, Lp + R*cap, d] buffer for keys and
    one for values (the crop's prefix first, then each of its R rows' ``cap`` slots)."""

    keys: list
    values: list
    crops: int
    rows_per_crop: int
    prefix_len: int
    cap: int
    used: int = 0  # row slots written so far (the same for every row: passes are right-padded)
    graphs: dict = field(default_factory=dict)


class TorchCudaBackend(Backend):
    name = TORCH_CUDA
    supports_shared_prefix = True

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str | int = "cuda",
        dtype: str | None = None,
        model=None,
        threads: int | None = None,
        cuda_graphs: bool = False,
        row_capacity: int = 96,
        compile: bool = False,
    ):
        """``device``: "cuda", a GPU index, or "cpu" (fp32, for tests); ``dtype``: the LM's,
        "bfloat16" (default on CUDA) or "float32"; ``row_capacity``: row slots reserved per
        row (suffix + answer tokens; grown if a request needs more); ``compile``: the rows'
        pass through ``torch.compile`` (fixed shapes per pass, so few recompiles)."""
        try:
            import torch
            from locllm_training.graphs import DecoderStep, VisionTower, empty_past
            from locllm_training.model import load_checkpoint, merge_lora
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        except ImportError as e:
            raise BackendUnavailable(
                "backend='torch-cuda' needs the training extra: pip install 'locllm-sdk[train]' (torch, transformers)"
            ) from e
        self._torch = torch
        self.device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("backend='torch-cuda' needs a CUDA GPU: torch.cuda.is_available() is False")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        name = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if name not in ("bfloat16", "float16", "float32"):
            raise BackendUnavailable(f"dtype must be bfloat16, float16 or float32, got {name!r}")
        self.dtype = getattr(torch, name)
        merged = merge_lora(model) if model is not None and model.has_lora else model
        if merged is None:
            merged = load_checkpoint(checkpoint, with_lora=False)  # the merge runs in fp32
        self.vision = VisionTower(merged).to(self.device).float().eval()
        self.llm = merged.llm.to(self.device, self.dtype).eval()
        self.embed_table = self.llm.get_input_embeddings()
        self.step = DecoderStep(self.llm).eval()
        self._empty_past = lambda b: [p.to(self.device, self.dtype) for p in empty_past(self.llm.config, b)]
        self._rope = apply_rotary_pos_emb
        cfg = self.llm.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = self.step.llm.model.layers[0].self_attn.head_dim
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.row_capacity = int(row_capacity)
        self._layers = torch.compile(self._cascade_layers, dynamic=False) if compile else self._cascade_layers

    # -- the Backend contract ----------------------------------------------------------
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        t = self._torch
        with t.inference_mode():
            x = t.from_numpy(np.ascontiguousarray(pixels, np.float32)).to(self.device)
            return self.vision(x).float().cpu().numpy()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        t = self._torch
        with t.inference_mode():
            ids_t = t.from_numpy(np.asarray(ids, np.int64)).to(self.device)
            return self.embed_table(ids_t).float().cpu().numpy()

    def empty_cache(self, batch: int):
        return self._empty_past(batch)

    def select_rows(self, cache, rows: np.ndarray):
        idx = self._torch.from_numpy(np.asarray(rows, np.int64)).to(self.device)
        return [c.index_select(0, idx) for c in cache]

    def forward(self, embeds, attention_mask, position_ids, logits_index, cache):
        t = self._torch
        with t.inference_mode():
            args = [
                self._tensor(embeds, self.dtype),
                *(self._tensor(a, t.int64) for a in (attention_mask, position_ids, logits_index)),
            ]
            out = self.step(*args, *cache)
        return out[0].float().cpu().numpy(), list(out[1:])

    def forward_shared(self, embeds, attention_mask, position_ids, logits_index, prefix, cache):
        t = self._torch
        with t.inference_mode():
            b, steps = np.asarray(embeds).shape[:2]
            if not isinstance(cache, CascadeCache):  # the first pass: lay the prefix into the buffers
                cache = self._new_cache(prefix, b, steps)
            past = cache.used
            if past + steps > cache.cap:
                cache = self._grow(cache, past + steps)
            inputs = (
                self._tensor(embeds, self.dtype),
                self._tensor(attention_mask, t.int64),
                self._tensor(position_ids, t.int64),
                self._tensor(logits_index, t.int64),
            )
            logits = self._cascade_pass(cache, inputs, past, steps)
            cache.used = past + steps
        return logits.float().cpu().numpy(), cache

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "cuda_graphs": self.cuda_graphs, "torch": self._torch.__version__}  # fmt: skip

    # -- the cascade buffers -----------------------------------------------------------
    def _tensor(self, a, dtype):
        return self._torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype)

    def _new_cache(self, prefix, batch: int, steps: int) -> CascadeCache:
        n = prefix[0].shape[0]
        if batch % n:
            raise ValueError(f"{batch} rows do not lay out over {n} crops")
        r, lp = batch // n, prefix[0].shape[2]
        cap = max(self.row_capacity, steps)
        keys, values = [], []
        for i in range(0, len(prefix), 2):
            for src, out in ((prefix[i], keys), (prefix[i + 1], values)):
                buf = self._torch.zeros(
                    n, self.kv_heads, lp + r * cap, self.head_dim, dtype=self.dtype, device=self.device
                )
                buf[:, :, :lp] = src.to(self.dtype)
                out.append(buf)
        return CascadeCache(keys, values, n, r, lp, cap)

    def _grow(self, cache: CascadeCache, need: int) -> CascadeCache:
        t, lp, r = self._torch, cache.prefix_len, cache.rows_per_crop
        cap = max(need, 2 * cache.cap)

        def regrid(buf):
            n, kv, _, d = buf.shape
            out = t.zeros(n, kv, lp + r * cap, d, dtype=buf.dtype, device=buf.device)
            out[:, :, :lp] = buf[:, :, :lp]
            out[:, :, lp:].view(n, kv, r, cap, d)[:, :, :, : cache.cap] = buf[:, :, lp:].view(n, kv, r, cache.cap, d)
            return out

        return CascadeCache(
            [regrid(k) for k in cache.keys], [regrid(v) for v in cache.values], cache.crops, r, lp, cap, cache.used
        )

    def _mask(self, cache: CascadeCache, own_mask, past: int, steps: int):
        """[N, 1, R*T, Lp + R*cap] bool: the prefix for everyone; row r's own slots up to the
        query (causal) where its tokens are real; no other row's slots."""
        t = self._torch
        n, r, lp, cap = cache.crops, cache.rows_per_crop, cache.prefix_len, cache.cap
        own = own_mask.view(n, r, past + steps).bool()  # the rows' own tokens so far
        slots = t.zeros(n, r, cap, dtype=t.bool, device=self.device)
        slots[:, :, : past + steps] = own
        q_pos = past + t.arange(steps, device=self.device)
        causal = t.arange(cap, device=self.device)[None, :] <= q_pos[:, None]  # [T, cap]
        row_block = slots[:, :, None, :] & causal[None, None]  # [N, R, T, cap]
        eye = t.eye(r, dtype=t.bool, device=self.device)  # query row -> key row
        rows_part = (row_block[:, :, :, None, :] & eye[None, :, None, :, None]).reshape(n, r * steps, r * cap)
        prefix_part = t.ones(n, r * steps, lp, dtype=t.bool, device=self.device)
        return t.cat([prefix_part, rows_part], dim=2)[:, None]

    def _cascade_pass(self, cache: CascadeCache, inputs, past: int, steps: int):
        key = (cache.crops, cache.rows_per_crop, steps, past, cache.cap)
        if not self.cuda_graphs:
            return self._layers(cache, *inputs, past, steps)
        graph = cache.graphs.get(key)
        if graph is None:  # capture once per pass shape; replays copy the inputs in
            t = self._torch
            static = [x.clone() for x in inputs]
            stream = t.cuda.Stream()
            stream.wait_stream(t.cuda.current_stream())
            with t.cuda.stream(stream):  # warm-up outside the graph, as CUDA graph capture requires
                self._layers(cache, *static, past, steps)
            t.cuda.current_stream().wait_stream(stream)
            g = t.cuda.CUDAGraph()
            with t.cuda.graph(g):
                out = self._layers(cache, *static, past, steps)
            graph = cache.graphs[key] = (g, static, out)
        g, static, out = graph
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        g.replay()
        return out.clone()

    def _cascade_layers(self, cache: CascadeCache, embeds, own_mask, position_ids, logits_index, past: int, steps: int):
        t = self._torch
        model = self.llm.model
        n, r, lp, cap = cache.crops, cache.rows_per_crop, cache.prefix_len, cache.cap
        b = n * r
        mask = self._mask(cache, own_mask, past, steps)
        cos, sin = model.rotary_emb(embeds, position_ids)
        hidden = embeds
        # where this pass's tokens go in the crop buffers: row j's slots past..past+T
        slot = lp + t.arange(r, device=self.device)[:, None] * cap + past + t.arange(steps, device=self.device)[None, :]
        slot = slot.reshape(-1)  # [R*T]
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(b, steps, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            # [B, kv, T, d] -> the crop's buffer [N, kv, R*T, d] at the rows' slots (in place)
            for buf, new in ((cache.keys[i], k), (cache.values[i], v)):
                crop_major = new.reshape(n, r, self.kv_heads, steps, self.head_dim).permute(0, 2, 1, 3, 4)
                buf.index_copy_(2, slot, crop_major.reshape(n, self.kv_heads, r * steps, self.head_dim))
            q_crop = q.reshape(n, r, self.heads, steps, self.head_dim).permute(0, 2, 1, 3, 4)
            q_crop = q_crop.reshape(n, self.heads, r * steps, self.head_dim)
            out = t.nn.functional.scaled_dot_product_attention(
                q_crop, cache.keys[i], cache.values[i], attn_mask=mask, scale=attn.scaling,
                enable_gqa=self.heads != self.kv_heads,
            )  # fmt: skip
            out = out.reshape(n, self.heads, r, steps, self.head_dim).permute(0, 2, 3, 1, 4)
            hidden = hidden + attn.o_proj(out.reshape(b, steps, self.heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = model.norm(hidden)
        index = logits_index[:, :, None].expand(-1, -1, hidden.shape[-1])
        return self.llm.lm_head(t.gather(hidden, 1, index))
