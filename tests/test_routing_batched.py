"""The routed strategy's N adapters run batched (one sort by adapter, grouped matmuls), not one call per adapter:
outputs and gradients equal the per-adapter loop it replaced, for every adapter kind, to rounding."""

from __future__ import annotations

import pytest
import torch

from engine.config import from_dict
from engine.model import load_model
from engine.adapters import attach

from .tolerance import assert_close


def _per_adapter_loop(module, h):
    """The earlier RoutedAdapters.forward: for each adapter with tokens, forward_one on its tokens."""
    _, gates, idx = module.route(h)
    counts = torch.bincount(idx.reshape(-1), minlength=module.bank.num)
    out = torch.zeros(h.shape[0], module.bank.d_out, dtype=h.dtype)
    for j in torch.nonzero(counts).flatten().tolist():
        tok, pos = torch.where(idx == j)
        y = module.bank.forward_one(h[tok], j)
        out.index_add_(0, tok, (y * gates[tok, pos, None].to(y.dtype)).to(out.dtype))
    return out


@pytest.mark.parametrize("kind", ["lora", "bottleneck", "gated"])
def test_routed_batched_equals_per_adapter_loop(kind, tiny_checkpoint, monkeypatch):
    lm = load_model(tiny_checkpoint("olmoe"))
    peft = attach(lm, from_dict({"model": {"quant": "bf16"}, "adapter": {"kind": kind, "rank": 4, "alpha": 8},
                                 "routing": {"strategy": "routed", "num_adapters": 5, "top_k": 2}}))
    module = next(iter(peft.routed.values()))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    h = torch.randn(40, lm.config.hidden_size, generator=g)
    params = list(module.parameters())

    def grads(fn):
        x = h.clone().requires_grad_(True)
        out = fn(x)
        return out, torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[1])).sum(), [x, *params])

    want, want_grads = grads(lambda x: _per_adapter_loop(module, x))
    module.bank.touched.clear()
    monkeypatch.setattr(module.bank, "forward_one", lambda *a: pytest.fail("routed ran one adapter at a time"))
    got, got_grads = grads(module)
    assert want.abs().max() > 0
    assert_close(got, want, what="routed output")
    for name, a, b in zip(["input"] + [n for n, _ in module.named_parameters()], got_grads, want_grads):
        assert_close(a, b, what=f"gradient of {name}")
    used = set(torch.nonzero(module.last_counts).flatten().tolist())
    assert module.bank.touched == used and int(module.last_counts.sum()) == 40 * 2
