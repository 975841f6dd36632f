"""PEFT experts, batched: N adapters of one kind whose parameters are stacked over a leading
adapter axis (`[N, r, H]` …), not N separate modules. Up-projections start at zero, so a fresh
adapter adds exactly nothing.

Kinds (DESIGN "The method"):
- lora:       P(h) = (alpha / r) · B A h
- bottleneck: P(h) = W_up · SiLU(W_down h)
- gated:      P(h) = W_d (act(W_g h) ⊙ W_u h), the expert's own SwiGLU form at intermediate size r

Also `LoraLinear`, LoRA on one frozen nn.Linear (attention q/k/v/o). MoETune keeps its own small
LoRA rather than wrapping the model with peft: every strategy's parameters then live in one flat
state dict (one adapter file, one optimizer view), and per-expert LoRA is batched, which peft's
per-module LoRA is not.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model.grouped import grouped_mm

KINDS = ("lora", "bottleneck", "gated")


class AdapterBank(nn.Module):
    """N adapters of one kind mapping `d_in` to `d_out`, stored batched over the adapter axis."""

    def __init__(self, kind: str, num: int, d_in: int, d_out: int, rank: int, alpha: float = 16.0,
                 dropout: float = 0.0, activation: str = "silu", glu=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"adapter.kind: {kind!r} is not one of {', '.join(KINDS)}.")
        self.kind, self.num, self.d_in, self.d_out, self.rank = kind, num, d_in, d_out, rank
        self.scale = alpha / rank if kind == "lora" else 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.act = _activation(activation if kind == "gated" else "silu")
        #: gated: the expert's own gated activation (gate, up) -> hidden when it is not act(gate)·up (gpt-oss)
        self.glu = glu if kind == "gated" else None
        down = torch.empty(num, rank, d_in)
        for i in range(num):  # kaiming-uniform per adapter, as nn.Linear (and peft's LoRA A) do
            nn.init.kaiming_uniform_(down[i], a=math.sqrt(5))
        self.down = nn.Parameter(down)  # lora A / bottleneck W_down / gated W_g
        if kind == "gated":
            up_in = torch.empty(num, rank, d_in)
            for i in range(num):
                nn.init.kaiming_uniform_(up_in[i], a=math.sqrt(5))
            self.gate_up = nn.Parameter(up_in)  # gated W_u
        self.up = nn.Parameter(torch.zeros(num, d_out, rank))  # lora B / W_up / W_d: zero init
        #: adapters used by a grad-enabled forward since the optimizer's last step (engine.training.optim.SparseAdamW)
        self.touched: set[int] = set()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, num={self.num}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}"

    def hidden(self, h: torch.Tensor, idx: int | None = None) -> torch.Tensor:
        """The rank-r inner activation: for adapter `idx` ([T, r]) or all adapters ([T, N, r])."""
        h = self.dropout(h)
        if idx is None:
            z = torch.einsum("th,nrh->tnr", h, self.down.to(h.dtype))
        else:
            z = h @ self.down[idx].to(h.dtype).T
        if self.kind == "lora":
            return z
        if self.kind == "bottleneck":
            return self.act(z)
        if idx is None:
            u = torch.einsum("th,nrh->tnr", h, self.gate_up.to(h.dtype))
        else:
            u = h @ self.gate_up[idx].to(h.dtype).T
        return self._gated(z, u)

    def _gated(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.act(z) * u if self.glu is None else self.glu(z, u)

    def forward_one(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """Adapter `idx` on tokens h [T, d_in] -> [T, d_out]."""
        if torch.is_grad_enabled():
            self.touched.add(idx)
        return (self.hidden(h, idx) @ self.up[idx].to(h.dtype).T) * self.scale

    def forward_grouped(self, h: torch.Tensor, idx: Sequence[int], offs: torch.Tensor,
                        counts: Sequence[int]) -> torch.Tensor:
        """Adapter `idx[g]` on the g-th group of rows of h [N, d_in] (`counts` rows each, ends `offs`) -> [N, d_out],
        as `forward_one` per group, in grouped matmuls (engine.model.grouped)."""
        if torch.is_grad_enabled():
            self.touched.update(idx)
        sel = None if list(idx) == list(range(self.num)) else torch.tensor(list(idx), device=self.down.device)

        def take(p: torch.Tensor) -> torch.Tensor:  # [G, out, in] of the groups' adapters, as [G, in, out]
            return (p if sel is None else p.index_select(0, sel)).to(h.dtype).transpose(1, 2)

        h = self.dropout(h)
        z = grouped_mm(h, take(self.down), offs, counts)
        if self.kind == "bottleneck":
            z = self.act(z)
        elif self.kind == "gated":
            z = self._gated(z, grouped_mm(h, take(self.gate_up), offs, counts))
        return grouped_mm(z, take(self.up), offs, counts) * self.scale

    def forward_all(self, h: torch.Tensor) -> torch.Tensor:
        """Every adapter on every token: h [T, d_in] -> [T, N, d_out]."""
        if torch.is_grad_enabled():
            self.touched.update(range(self.num))
        return torch.einsum("tnr,nor->tno", self.hidden(h), self.up.to(h.dtype)) * self.scale

    def num_params(self) -> int:
        """Trainable parameters of the bank."""
        return sum(p.numel() for p in self.parameters())

    def pairs_with(self, second: "AdapterBank") -> bool:
        """Whether `forward_pair_grouped` applies: two LoRA banks with the same input size and no dropout."""
        return self.kind == second.kind == "lora" and self.d_in == second.d_in \
            and isinstance(self.dropout, nn.Identity) and isinstance(second.dropout, nn.Identity)

    def forward_pair_grouped(self, second: "AdapterBank", h: torch.Tensor, idx: Sequence[int],
                             offs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """`[self(h) | second(h)]` per group for two LoRA banks on the same input (an expert's gate and up LoRA):
        their A stacked and their B block-diagonal, so two grouped matmuls instead of four (the same math as two
        `forward_grouped` calls). Both banks must be `lora` without dropout (`pairs_with`)."""
        first = self
        if torch.is_grad_enabled():
            first.touched.update(idx)
            second.touched.update(idx)
        sel = None if list(idx) == list(range(first.num)) else torch.tensor(list(idx), device=first.down.device)

        def take(p: torch.Tensor) -> torch.Tensor:
            return p if sel is None else p.index_select(0, sel)

        a = torch.cat([take(first.down), take(second.down)], dim=1).to(h.dtype)  # [G, 2r, H]
        z = grouped_mm(h, a.transpose(1, 2), offs, counts)  # [N, 2r]
        b1, b2 = take(first.up) * first.scale, take(second.up) * second.scale  # [G, out, r] each
        (g, o1, r1), (o2, r2) = b1.shape, b2.shape[1:]
        b = b1.new_zeros(g, o1 + o2, r1 + r2)
        b[:, :o1, :r1] = b1
        b[:, o1:, r1:] = b2
        return grouped_mm(z, b.to(h.dtype).transpose(1, 2), offs, counts)


class LoraLinear(nn.Module):
    """A frozen nn.Linear plus a LoRA update (alpha / r) · B A x, B zero at init."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora = AdapterBank("lora", 1, base.in_features, base.out_features, rank, alpha, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        delta = self.lora.forward_one(x.reshape(-1, shape[-1]), 0)
        return self.base(x) + delta.reshape(*shape[:-1], -1).to(x.dtype)

    @property
    def weight(self):  # code that inspects `.weight` (dtype checks in transformers) still works
        return self.base.weight


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]
