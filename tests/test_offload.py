"""Offloaded experts: bit-equal to resident ones (logits and gradients, plain and layer-major), the
cache's hits / misses / bytes on scripted sweeps equal hand-computed numbers, only routed experts move;
offloaded NF4 experts dequantised once per group (their cache slots stacked), equal to the per-expert path,
each needed layer's packed NF4 bytes crossing once per sweep."""

from __future__ import annotations

import pytest
import torch

from engine.config import from_dict
from engine.training import layer_major_step
from engine.model import ExpertCache, OffloadSchedule, load_model, offload_banks
from engine.model.offload import DenseHostStore, OffloadedExpertStore
from engine.model import nf4_expert_nbytes
from engine.adapters import attach

from .tolerance import assert_close

LAYERS, EXPERTS, H, I = 3, 4, 8, 4
EXPERT_BYTES = (2 * I * H + H * I) * 4  # fp32 gate_up + down = 384


def _cache(slots):
    cache = ExpertCache(slots, device="cpu")
    g = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        host = DenseHostStore(torch.randn(EXPERTS, 2 * I, H, generator=g), torch.randn(EXPERTS, H, I, generator=g))
        cache.register(layer, host)
    return cache


def _sweep(cache, phase, layers, experts=range(EXPERTS), schedule=None):
    for layer in layers:
        if schedule is not None:
            schedule.begin(phase, layer)
        for e in experts:
            cache.get(layer, e)


def _counts(cache, layer):
    c = cache.stats.per_layer[layer]
    return c.hits, c.misses, c.prefetched, c.bytes


def test_scripted_sweep_on_demand():
    """3 layers x 4 experts, 6 slots, no prefetch; forward 0,1,2 then backward 2,1,0, then layer 0 again.

    Forward: every request misses (12). Layer 1 evicts layer 0's e0, e1 (layer 0 is needed last);
    layer 2 evicts layer 0's e2, e3, then layer 1's e0, e1. Cache: L1{2,3}, L2{0..3}.
    Backward: layer 2 hits 4. Layer 1 misses e0, e1 (evicting layer 2, done for this step) and hits
    e2, e3. Layer 0 misses all 4 (evicting layer 2's rest, then layer 1's LRU). Cache: L0{0..3}, L1{2,3}.
    Next forward: layer 0 hits 4. Totals: 18 misses, 10 hits, 18 experts moved.
    """
    cache = _cache(6)
    _sweep(cache, "forward", [0, 1, 2])
    assert (cache.stats.hits, cache.stats.misses) == (0, 12)
    assert cache.resident() == [(1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    _sweep(cache, "backward", [2, 1, 0])
    assert cache.resident() == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    _sweep(cache, "forward", [0])
    s = cache.stats
    assert (s.hits, s.misses, s.prefetched) == (10, 18, 0)
    assert s.bytes_moved == 18 * EXPERT_BYTES
    assert s.evictions == 18 - 6
    assert _counts(cache, 0) == (4, 8, 0, 8 * EXPERT_BYTES)
    assert _counts(cache, 1) == (2, 6, 0, 6 * EXPERT_BYTES)
    assert _counts(cache, 2) == (4, 4, 0, 4 * EXPERT_BYTES)


def test_scripted_sweep_plain_lru_would_move_more():
    """The same sweep under a policy blind to the direction (pure LRU) misses layer 1's e2, e3 in the
    backward too: 20 moves instead of 18. Checked by replaying with the sweep position frozen."""
    cache = _cache(6)
    cache._distance = lambda layer: 0  # every entry equally far: ties broken by LRU only
    _sweep(cache, "forward", [0, 1, 2])
    _sweep(cache, "backward", [2, 1, 0])
    assert cache.stats.misses == 12 + 0 + 4 + 4


def test_scripted_sweep_with_prefetch():
    """8 slots (two layers' worth), prefetch of the whole next layer.

    Forward: entering layer 0 prefetches layers 0 and 1 (8 copies, empty slots); entering layer 1
    prefetches layer 2 into layer 0's slots (layer 0 is needed last); layer 2 has nothing ahead.
    Backward: entering layer 1 prefetches layer 0 into layer 2's slots. Every request hits: 24 hits,
    0 misses, 16 copies = 12 experts + 4 re-fetched, the least any policy can do with 8 slots.
    """
    cache = _cache(8)
    schedule = OffloadSchedule(cache, forward_prefetch="all")
    _sweep(cache, "forward", [0, 1, 2], schedule=schedule)
    assert cache.resident(0) == [] and len(cache.resident(1)) == len(cache.resident(2)) == 4
    _sweep(cache, "backward", [2, 1, 0], schedule=schedule)
    s = cache.stats
    assert (s.hits, s.misses, s.prefetched) == (24, 0, 16)
    assert s.bytes_moved == 16 * EXPERT_BYTES
    assert _counts(cache, 0) == (8, 0, 8, 8 * EXPERT_BYTES)
    assert _counts(cache, 1) == (8, 0, 4, 4 * EXPERT_BYTES)
    assert _counts(cache, 2) == (8, 0, 4, 4 * EXPERT_BYTES)


def test_prefetch_never_evicts_what_is_needed_sooner():
    """4 slots: while layer 1 computes (its 4 experts cached), prefetching layer 2 must not evict them."""
    cache = _cache(4)
    cache.enter("forward", 1)
    for e in range(EXPERTS):
        cache.get(1, e)
    assert cache.prefetch(2, range(EXPERTS)) == 0
    assert cache.resident() == [(1, e) for e in range(EXPERTS)]
    # during the backward at layer 1, layer 0 is next and layer 1 is still in use: still nothing
    cache.enter("backward", 1)
    assert cache.prefetch(0, range(EXPERTS)) == 0
    # at layer 0 of the backward, layer 1 is done for this step: layer 0 may take its slots
    cache.enter("backward", 0)
    assert cache.prefetch(0, [0, 1]) == 2


# ---- through a tiny model ------------------------------------------------------------------------
def _model(path, seed=0, quant="bf16"):
    lm = load_model(path)
    cfg = from_dict({"model": {"quant": quant}, "adapter": {"kind": "lora", "placement": "inside", "rank": 4, "alpha": 8},
                     "routing": {"strategy": "embedded", "base_balance_loss": 0.01}})
    peft = attach(lm, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lm, peft


def _batches(vocab, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def _run(lm, peft, batches):
    lm.model.zero_grad(set_to_none=True)
    logits = []
    for b in batches:
        out = lm.model(**b)
        logits.append(out.logits.detach())
        aux = peft.aux_loss()
        (out.loss + aux).backward()
    return logits, {n: p.grad.clone() for n, p in peft.trainable_parameters()}


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss"])  # gpt-oss-120b trains offloaded
def test_offloaded_equals_resident(family, tiny_checkpoint):
    lm, peft = _model(tiny_checkpoint(family, layers=3, experts=6))
    batches = _batches(lm.config.vocab_size)
    want_logits, want_grads = _run(lm, peft, batches)
    cache = offload_banks(peft.banks, num_slots=3, device="cpu", num_layers=3)  # fewer slots than a layer has
    assert all(isinstance(b.store, OffloadedExpertStore) for b in peft.banks.values())
    got_logits, got_grads = _run(lm, peft, batches)
    for a, b in zip(want_logits, got_logits):
        assert torch.equal(a, b)
    for name in want_grads:
        assert torch.equal(want_grads[name], got_grads[name]), name
    assert cache.stats.misses > 0 and cache.stats.evictions > 0  # the cache really was too small


@pytest.mark.parametrize("quant", ["bf16", "nf4"])
def test_layer_major_offloaded_equals_resident_and_moves_each_layer_once(quant, tiny_checkpoint):
    path = tiny_checkpoint("olmoe", layers=3, experts=6)
    lm, peft = _model(path, quant=quant)
    batches = _batches(lm.config.vocab_size, n=3)
    want = layer_major_step(lm.model, peft, batches)
    want_grads = {n: p.grad.clone() for n, p in peft.trainable_parameters()}

    lm2, peft2 = _model(path, quant=quant)
    L, E = 3, 6
    cache = offload_banks(peft2.banks, num_slots=2 * E, device="cpu", num_layers=L)  # two layers' worth
    H, I = lm.config.hidden_size, lm.config.intermediate_size
    # NF4: the packed codes and scales of gate_up and down, nothing else (counted from the shapes, not the cache)
    per_expert = nf4_expert_nbytes(H, I) if quant == "nf4" else (3 * H * I) * 4
    schedule = OffloadSchedule(cache)
    got = layer_major_step(lm2.model, peft2, batches, hooks=schedule)
    assert got.loss == want.loss and got.aux == want.aux and got.usage == want.usage
    for n, p in peft2.trainable_parameters():
        assert torch.equal(p.grad, want_grads[n]), n
    # only routed experts moved: the forward brings each (layer, expert) any micro-batch routed to once;
    # the backward re-brings only the layer that no longer fits (layer 0, evicted for layer 2)
    routed = [{e for e, c in enumerate(row) if c > 0} for row in got.usage]
    s = cache.stats
    assert s.per_layer[0].bytes == 2 * len(routed[0]) * per_expert
    assert s.per_layer[1].bytes == len(routed[1]) * per_expert
    assert s.per_layer[2].bytes == len(routed[2]) * per_expert
    assert s.bytes_moved == (2 * len(routed[0]) + len(routed[1]) + len(routed[2])) * per_expert
    # step 2: the forward prefetches last step's experts, the backward exactly this step's
    cache.reset_stats()
    lm2.model.zero_grad(set_to_none=True)
    layer_major_step(lm2.model, peft2, batches, hooks=schedule)
    assert cache.stats.misses == 0 and cache.stats.prefetched > 0


class _CountingHost:
    """Counts the host store's dequantisations: batched (one per group) and per expert."""

    def __init__(self, host):
        self.host, self.num_experts = host, host.num_experts
        self.stacked_calls: list[int] = []
        self.single_calls = 0

    def expert_tensors(self, e):
        return self.host.expert_tensors(e)

    def weights_from_tensors(self, tensors, device, dtype):
        self.single_calls += 1
        return self.host.weights_from_tensors(tensors, device, dtype)

    def weights_from_stacked(self, tensors, device, dtype):
        self.stacked_calls.append(tensors["down.offset"].shape[0])
        return self.host.weights_from_stacked(tensors, device, dtype)


def test_offloaded_nf4_one_dequantisation_per_group_equals_per_expert_and_resident(tiny_checkpoint):
    """NF4 experts behind a cache of 5 slots (fewer than a layer's 8): the grouped expert bank's batched fetch
    gathers each group's slots and dequantises them in ONE call (forward, and again in backward), never
    expert by expert; logits and gradients equal the resident store's and the per-expert offloaded path's."""
    path = tiny_checkpoint("olmoe", layers=3, hidden=128, experts=8)  # rows of whole NF4 blocks
    lm, peft = _model(path, quant="nf4")
    batches = _batches(lm.config.vocab_size)
    want_logits, want_grads = _run(lm, peft, batches)
    cache = offload_banks(peft.banks, num_slots=5, device="cpu", num_layers=3)
    hosts = {}
    for layer, bank in peft.banks.items():
        hosts[layer] = _CountingHost(bank.store.host)
        bank.store = OffloadedExpertStore(hosts[layer], layer, cache)
    got_logits, got_grads = _run(lm, peft, batches)
    for a, b in zip(got_logits, want_logits):
        assert_close(a, b, what="logits (batched offload vs resident)")
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], what=f"gradient of {name}")
    # per layer and micro-batch: one dequantisation of the touched experts forward, one in backward
    for layer, host in hosts.items():
        assert host.single_calls == 0, layer
        assert len(host.stacked_calls) == 2 * len(batches), (layer, host.stacked_calls)
        assert all(1 < n <= 8 for n in host.stacked_calls)
    assert cache.stats.misses > 0 and cache.stats.evictions > 0  # the cache really was too small
    # the earlier path, expert by expert: the same numbers
    for layer, bank in peft.banks.items():
        hosts[layer] = _CountingHost(bank.store.host.host)
        bank.store = OffloadedExpertStore(hosts[layer], layer, cache, batched=False)
    old_logits, old_grads = _run(lm, peft, batches)
    for a, b in zip(old_logits, want_logits):
        assert_close(a, b, what="logits (per-expert offload vs resident)")
    for name in want_grads:
        assert_close(old_grads[name], want_grads[name], what=f"per-expert gradient of {name}")
    assert all(h.stacked_calls == [] and h.single_calls > 0 for h in hosts.values())
