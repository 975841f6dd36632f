"""AdamW that leaves untouched expert adapters alone (DESIGN "Memory": adapters of experts that no
token reached get no gradient and no optimizer update).

Parameters stacked over an adapter axis (`AdapterBank` tensors `[N, ...]` with N > 1) are updated
row by row: only the rows of adapters that were used in a grad-enabled forward since the last step.
An untouched row keeps its value, its two moments and its step count bit for bit — plain AdamW would
decay its moments, apply weight decay and advance the bias correction even though its gradient is
zero. Each row has its own step count, so a row routed again later continues with the bias
correction of the updates it actually received. Every other parameter is updated exactly as
`torch.optim.AdamW` (single-tensor path) does.

Which rows were used comes from the bank (`AdapterBank.touched`, filled by `forward_one` /
`forward_all` while autograd is on); a sparse parameter given without a bank uses the rows whose
gradient is not all zero.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import torch
from torch import nn

from ..adapters.banks import AdapterBank


def sparse_params_of(model: nn.Module) -> dict[nn.Parameter, AdapterBank]:
    """The trainable parameters of every AdapterBank with more than one adapter, mapped to their bank."""
    out: dict[nn.Parameter, AdapterBank] = {}
    for module in model.modules():
        if isinstance(module, AdapterBank) and (module.num > 1 or getattr(module, "moetune_expert_shard", False)):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    out[p] = module
    return out


class SparseAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with row-sparse updates for parameters stacked over adapters.

    `sparse_params` maps each row-stacked parameter (leading axis = adapter) to the AdapterBank that
    records which rows were used (or to None: rows with a non-zero gradient count as used); build it
    with `sparse_params_of(model)`. It must be given again, the same way, when a state dict is loaded.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2,
                 sparse_params: Mapping[nn.Parameter, AdapterBank | None] | Iterable[nn.Parameter] | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"SparseAdamW: invalid hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}.")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if sparse_params is None:
            sparse_params = {}
        if not isinstance(sparse_params, Mapping):
            sparse_params = {p: None for p in sparse_params}
        self._banks: dict[int, AdapterBank | None] = {id(p): b for p, b in sparse_params.items()}
        known = {id(p) for g in self.param_groups for p in g["params"]}
        stray = [i for i in self._banks if i not in known]
        if stray:
            raise ValueError(f"SparseAdamW: {len(stray)} sparse_params are not among the optimized params.")

    def is_sparse(self, p: torch.Tensor) -> bool:
        """Whether `p` is updated row by row."""
        return id(p) in self._banks

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; dense params as AdamW, sparse params only on their used rows."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        banks: list[AdapterBank] = []
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._banks:
                    bank = self._banks[id(p)]
                    if bank is not None:
                        banks.append(bank)
                    if p.grad is not None:
                        self._sparse_update(p, group, bank)
                elif p.grad is not None:
                    self._dense_update(p, group)
        for bank in banks:  # rows used in this step have been consumed
            bank.touched.clear()
        return loss

    # ---- updates ------------------------------------------------------------------------------
    def _state(self, p: torch.Tensor, sparse: bool) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(p.shape[0] if sparse else (), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _dense_update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("SparseAdamW does not take torch sparse gradients.")
        state = self._state(p, sparse=False)
        state["step"] += 1
        _adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], float(state["step"].item()), group)

    def _sparse_update(self, p: torch.Tensor, group: dict, bank: AdapterBank | None) -> None:
        grad = p.grad
        if bank is not None:
            rows = sorted(r for r in bank.touched if 0 <= r < p.shape[0])
        else:
            rows = torch.nonzero(grad.reshape(grad.shape[0], -1).ne(0).any(dim=1)).flatten().tolist()
        if not rows:
            return
        state = self._state(p, sparse=True)
        steps = state["step"]
        idx = torch.tensor(rows, dtype=torch.long)
        steps[idx] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        by_step: dict[float, list[int]] = defaultdict(list)
        for r, s in zip(rows, steps[idx].tolist()):  # one read of the step counts, not one per row
            by_step[float(s)].append(r)
        if len(rows) == p.shape[0] and len(by_step) == 1:  # every row, one step count: in place, as AdamW
            _adamw(p, grad, m, v, next(iter(by_step)), group)
            return
        for step, rs in by_step.items():
            i = torch.tensor(rs, dtype=torch.long, device=p.device)
            p_r, m_r, v_r = p.index_select(0, i), m.index_select(0, i), v.index_select(0, i)
            _adamw(p_r, grad.index_select(0, i), m_r, v_r, step, group)
            p.index_copy_(0, i, p_r)
            m.index_copy_(0, i, m_r)
            v.index_copy_(0, i, v_r)


def _adamw(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           step: float, group: dict) -> None:
    """torch.optim.AdamW's single-tensor update, op for op (so dense results are bit-identical)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if wd != 0:
        p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
