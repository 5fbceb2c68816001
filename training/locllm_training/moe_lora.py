"""MoE LoRA with a zero expert (HMVLM): a frozen ``nn.Linear`` plus E LoRA experts and one
expert that adds nothing, chosen per token by a linear gate.

For a token x the gate gives p = softmax(W_g x + b_g) over E + 1 choices (the last is the
zero expert); the k most probable are kept and their weights renormalised over those k:

    y = base(x) + sum_{e in top-k, e != zero} w_e * B_e A_e dropout(x) * alpha / r

The zero expert has no parameters: a token routed only to it gets ``base(x)`` unchanged, which
is how a token keeps the pretrained behaviour. B_e start at zero (as LoRA's B), so a fresh
layer equals its base whatever the routing.

One computation serves training, the torch backend and the exported ONNX graphs
(``mixture_delta``): dense, two matmuls over the experts stacked into one LoRA of rank E*r,
with the per-token weights (zero for an expert not chosen, the zero expert's column dropped)
applied between A and B. It has no data-dependent control flow, so the TorchScript ONNX
exporter traces it (TopK, ScatterElements, two MatMuls), and the torch backend runs the very
graph it is verified against. A token routed only to the zero expert gets a delta of exact
zeros, so its output is ``base(x)`` bit for bit (x + 0.0 == x for every float but -0.0, which
a Linear layer's output is not in practice). Computing every expert for every token costs
E*r*(d_in + d_out) multiply-adds per token instead of k*r*(d_in + d_out): small beside the
base layer's d_in*d_out while E*r stays a LoRA rank.

Load balancing is Switch Transformer's auxiliary loss over all E + 1 choices, the zero
expert included (it is a choice the balance should see like any other):
``(E + 1) * sum_i f_i * P_i``, f_i the fraction of the token's k slots given to choice i,
P_i the mean gate probability of i; 1.0 when routing is uniform. Tokens are all positions
the layer sees, padding included (the layer is not told the attention mask).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from locllm_sdk.errors import ArgumentError
from torch import nn


@dataclass
class MoeLoraSettings:
    experts: int = 4  # LoRA experts (the zero expert not counted)
    top_k: int = 2
    zero_expert: bool = True
    balance_weight: float = 0.01  # weight of the load-balancing loss in the training loss

    def __post_init__(self):
        choices = self.experts + int(self.zero_expert)
        if self.experts < 1:
            raise ArgumentError(f"MoE LoRA needs at least one expert, got experts={self.experts}")
        if not 1 <= self.top_k <= choices:
            raise ArgumentError(f"top_k must be in 1..{choices} (experts + zero expert), got {self.top_k}")
        if self.balance_weight < 0:
            raise ArgumentError(f"balance_weight must be >= 0, got {self.balance_weight}")

    @property
    def choices(self) -> int:
        return self.experts + int(self.zero_expert)


@dataclass
class Routing:
    """One layer's routing of T tokens: gate probabilities [T, C], the chosen choices [T, k]
    and their renormalised weights [T, k] (C = E + 1 with the zero expert, index E)."""

    probs: torch.Tensor
    chosen: torch.Tensor
    weights: torch.Tensor


def route(gate_logits: torch.Tensor, top_k: int) -> Routing:
    """Softmax over the choices, top-k, weights renormalised over the chosen k."""
    probs = gate_logits.float().softmax(dim=-1)
    top, chosen = probs.topk(top_k, dim=-1)
    return Routing(probs=probs, chosen=chosen, weights=top / top.sum(dim=-1, keepdim=True))


def balance_loss(routing: Routing) -> torch.Tensor:
    """Switch Transformer's load-balancing loss, C * sum_i f_i P_i, over all C choices."""
    choices = routing.probs.shape[-1]
    slots = nn.functional.one_hot(routing.chosen, choices).float().sum(dim=-2)  # [T, C]
    fraction = slots.mean(dim=0) / routing.chosen.shape[-1]
    return choices * (fraction * routing.probs.mean(dim=0)).sum()


class MoeLoraLinear(nn.Module):
    """``base`` (frozen, kept as ``base_layer`` like peft's wrappers) plus the gated experts."""

    def __init__(self, base: nn.Linear, settings: MoeLoraSettings, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.settings = settings
        self.scaling = alpha / r
        e, d_in, d_out = settings.experts, base.in_features, base.out_features
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_experts_A = nn.Parameter(torch.empty(e, r, d_in, dtype=dtype, device=device))
        self.lora_experts_B = nn.Parameter(torch.zeros(e, d_out, r, dtype=dtype, device=device))
        for a in self.lora_experts_A:  # each A as peft initialises a LoRA A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_gate = nn.Linear(d_in, settings.choices, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_routing: Routing | None = None
        self.last_balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        tokens = x.reshape(-1, x.shape[-1])
        routing = route(self.lora_gate(tokens), self.settings.top_k)
        # kept for inspection (routing shares), off the autograd graph
        self.last_routing = Routing(routing.probs.detach(), routing.chosen, routing.weights.detach())
        self.last_balance_loss = balance_loss(routing) if self.training else None
        delta = mixture_delta(
            self.lora_dropout(tokens), routing, self.lora_experts_A, self.lora_experts_B, self.scaling
        )
        return out + delta.reshape(out.shape).to(out.dtype)


def expert_weights(routing: Routing, experts: int) -> torch.Tensor:
    """[T, E]: each token's renormalised weight of every LoRA expert, zero where not chosen
    (the zero expert, index E, is dropped: it contributes nothing)."""
    t, choices = routing.probs.shape
    dense = routing.weights.new_zeros(t, choices).scatter(1, routing.chosen, routing.weights)
    return dense[:, :experts]


def mixture_delta(
    tokens: torch.Tensor, routing: Routing, experts_a: torch.Tensor, experts_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """sum_e w_e * B_e A_e x * scaling for tokens [T, d_in], experts A [E, r, d_in] and
    B [E, d_out, r]: the experts stacked as one LoRA of rank E*r (A [E*r, d_in], B [d_out, E*r])
    with each token's expert weights repeated over the r rows of its expert between the two
    matmuls. Returns [T, d_out]."""
    e, r, d_in = experts_a.shape
    a = experts_a.reshape(e * r, d_in)
    b = experts_b.permute(1, 0, 2).reshape(experts_b.shape[1], e * r)
    weights = expert_weights(routing, e).to(tokens.dtype)  # [T, E]
    per_rank = weights[:, :, None].expand(-1, -1, r).flatten(1)  # [T, E*r], expert-major as a's rows
    return ((tokens @ a.T) * per_rank) @ b.T * scaling


def apply_moe_lora(
    module: nn.Module,
    targets: list[str],
    settings: MoeLoraSettings,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    layers: list[int] | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` named in ``targets`` (e.g. q_proj, v_proj) inside
    ``module`` by a ``MoeLoraLinear`` around it; ``layers`` limits it to those decoder blocks
    (``layers.N`` in the name). Returns the wrapped modules' names."""
    wrapped = []
    for name, child in list(module.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in targets or not isinstance(child, nn.Linear):
            continue
        if layers is not None:
            block = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if block is None or int(block.group(1)) not in layers:
                continue
        parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(parent, leaf, MoeLoraLinear(child, settings, r, alpha, dropout))
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named {targets} found to wrap with MoE LoRA")
    return wrapped


def moe_layers(module: nn.Module) -> list[MoeLoraLinear]:
    return [m for m in module.modules() if isinstance(m, MoeLoraLinear)]


def moe_parameter_count(module: nn.Module) -> int:
    """Trainable MoE-LoRA parameters (experts' A and B, gates) inside ``module``."""
    return sum(p.numel() for m in moe_layers(module) for n, p in m.named_parameters() if n.startswith("lora_"))


def moe_balance_loss(module: nn.Module) -> torch.Tensor | None:
    """Mean load-balancing loss of the MoE layers' last training forward (None if none ran)."""
    losses = [m.last_balance_loss for m in moe_layers(module) if m.last_balance_loss is not None]
    return torch.stack(losses).mean() if losses else None
