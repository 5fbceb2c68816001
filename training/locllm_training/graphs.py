"""The two graphs LocLLM is served as, in torch: the vision tower and one decoder step.

Both the exporter (ONNX, TensorRT) and the torch reference backend run exactly these
modules, so an exported graph and the oracle it is checked against share one definition.
"""

from __future__ import annotations

import torch
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


def empty_past(llm_config, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
    head_dim = getattr(llm_config, "head_dim", None) or llm_config.hidden_size // llm_config.num_attention_heads
    kv_heads = llm_config.num_key_value_heads or llm_config.num_attention_heads
    shape = (batch, kv_heads, 0, head_dim)
    return [torch.zeros(shape, dtype=dtype) for _ in range(2 * llm_config.num_hidden_layers)]
