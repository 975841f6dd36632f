"""Load-balancing losses on transformers' scale: `routing.balance_loss` (the routed strategy's own routers) and
`routing.base_balance_loss` (the MoE's frozen routers) mean what `router_aux_loss_coef` means in transformers.

One loss per forward over all MoE layers' routers of a group, as `load_balancing_loss_func` computes it over the
concatenated router logits (pads left out through the attention mask):

    loss = num · Σ_e (C_e / (L·T)) · (S_e / (L·T))

with C_e the top-k slots that chose e and S_e the sum of e's softmax probability, both over the L layers' T real
tokens; a balanced router scores k, and coef · loss is added to the language-model loss. The loss is linear in the
probabilities once the counts are known, so every layer contributes its own term `num · C · S_l / (L·T)²` with C
the counts of all layers: the layer-major step recomputes one layer at a time with the counts of the forward sweep.

Data parallel (engine.training.distributed.install_balance_stats): C and L·T are summed over the ranks (they carry
no gradient); S stays local, so the ranks' losses and gradients add up to one process's at their global batch.

Scales (the run's checkpoints record which one, `trainer_state.json: balance_scale`):
- 2, `transformers` (since issue 22): the above.
- 1, `per-layer` (runs started before): per layer num/k · Σ_e f_e P_e, normalised to 1 when balanced, over all
  tokens (pads included), summed over the layers — about L/k times stronger at the same coefficient. Such a run
  resumes on the scale it started with.
"""

from __future__ import annotations

from typing import Callable

import torch

#: data parallel: a float64 tensor summed over the ranks (no gradient); None in a single process
GLOBAL_SUM: Callable[[torch.Tensor], torch.Tensor] | None = None

SCALES = {1: "per-layer", 2: "transformers"}
#: the scale new runs train with
CURRENT_SCALE = 2


def balance_loss(probs: torch.Tensor, top_idx: torch.Tensor, num: int) -> torch.Tensor:
    """transformers' load-balancing loss of one router's probabilities [T, num] and top-k choices [T, k] (all
    tokens): num · Σ_e f_e P_e with f_e the share of tokens whose top-k holds e; k when balanced."""
    counts = torch.bincount(top_idx.reshape(-1), minlength=num).to(probs.dtype)
    tokens = probs.shape[0]
    return num * (counts / tokens * probs.float().sum(dim=0) / tokens).sum()


def _global(t: torch.Tensor) -> torch.Tensor:
    return t if GLOBAL_SUM is None else GLOBAL_SUM(t)


class BalanceTerm:
    """One group's balance loss (the base routers, or the routed strategy's): the routers record, `loss()` adds up.

    Routers record while `armed` (set by the training step, with the micro-batch's token mask) or whenever a
    forward builds a graph; `loss()` returns coef · the group's loss over the records and clears them.
    """

    def __init__(self, num: int, top_k: int, coef: float, scale: int = CURRENT_SCALE):
        self.num, self.top_k, self.coef, self.scale = num, top_k, coef, scale
        self.records: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # counts, prob sums, tokens
        self.mask: torch.Tensor | None = None  # [tokens] bool of the current micro-batch, pads False
        self.totals: torch.Tensor | None = None  # fixed [C..., L·T] (global) for a layer-major recompute
        self.armed = False

    def clear(self) -> None:
        self.records.clear()

    def record(self, probs: torch.Tensor, idx: torch.Tensor) -> None:
        """One router call: probabilities [T, num] (fp32, with their graph) and top-k indices [T, k]."""
        grad = torch.is_grad_enabled()  # (a frozen router before any adapter: no graph, yet part of the value)
        if not (self.armed or grad):
            return
        mask = self.mask if self.scale == CURRENT_SCALE else None  # the per-layer scale counted pads too
        # no host sync here (this runs per router call): pads are weighted out, not indexed out, and the token
        # count stays a device tensor (tests/test_gpu_readiness_hot.py counts the syncs)
        if mask is not None:
            if mask.numel() != probs.shape[0]:
                raise RuntimeError(f"balance loss: the router saw {probs.shape[0]} tokens but the micro-batch's "
                                   f"attention mask has {mask.numel()}.")
            keep = mask.to(probs.device, torch.float64)
            probs = probs * keep.to(probs.dtype).unsqueeze(1)
            counts = torch.bincount(idx.reshape(-1), weights=keep.unsqueeze(1).expand(idx.shape).reshape(-1),
                                    minlength=self.num).detach()
            tokens = keep.sum().reshape(1)
        else:
            counts = torch.bincount(idx.reshape(-1), minlength=self.num).to(torch.float64).detach()
            tokens = torch.full((1,), float(probs.shape[0]), dtype=torch.float64, device=counts.device)
        self.records.append((counts, probs.float().sum(dim=0) if grad else None, tokens))

    def counted(self) -> torch.Tensor | None:
        """[C..., T] of the records so far (this rank's), then cleared: a layer-major forward sweep's counts."""
        if not self.records:
            return None
        out = sum(torch.cat([c, t]) for c, _, t in self.records)
        self.records.clear()
        return out

    def loss(self) -> torch.Tensor | None:
        """coef · the group's loss over the records with a graph (None when there is none); clears the records."""
        records, self.records = self.records, []
        live = [(c, s, t) for c, s, t in records if s is not None]
        if not live or self.coef <= 0:
            return None
        if self.scale == CURRENT_SCALE:
            totals = self.totals if self.totals is not None else _global(
                sum(torch.cat([c, t]) for c, _, t in records))
            counts, lt = totals[:-1], totals[-1].clamp_min(1.0)  # stays on the device: no sync
            total = sum((counts.to(s.device, s.dtype) * s).sum() for _, s, _ in live) * (self.num / lt.to(
                live[0][1].device, live[0][1].dtype) ** 2)
        else:  # per layer, each layer's counts and tokens global, one all-reduce for all of them
            stacked = _global(torch.stack([torch.cat([c, t]) for c, _, t in live]))
            total = 0.0
            for (_, s, _), row in zip(live, stacked):
                counts, tokens = row[:-1], row[-1].clamp_min(1.0).to(s.device, s.dtype)
                total = total + self.num * (counts.to(s.device, s.dtype) / (tokens * self.top_k) * s).sum() / tokens
        return self.coef * total


def global_totals(totals: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Per micro-batch [C..., T] summed over the ranks in one all-reduce (layer-major: after the forward sweep)."""
    present = [t for t in totals if t is not None]
    if GLOBAL_SUM is None or not present:
        return totals
    summed = iter(GLOBAL_SUM(torch.stack(present)))
    return [next(summed) if t is not None else None for t in totals]
