"""The frozen expert bank: replaces a family's experts module, computes only the (token, expert)
pairs the router chose, grouped by expert, and runs the `embedded` adapters inside.

Expert weights come from a store (`engine.quant`): `store.weights(e, device, dtype)` gives the
dequantised `gate_up [2I, H]` and `down [H, I]` of expert e on the compute device. Dequantised
weights are never kept for backward: `FrozenLinear` saves nothing of the weight and fetches it
again from the store when the gradient of its input is needed.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdapterBank


class ExpertStore(Protocol):
    """Where frozen expert weights live (resident bf16, NF4, offloaded...)."""

    num_experts: int

    def weights(self, expert: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I] of one expert, dequantised on `device`."""
        ...


class _ExpertWeights:
    """One expert's weights fetched at most once per pass; dropped after the last use."""

    def __init__(self, store: ExpertStore, expert: int, device, dtype):
        self.store, self.expert, self.device, self.dtype = store, expert, device, dtype
        self._w: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, which: int) -> torch.Tensor:
        if self._w is None:
            self._w = self.store.weights(self.expert, self.device, self.dtype)
        return self._w[which]

    def release(self) -> None:
        self._w = None


class FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ for a frozen W that is re-fetched in backward instead of being saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: _ExpertWeights, which: int, release_after_backward: bool):
        ctx.weights, ctx.which, ctx.release = weights, which, release_after_backward
        return F.linear(x, weights.get(which))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.weights.get(ctx.which)
        grad_x = grad @ w.to(grad.dtype)
        if ctx.release:
            ctx.weights.release()
        return grad_x, None, None, None


class ExpertBank(nn.Module):
    """Experts of one MoE layer, computed sparsely from a weight store, with optional per-expert adapters.

    `parallel`: an AdapterBank of E adapters H -> H, P_e(h) added beside expert e before gating.
    `inside`:   LoRA banks on each expert's gate, up and down projections.
    """

    def __init__(self, store: ExpertStore, activation: str, hidden_size: int, intermediate_size: int,
                 parallel: AdapterBank | None = None, inside: dict[str, AdapterBank] | None = None):
        super().__init__()
        from transformers.activations import ACT2FN

        self.store = store
        self.num_experts = store.num_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.act_fn = ACT2FN[activation]
        self.parallel = parallel
        self.inside = nn.ModuleDict(inside) if inside else None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        num_tokens = top_k_index.shape[0]
        with torch.no_grad():  # group (token, slot) pairs by expert with one sort and one device sync
            flat = top_k_index.T.reshape(-1)  # slot-major: the order transformers' eager loop adds in
            order = torch.argsort(flat, stable=True)
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            toks, slots = order % num_tokens, order // num_tokens
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            tok, pos = toks[start:start + n], slots[start:start + n]
            start += n
            y = self.expert_forward(hidden_states[tok], e)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e (plus its adapter) on the tokens routed to it: x [t, H] -> [t, H]."""
        w = _ExpertWeights(self.store, e, x.device, x.dtype)
        gate_up = FrozenLinear.apply(x, w, 0, True)
        gate, up = gate_up.chunk(2, dim=-1)
        if self.inside is not None:
            gate = gate + self.inside["gate"].forward_one(x, e)
            up = up + self.inside["up"].forward_one(x, e)
        act = self.act_fn(gate) * up
        y = FrozenLinear.apply(act, w, 1, False)
        w.release()  # forward is done with the weights; backward fetches them again
        if self.inside is not None:
            y = y + self.inside["down"].forward_one(act, e)
        if self.parallel is not None:
            y = y + self.parallel.forward_one(x, e)
        return y
