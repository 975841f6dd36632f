"""PEFT experts, batched: N adapters of one kind whose parameters are stacked over a leading
adapter axis (`[N, r, H]` …), not N separate modules. Up-projections start at zero (`kaiming`) or at
1e-6·N(0, 1) (`perft`), so a fresh adapter adds nothing, or next to nothing.

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

from ..model.grouped import grouped_mm, host_tensor_to

KINDS = ("lora", "bottleneck", "gated")
INITS = ("kaiming", "perft")
#: `perft`: the up-projections' scale (the paper's code: `torch.randn(size) * 1e-6`)
PERFT_UP_STD = 1e-6


def init_bank_(down: torch.Tensor, gate_up: torch.Tensor | None, up: torch.Tensor, init: str) -> None:
    """Initialise one bank's stacked tensors in place (`adapter.init`).

    kaiming: every down-projection (LoRA A, bottleneck W_down, gated W_g and W_u) kaiming-uniform per adapter as
        nn.Linear and PEFT's LoRA A (std 1/sqrt(3·d_in)); the up-projection (B, W_up, W_d) zero.
    perft: the official PERFT code (github liuyilun2000/PERFT, utils.py `init_trainable_parameters`), which re-draws
        every PERFT module: `lora_A` / `adapter_w1` ~ randn · sqrt(2 / size[0]) where size[0] is the Linear's out
        features = r, i.e. N(0, 2/r); `lora_B` / `adapter_w2` ~ randn · 1e-6. Where we differ: the paper has no gated
        adapter, so both of its down-projections (W_g, W_u) take the A rule and W_d the B rule; and no LoRA inside
        the experts in its PERFT code (its expert-LoRA baseline kept PEFT's default), so `inside` LoRA takes the
        same A / B rules as a parallel LoRA (the rank, not d_in, sets A's scale in both).
    """
    if init not in INITS:
        raise ValueError(f"adapter.init: {init!r} is not one of {', '.join(INITS)}.")
    rank = down.shape[1]
    with torch.no_grad():
        for t in (down, gate_up):
            if t is None:
                continue
            if init == "perft":
                t.normal_(0.0, math.sqrt(2.0 / rank))
            else:
                for i in range(t.shape[0]):  # kaiming-uniform per adapter, as nn.Linear (and peft's LoRA A) do
                    nn.init.kaiming_uniform_(t[i], a=math.sqrt(5))
        if init == "perft":
            up.normal_(0.0, PERFT_UP_STD)
        else:
            up.zero_()


class AdapterBank(nn.Module):
    """N adapters of one kind mapping `d_in` to `d_out`, stored batched over the adapter axis."""

    def __init__(self, kind: str, num: int, d_in: int, d_out: int, rank: int, alpha: float = 16.0,
                 dropout: float = 0.0, activation: str = "silu", glu=None, init: str = "kaiming"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"adapter.kind: {kind!r} is not one of {', '.join(KINDS)}.")
        self.kind, self.num, self.d_in, self.d_out, self.rank = kind, num, d_in, d_out, rank
        self.scale = alpha / rank if kind == "lora" else 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.act = _activation(activation if kind == "gated" else "silu")
        #: gated: the expert's own gated activation (gate, up) -> hidden when it is not act(gate)·up (gpt-oss)
        self.glu = glu if kind == "gated" else None
        down, up = torch.empty(num, rank, d_in), torch.empty(num, d_out, rank)
        gate_up = torch.empty(num, rank, d_in) if kind == "gated" else None
        init_bank_(down, gate_up, up, init)
        self.init = init
        self.down = nn.Parameter(down)  # lora A / bottleneck W_down / gated W_g
        if gate_up is not None:
            self.gate_up = nn.Parameter(gate_up)  # gated W_u
        self.up = nn.Parameter(up)  # lora B / W_up / W_d: zero (kaiming) or 1e-6·N(0, 1) (perft)
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
        sel = None if list(idx) == list(range(self.num)) else host_tensor_to(idx, self.down.device)

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
        sel = None if list(idx) == list(range(first.num)) else host_tensor_to(idx, first.down.device)

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
    """A frozen nn.Linear plus a LoRA update (alpha / r) · B A x, B zero at init.

    Always PEFT's default initialisation (kaiming-uniform A, zero B), whatever `adapter.init` says: the paper's code
    never puts PERFT modules on attention, and its q/v LoRA baseline (`finetune_qvlora.py`, whose call to
    `init_trainable_parameters` is commented out) trained PEFT's default init."""

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
