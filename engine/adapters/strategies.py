"""The adapters that sit beside an MoE block (shared, dense, routed) and the taps that read the
MoE's own router (statistics, its balance loss). The embedded strategy lives in the expert bank
(`engine.model.expert_bank`), because it follows the MoE's own top-k inside the expert computation."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .banks import AdapterBank
from ..model.grouped import group_offsets, sort_by_group


#: data parallel (engine.training.distributed.install_balance_stats): (slot counts [num], tokens) -> the same summed over
#: the ranks; None in a single process
GLOBAL_COUNTS: Callable[[torch.Tensor, int], tuple[torch.Tensor, float]] | None = None


def balance_loss(probs: torch.Tensor, top_idx: torch.Tensor, num: int) -> torch.Tensor:
    """Switch-style load balance: num/k · Σ_j f_j · P_j (f_j: share of routed slots, P_j: mean prob).

    Normalised so that a perfectly balanced router scores 1.0 whatever k is. Under data parallelism f_j
    and the token count are the job's (GLOBAL_COUNTS), so the ranks' losses add up to one process's.
    """
    k = top_idx.shape[-1]
    counts = torch.bincount(top_idx.reshape(-1), minlength=num).to(probs.dtype)
    if GLOBAL_COUNTS is None:
        return num * (counts / top_idx.numel() * probs.float().mean(dim=0)).sum()
    counts, tokens = GLOBAL_COUNTS(counts, probs.shape[0])
    return num * (counts.to(probs.dtype) / (tokens * k) * probs.float().sum(dim=0)).sum() / tokens


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

    def __init__(self, bank: AdapterBank, top_k: int, renormalize: bool = True, balance_coef: float = 0.0):
        super().__init__()
        self.bank, self.top_k, self.renormalize, self.balance_coef = bank, top_k, renormalize, balance_coef
        self.router = nn.Linear(bank.d_in, bank.num, bias=False)
        nn.init.normal_(self.router.weight, std=bank.d_in ** -0.5)
        self.aux_losses: list[torch.Tensor] = []
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
        if self.balance_coef > 0 and torch.is_grad_enabled():
            self.aux_losses.append(self.balance_coef * balance_loss(probs, idx, self.bank.num))
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

    def __init__(self, num_experts: int, balance_coef: float = 0.0,
                 probs: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.num_experts, self.balance_coef = num_experts, balance_coef
        self.probs = probs or (lambda logits: F.softmax(logits.float(), dim=-1))
        self.aux_losses: list[torch.Tensor] = []
        self.last_counts: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args, output):
        logits, _, idx = output
        with torch.no_grad():
            self.last_counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts).cpu()
        if self.balance_coef > 0 and torch.is_grad_enabled():
            probs = self.probs(logits)
            self.aux_losses.append(self.balance_coef * balance_loss(probs, idx, self.num_experts))
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
