"""The adapters that sit beside an MoE block (shared, dense, routed) and the taps that read the
MoE's own router (statistics, its balance loss: engine.adapters.balance). The embedded strategy lives in the expert bank
(`engine.model.expert_bank`), because it follows the MoE's own top-k inside the expert computation."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .balance import BalanceTerm
from .banks import AdapterBank
from ..model.grouped import group_offsets, sort_by_group


class ParallelAdapters(nn.Module):
    """`shared` (one adapter) and `dense` (N adapters, all on, summed) beside the MoE block."""

    def __init__(self, bank: AdapterBank):
        super().__init__()
        self.bank = bank

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.bank.num == 1:
            return self.bank.forward_one(h, 0)
        return self.bank.forward_all(h).sum(dim=1)


class RoutedAdapters(nn.Module):
    """`routed`: N adapters with their own learned router; each token uses its top-k adapters,
    weighted by the router's own softmax probabilities (renormalised over the top-k if asked)."""

    def __init__(self, bank: AdapterBank, top_k: int, renormalize: bool = True, balance: BalanceTerm | None = None,
                 router_std: float | None = None):
        super().__init__()
        self.bank, self.top_k, self.renormalize, self.balance = bank, top_k, renormalize, balance
        self.router = nn.Linear(bank.d_in, bank.num, bias=False)
        nn.init.normal_(self.router.weight, std=bank.d_in ** -0.5 if router_std is None else router_std)
        self.last_counts: torch.Tensor | None = None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [T, N], top-k gates [T, k] and indices [T, k]."""
        probs = F.softmax(F.linear(h, self.router.weight.to(h.dtype)).float(), dim=-1)
        gates, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return probs, gates, idx

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Σ over each token's top-k adapters of gate · P_j(h): the (token, adapter) pairs sorted by adapter once,
        then the N adapters in grouped matmuls (`AdapterBank.forward_grouped`), no loop over adapters."""
        probs, gates, idx = self.route(h)
        per_adapter, toks, slots = sort_by_group(idx, self.bank.num)
        self.last_counts = torch.tensor(per_adapter)
        if self.balance is not None:
            self.balance.record(probs, idx)
        out = torch.zeros(h.shape[0], self.bank.d_out, dtype=h.dtype, device=h.device)
        used = [j for j, n in enumerate(per_adapter) if n]
        if not used:
            return out
        counts = [per_adapter[j] for j in used]
        y = self.bank.forward_grouped(h[toks], used, group_offsets(counts, h.device), counts)
        return out.index_add_(0, toks, (y * gates[toks, slots, None].to(y.dtype)).to(out.dtype))


class RouterTap:
    """Forward hook on an MoE router: records expert counts and, when asked, its balance loss over the router's
    probabilities as `probs(logits)` computes them (softmax; a sigmoid router's normalised scores)."""

    def __init__(self, num_experts: int, balance: BalanceTerm | None = None,
                 probs: Callable[[torch.Tensor], torch.Tensor] | None = None, own_choice: bool = False):
        self.num_experts, self.balance, self.own_choice = num_experts, balance, own_choice
        #: the router's probabilities as the balance loss reads them (softmax; a sigmoid router's normalised scores)
        self.probs = probs or (lambda logits: F.softmax(logits.float(), dim=-1))
        self.last_counts: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args, output):
        logits, _, idx = output
        with torch.no_grad():  # kept on the device: read once per step (routing_stats / the step's usage), no sync here
            self.last_counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts)
        if self.balance is not None:
            probs = self.probs(logits)
            # a softmax router's counts are the top-k of its probabilities, as transformers' load_balancing_loss_func
            # takes them (ERNIE's router chooses with a bias, and its own choice differs); a sigmoid router's are its
            # own choice, as DeepSeek-V3's sequence-wise balance loss counts them
            chosen = idx if self.own_choice else torch.topk(probs, idx.shape[-1], dim=-1).indices
            self.balance.record(probs, chosen)
        return None


def add_block_output(adapters: nn.Module):
    """A forward hook that adds `adapters(block input)` to an MoE block's output."""

    def hook(module: nn.Module, args, output):
        h = args[0]
        delta = adapters(h.reshape(-1, h.shape[-1]))
        if isinstance(output, tuple):  # blocks that also return their router scores (gpt-oss)
            return (output[0] + delta.reshape(output[0].shape).to(output[0].dtype), *output[1:])
        return output + delta.reshape(output.shape).to(output.dtype)

    return hook
