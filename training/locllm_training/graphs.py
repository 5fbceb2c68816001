"""The two graphs LocLLM is served as, in torch: the vision tower and one decoder step.

Both the exporter (ONNX, TensorRT) and the torch reference backend run exactly these
modules, so an exported graph and the oracle it is checked against share one definition.
"""

from __future__ import annotations

import torch
from locllm_sdk.manifest import llm_head_dim
from torch import nn
from transformers.cache_utils import DynamicCache

from .model import LocLLM


class VisionTower(nn.Module):
    """[N,3,S,S] normalised crops -> [N,P,hidden] projected image tokens."""

    def __init__(self, model: LocLLM):
        super().__init__()
        self.vision = model.vision
        self.projector = model.projector
        emb = self.vision.embeddings
        grid = model.config.image_size // model.config.patch_size
        if emb.position_embeddings.shape[1] != grid * grid + 1:
            raise ValueError(
                f"position embeddings hold {emb.position_embeddings.shape[1] - 1} patches, the model's "
                f"size needs {grid * grid}: resize them once when the checkpoint is made"
            )
        # The checkpoint's position embeddings are already at the model's size: use them as
        # they are. (HF re-interpolates whenever it is traced, a bicubic resize that is an
        # identity here but a known ONNX/TensorRT export trap.)
        emb.interpolate_pos_encoding = lambda embeddings, height, width: emb.position_embeddings

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state
        return self.projector(hidden[:, 1:, :])


class DecoderStep(nn.Module):
    """One decoder pass over a KV cache, returning logits only at the asked positions.

    Inputs: ``inputs_embeds`` [B,T,H]; ``attention_mask`` [B,past+T] (1 = attend);
    ``position_ids`` [B,T]; ``logits_index`` [B,K] positions in 0..T-1 to project to the
    vocabulary; then ``past_key_i``, ``past_value_i`` [B,kv_heads,past,head_dim] per layer.
    Outputs: ``logits`` [B,K,V] and the present keys/values [B,kv_heads,past+T,head_dim].
    The 4D additive mask is built here (causal within the step, padding from the 2D mask):
    it exports with the TorchScript exporter and lets rows carry right padding in the middle
    of their sequence.
    """

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm
        self.num_layers = llm.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_index, *past):
        past_len = past[0].shape[2]
        step = inputs_embeds.shape[1]
        total = past_len + step
        key_pos = torch.arange(total, device=inputs_embeds.device)
        query_pos = torch.arange(step, device=inputs_embeds.device) + past_len
        causal = key_pos[None, :] <= query_pos[:, None]  # [T, total]
        allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.llm.model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            cache_position=query_pos,
        )
        hidden = out.last_hidden_state
        index = logits_index[:, :, None].expand(-1, -1, hidden.shape[-1])
        logits = self.llm.lm_head(torch.gather(hidden, 1, index))
        present = []
        for layer in out.past_key_values.layers:
            present.extend((layer.keys, layer.values))
        return (logits, *present)


def head_dim_of(llm_config) -> int:
    return llm_head_dim(llm_config.hidden_size, llm_config.num_attention_heads, getattr(llm_config, "head_dim", None))


def empty_past(llm_config, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
    head_dim = head_dim_of(llm_config)
    kv_heads = llm_config.num_key_value_heads or llm_config.num_attention_heads
    shape = (batch, kv_heads, 0, head_dim)
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * llm_config.num_hidden_layers)]


class SharedPrefixStep(nn.Module):
    """A decoder pass for rows that share their crop's prefix KV without copying it.

    Cascade attention: the prefix keys/values stay one copy per crop ([N,kv_heads,Lp,d]);
    each row's own cache holds only its suffix and answer tokens. Rows are laid out crop by
    crop, R = B/N rows per crop, so a crop's queries meet its prefix in one matmul, and
    one softmax runs over [prefix scores | row scores] (computed in its two parts), the
    same function as attention over the concatenated sequence. (A row whose crop is not
    shared passes N = B, R = 1.) The per-token layers run on the real tokens only, not on
    the right padding of the step (the step part of ``attention_mask`` says which).

    Inputs: ``inputs_embeds`` [B,T,H]; ``attention_mask`` [B,past+T] over the row's own
    tokens only (the prefix is never padded); ``position_ids`` [B,T] (absolute, prefix
    included); ``logits_index`` [B,K]; then ``prefix_key_i``, ``prefix_value_i``
    [N,kv_heads,Lp,d] and ``past_key_i``, ``past_value_i`` [B,kv_heads,past,d] per layer.
    Outputs: ``logits`` [B,K,V] and the row caches [B,kv_heads,past+T,d].
    """

    def __init__(self, llm: nn.Module):
        super().__init__()
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.llm = llm
        self.rope = apply_rotary_pos_emb
        cfg = llm.config
        self.num_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = head_dim_of(cfg)

    def _to_crops(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """[B,heads,T,X] -> [N,kv_heads,R*groups*T,X]: a crop's queries as one matrix."""
        b, _, t, d = x.shape
        x = x.reshape(n, b // n, self.kv_heads, self.groups, t, d).permute(0, 2, 1, 3, 4, 5)
        return x.reshape(n, self.kv_heads, -1, d)

    def _from_crops(self, x: torch.Tensor, b: int, t: int) -> torch.Tensor:
        n, _, _, d = x.shape
        x = x.reshape(n, self.kv_heads, b // n, self.groups, t, d).permute(0, 2, 1, 3, 4, 5)
        return x.reshape(b, self.heads, t, d)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_index, *caches):
        n_layers = self.num_layers
        prefix, past = caches[: 2 * n_layers], caches[2 * n_layers :]
        b, t, width = inputs_embeds.shape
        n = prefix[0].shape[0]
        past_len = past[0].shape[2]
        key_pos = torch.arange(past_len + t, device=inputs_embeds.device)
        query_pos = torch.arange(t, device=inputs_embeds.device) + past_len
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        dtype = inputs_embeds.dtype
        row_bias = torch.zeros(allowed.shape, dtype=dtype, device=inputs_embeds.device)
        row_bias = row_bias.masked_fill(~allowed, torch.finfo(dtype).min)
        # Packed tokens: rows are right-padded to the longest suffix (~16% pads for COCO-17),
        # and the per-token layers (projections, MLP, norms) run on the real tokens only.
        # ``slot`` maps each padded position to its packed token, pads to an extra zero row.
        real = attention_mask[:, past_len:].reshape(-1).bool()
        packed = torch.nonzero(real).squeeze(1)
        slot = torch.where(real, torch.cumsum(real.long(), 0) - 1, packed.shape[0])
        model = self.llm.model
        hidden = inputs_embeds.reshape(b * t, width).index_select(0, packed)
        cos, sin = model.rotary_emb(inputs_embeds, position_ids)
        present = []
        for i, layer in enumerate(model.layers[:n_layers]):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = _unpack(attn.q_proj(x), slot).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = _unpack(attn.k_proj(x), slot).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = _unpack(attn.v_proj(x), slot).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present.extend((k, v))
            pk, pv = prefix[2 * i], prefix[2 * i + 1]
            # softmax over [prefix keys | row keys] in two parts: the big prefix scores stay
            # in crop layout, and no [.., prefix+row] tensor is ever concatenated or sliced.
            q = q * attn.scaling
            s_prefix = torch.matmul(self._to_crops(q, n), pk.transpose(2, 3))  # [N,kv,R*g*T,Lp]
            k_rows = k[:, :, None].expand(-1, -1, self.groups, -1, -1).reshape(b, self.heads, -1, self.head_dim)
            v_rows = v[:, :, None].expand(-1, -1, self.groups, -1, -1).reshape(b, self.heads, -1, self.head_dim)
            s_rows = torch.matmul(q, k_rows.transpose(2, 3)) + row_bias  # [B,H,T,Lr]
            peak = torch.maximum(self._from_crops(s_prefix.amax(-1, keepdim=True), b, t), s_rows.amax(-1, keepdim=True))
            e_prefix = torch.exp(s_prefix - self._to_crops(peak, n))
            e_rows = torch.exp(s_rows - peak)
            total = self._from_crops(e_prefix.sum(-1, keepdim=True), b, t) + e_rows.sum(-1, keepdim=True)
            out = self._from_crops(torch.matmul(e_prefix, pv), b, t) + torch.matmul(e_rows, v_rows)
            out = out / total
            out = out.transpose(1, 2).reshape(b * t, self.heads * self.head_dim).index_select(0, packed)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = _unpack(model.norm(hidden), slot).view(b, t, width)
        index = logits_index[:, :, None].expand(-1, -1, width)
        logits = self.llm.lm_head(torch.gather(hidden, 1, index))
        return (logits, *present)


def _unpack(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Packed tokens [n,X] -> padded positions [B*T,X], zeros at the pads."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, slot)
