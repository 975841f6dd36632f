"""The CUDA parts (skipped without a GPU; bench/device_check.sh runs them on a lent one): the grouped expert
bank in bf16 against the per-expert loop, NF4 experts offloaded from pinned host memory (side-stream copies,
events) against resident ones, batched and per-expert, and the grouped-nf4-gemm kernels against the torch
backend where the package is installed."""

from __future__ import annotations

import pytest
import torch

from engine.config import from_dict
from engine.model.expert_bank import kernels_installed
from engine.model import load_model, offload_banks
from engine.model.offload import OffloadedExpertStore
from engine.adapters import attach

from .tolerance import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bank(path, device, dtype=torch.bfloat16):
    lm = load_model(path, dtype=dtype, device=device)
    cfg = from_dict({"model": {"quant": "nf4"}, "adapter": {"kind": "lora", "placement": "inside", "rank": 4, "alpha": 8},
                     "routing": {"strategy": "embedded"}})
    peft = attach(lm, cfg)
    lm.model.to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in peft.trainable_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(device))
    _, block = next(iter(lm.family.moe_blocks(lm.model)))
    return lm, peft, block


def _out_and_grads(bank, block, lm, h):
    h = h.detach().requires_grad_(True)
    _, weights, index = lm.family.router(block)(h)
    params = [p for p in bank.parameters() if p.requires_grad]
    out = bank(h, index, weights.detach())
    grads = torch.autograd.grad(out.float().square().sum(), [h, *params])
    torch.cuda.synchronize()
    return out, grads


def _backends_agree(tiny_checkpoint, backend: str, reference: str) -> str:
    """Output and gradients of the bank under `backend` equal those under `reference` within 16 bf16 rounding
    steps; returns the backend the first pass really used."""
    lm, peft, block = _bank(tiny_checkpoint("olmoe", hidden=128, experts=8), "cuda")
    bank = block.experts
    h = torch.randn(64, lm.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    bank.backend = backend
    out_a, grads_a = _out_and_grads(bank, block, lm, h)
    used = bank.last_backend
    bank.backend = reference
    out_b, grads_b = _out_and_grads(bank, block, lm, h)
    assert_close(out_a.float(), out_b.float(), torch.bfloat16, ulps=16, what="output")
    for a, b in zip(grads_a, grads_b):
        assert_close(a.float(), b.float(), torch.bfloat16, ulps=16, what="gradient")
    return used


def test_grouped_bf16_equals_loop_on_cuda(tiny_checkpoint):
    _backends_agree(tiny_checkpoint, "torch", "loop")


@pytest.mark.parametrize("batched", [True, False])
def test_offloaded_pinned_nf4_equals_resident_on_cuda(batched, tiny_checkpoint):
    path = tiny_checkpoint("olmoe", layers=3, hidden=128, experts=8)
    lm, peft, block = _bank(path, "cuda")
    h = torch.randn(48, lm.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    want, want_grads = _out_and_grads(block.experts, block, lm, h)
    for bank in peft.banks.values():
        bank.store.to("cpu")  # the host copy the cache streams from (pinned by as_host_store)
    cache = offload_banks(peft.banks, num_slots=5, device="cuda", num_layers=3)  # fewer slots than a layer
    for layer, bank in peft.banks.items():
        bank.store = OffloadedExpertStore(bank.store.host, layer, cache, batched=batched)
    got, got_grads = _out_and_grads(block.experts, block, lm, h)
    if batched:  # the same bytes through the same batched dequantisation: the same bits
        assert torch.equal(got, want)
        for a, b in zip(got_grads, want_grads):
            assert torch.equal(a, b)
    else:  # bitsandbytes' own double-quant decode, expert by expert: a rounding step of bf16 at most
        assert_close(got.float(), want.float(), torch.bfloat16, ulps=16, what="output")
        for a, b in zip(got_grads, want_grads):
            assert_close(a.float(), b.float(), torch.bfloat16, ulps=16, what="gradient")
    assert cache.stats.misses > 0 and cache.stats.bytes_moved > 0


@pytest.mark.skipif(not kernels_installed(), reason="grouped-nf4-gemm is not installed")
def test_grouped_nf4_gemm_kernels_equal_torch_backend(tiny_checkpoint):
    assert _backends_agree(tiny_checkpoint, "grouped-nf4-gemm", "torch") == "grouped-nf4-gemm"
