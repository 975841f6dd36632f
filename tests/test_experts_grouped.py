"""The grouped expert bank (one batched dequantisation and one grouped GEMM per projection per layer) against
the per-expert loop it replaces: outputs and gradients on every family, strategy and store, in fp32, to
rounding; one batched weight fetch per pass; chunking; the store's batched dequantisation; the NF4 layout
handed to the grouped-nf4-gemm kernels."""

from __future__ import annotations

import pytest
import torch

from engine.config import from_dict
from engine.model import ExpertBank
from engine.model.grouped import group_offsets, grouped_mm
from engine.model import NF4ExpertStore, load_model
from engine.adapters import attach

from .conftest import FAMILY_NAMES

# (kind, placement) of the embedded strategy, and no adapter in the experts (every other strategy)
ADAPTERS = [("lora", "parallel"), ("bottleneck", "parallel"), ("gated", "parallel"), ("lora", "inside"),
            (None, None)]


def _close(actual: torch.Tensor, reference: torch.Tensor, what: str, ulps: float = 64) -> None:
    """Equal to rounding in fp32: a few units of eps relative to the size of the values compared."""
    bound = ulps * torch.finfo(torch.float32).eps * max(reference.detach().abs().max().item(), 1e-30)
    diff = (actual.detach().double() - reference.detach().double()).abs().max().item()
    assert diff <= bound, f"{what}: max |difference| {diff:.3e} > {bound:.3e}"


def _attached(path, kind, placement, quant):
    lm = load_model(path)
    if kind is None:
        cfg = {"model": {"quant": quant}, "routing": {"strategy": "shared"}, "adapter": {"rank": 4, "alpha": 8}}
    else:
        cfg = {"model": {"quant": quant}, "adapter": {"kind": kind, "placement": placement, "rank": 4, "alpha": 8},
               "routing": {"strategy": "embedded"}}
    peft = attach(lm, from_dict(cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random adapters everywhere (the zero-initialised ups included)
        for _, p in peft.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lm, peft


def _run(bank, block, lm, h, backend):
    """Output and gradients (input, router weights, the bank's adapters) of one backend."""
    bank.backend = backend
    h = h.detach().requires_grad_(True)
    _, weights, index = lm.family.router(block)(h)
    weights = weights.detach().requires_grad_(True)
    params = [p for p in bank.parameters() if p.requires_grad]
    out = bank(h, index, weights)
    grads = torch.autograd.grad(out.square().sum(), [h, weights, *params])
    return out, grads, index


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kind, placement", ADAPTERS)
@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_grouped_equals_per_expert_loop(family, kind, placement, quant, tiny_checkpoint):
    # hidden 128 (expert width 64): NF4 rows of whole blocks, the store's single-call dequantisation
    lm, peft = _attached(tiny_checkpoint(family, hidden=128, experts=8), kind, placement, quant)
    layer, block = next(iter(lm.family.moe_blocks(lm.model)))
    bank = block.experts
    h = torch.randn(24, lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    out_g, grads_g, index = _run(bank, block, lm, h, "torch")
    assert bank.last_backend == "torch"
    out_l, grads_l, _ = _run(bank, block, lm, h, "loop")
    assert out_g.abs().max() > 0
    _close(out_g, out_l, "output")
    names = ["input", "router weights"] + [n for n, p in bank.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads_g, grads_l):
        _close(a, b, f"gradient of {name}")
    # experts no token was routed to: their adapters get exactly zero gradient
    unrouted = sorted(set(range(bank.num_experts)) - set(index.flatten().tolist()))
    for name, g in zip(names[2:], grads_g[2:]):
        if unrouted:
            assert torch.count_nonzero(g[unrouted]) == 0, name


class _Counting:
    """A store wrapper counting batched and per-expert weight fetches."""

    def __init__(self, store, batched: bool = True):
        self.inner, self.num_experts = store, store.num_experts
        self.batched_calls: list[list[int]] = []
        self.single_calls = 0
        if batched:
            self.weights_batched = self._batched

    def _batched(self, experts, device, dtype):
        self.batched_calls.append(list(experts))
        return self.inner.weights_batched(experts, device, dtype)

    def weights(self, e, device, dtype):
        self.single_calls += 1
        return self.inner.weights(e, device, dtype)


def test_one_batched_dequantisation_per_pass_and_chunks(tiny_checkpoint, monkeypatch):
    import engine.model.expert_bank

    monkeypatch.setattr(engine.model.expert_bank, "GROUPS_PER_LAYER", 1)  # the whole layer in one group (bytes permitting)
    lm, peft = _attached(tiny_checkpoint("olmoe", hidden=128, experts=8), "lora", "inside", "nf4")
    _, block = next(iter(lm.family.moe_blocks(lm.model)))
    bank = block.experts
    h = torch.randn(40, lm.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads, index = _run(bank, block, lm, h, "loop")
    touched = sorted(set(index.flatten().tolist()))
    store = bank.store
    bank.store = counting = _Counting(store)
    out, grads, _ = _run(bank, block, lm, h, "torch")
    # forward: one fetch of the touched experts; backward: one more (recomputed, nothing was kept)
    assert counting.batched_calls == [touched, touched] and counting.single_calls == 0
    _close(out, ref_out, "output")
    # at most 3 experts' dequantised weights at a time: chunks of 3, same numbers
    per_expert = 3 * bank.hidden_size * bank.intermediate_size * 4
    bank.store, bank.max_group_bytes = (counting := _Counting(store)), 3 * per_expert
    out, grads, _ = _run(bank, block, lm, h, "torch")
    chunks = [touched[i:i + 3] for i in range(0, len(touched), 3)]
    forward, backward = counting.batched_calls[:len(chunks)], counting.batched_calls[len(chunks):]
    assert forward == chunks and sorted(backward) == sorted(chunks)  # the backward visits chunks in its own order
    _close(out, ref_out, "chunked output")
    for a, b in zip(grads, ref_grads):
        _close(a, b, "chunked gradient")
    # the default share: a quarter of the layer's experts at a time
    monkeypatch.setattr(engine.model.expert_bank, "GROUPS_PER_LAYER", 4)
    monkeypatch.setattr(engine.model.expert_bank, "MIN_GROUP_BYTES", 0)  # (tiny layers are otherwise one group)
    bank.store = counting = _Counting(store)
    _run(bank, block, lm, h, "torch")
    assert max(len(c) for c in counting.batched_calls) == 2
    # a store with only per-expert `weights` (e.g. one behind the offload cache): read expert by expert
    bank.store, bank.max_group_bytes = (counting := _Counting(store, batched=False)), 1 << 30
    out, _, _ = _run(bank, block, lm, h, "torch")
    assert counting.single_calls == 2 * len(touched)
    _close(out, ref_out, "per-expert store output")


@pytest.mark.parametrize("hidden, inter", [(64, 32), (128, 64), (192, 96)])
def test_store_batched_dequantisation_equals_per_expert(hidden, inter):
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(6, 2 * inter, hidden, generator=g) * 0.02
    down = torch.randn(6, hidden, inter, generator=g) * 0.02
    store = NF4ExpertStore.from_fused(gate_up, down)
    for experts in ([0, 1, 2, 3, 4, 5], [1, 4, 5]):
        for dtype in (torch.float32, torch.bfloat16):
            gu, dn = store.weights_batched(experts, "cpu", dtype)
            assert gu.shape == (len(experts), 2 * inter, hidden) and dn.shape == (len(experts), hidden, inter)
            for i, e in enumerate(experts):
                ref_gu, ref_dn = store.weights(e, "cpu", dtype)
                # one multiply per element either way: exact in fp32, at most a rounding step of bf16
                tol = 0 if dtype == torch.float32 else torch.finfo(torch.bfloat16).eps
                for got, ref in ((gu[i], ref_gu), (dn[i], ref_dn)):
                    assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_packed_operands_decode_to_the_stored_weights():
    """The layout handed to grouped-nf4-gemm (codes [E, N, K/2], element 2j in the high nibble; fp32 absmax
    [E, N, K/64]) decodes, as its reference `dequant_ref` does, to what the store dequantises."""
    g = torch.Generator().manual_seed(0)
    store = NF4ExpertStore.from_fused(torch.randn(3, 256, 128, generator=g), torch.randn(3, 128, 128, generator=g))
    code = store.tensors["quant_map"]
    for part, which in (("gate_up", 0), ("down", 1)):
        packed, absmax = store.packed_operands(part, torch.device("cpu"))
        E, N, half = packed.shape
        assert packed.dtype == torch.uint8 and absmax.shape == (E, N, 2 * half // 64)
        for e in range(E):
            flat = packed[e].reshape(-1).long()
            codes = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)
            decoded = (code[codes].view(-1, 64) * absmax[e].reshape(-1, 1)).view(N, 2 * half)
            assert torch.equal(decoded, store.weights(e, "cpu", torch.float32)[which])


def test_backend_choice_on_cpu(tiny_checkpoint):
    lm, peft = _attached(tiny_checkpoint("olmoe"), "lora", "parallel", "nf4")
    _, block = next(iter(lm.family.moe_blocks(lm.model)))
    bank = block.experts
    h = torch.randn(5, lm.config.hidden_size)
    _, weights, index = lm.family.router(block)(h)
    bank(h, index, weights)
    assert bank.backend == "auto" and bank.last_backend == "torch"  # the kernels are CUDA only
    with pytest.raises(ValueError, match="model.expert_backend"):
        ExpertBank(bank.store, "silu", bank.hidden_size, bank.intermediate_size, backend="cuda-magic")
    bank.backend = "grouped-nf4-gemm"  # forced where it cannot run: a clear error, not a silent fallback
    with pytest.raises(RuntimeError, match="model.expert_backend is grouped-nf4-gemm"):
        bank(h, index, weights)


def test_grouped_mm_gradients_match_segment_matmuls():
    """engine.model.grouped on float64 (segment matmuls) and float32 (torch._grouped_mm), empty groups included."""
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 1, 0, 4]
    for dtype in (torch.float64, torch.float32):
        a = torch.randn(sum(counts), 16, generator=g, dtype=dtype, requires_grad=True)
        b = torch.randn(len(counts), 16, 8, generator=g, dtype=dtype, requires_grad=True)
        out = grouped_mm(a, b, group_offsets(counts, a.device), counts)
        ref, start = [], 0
        for i, n in enumerate(counts):
            ref.append(a[start:start + n] @ b[i])
            start += n
        ref = torch.cat(ref)
        upstream = torch.randn(1, ref.shape[1], generator=g, dtype=dtype).expand_as(ref)  # stride 0, as .sum() gives
        got = torch.autograd.grad(out, [a, b], upstream)
        want = torch.autograd.grad(ref, [a, b], upstream)
        eps = torch.finfo(dtype).eps
        for x, y in zip((out, *got), (ref, *want)):
            assert (x - y).abs().max() <= 64 * eps * y.abs().max()
        assert torch.count_nonzero(got[1][[1, 4]]) == 0  # empty groups: zero gradient


def test_checkpoint_recompute_hands_its_weights_to_the_backward(tiny_checkpoint):
    """Under non-reentrant gradient checkpointing a layer is run forward, recomputed in backward, then
    backpropagated: the recompute's dequantised weights go straight to that backward (two batched fetches a
    step, not three), with the same output and gradients as the per-expert loop."""
    from torch.utils.checkpoint import checkpoint

    lm, peft = _attached(tiny_checkpoint("olmoe", hidden=128, experts=8), "lora", "inside", "nf4")
    _, block = next(iter(lm.family.moe_blocks(lm.model)))
    bank = block.experts
    h = torch.randn(40, lm.config.hidden_size, generator=torch.Generator().manual_seed(3))
    _, weights, index = lm.family.router(block)(h)
    touched = sorted(set(index.flatten().tolist()))
    params = [p for p in bank.parameters() if p.requires_grad]

    def run(backend):
        bank.backend = backend
        x = h.detach().requires_grad_(True)
        out = checkpoint(bank, x, index, weights.detach(), use_reentrant=False)
        return out, torch.autograd.grad(out.square().sum(), [x, *params])

    want, want_grads = run("loop")
    bank.store = counting = _Counting(bank.store)
    got, got_grads = run("torch")
    assert counting.batched_calls == [touched, touched]  # forward, recompute; the backward took the recompute's
    assert bank._handoff.weights is None  # nothing left held after the backward
    _close(got, want, "output")
    for a, b in zip(got_grads, want_grads):
        _close(a, b, "gradient")
