"""The PERFT paper's recipe, selectable exactly: `adapter.init: perft` (its code's initialisation), balance losses
on transformers' scale (one loss over all MoE layers, k when balanced; equal to `load_balancing_loss_func`), and
`data.train_on_prompt`."""

from __future__ import annotations

import math

import pytest
import torch

from engine.adapters import attach
from engine.adapters.banks import AdapterBank, LoraLinear
from engine.config import from_dict
from engine.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(strategy="routed", kind="lora", placement="parallel", init="perft", rank=4, **routing):
    return from_dict({"model": {"quant": "bf16"},
                      "adapter": {"kind": kind, "placement": placement, "rank": rank, "alpha": 2 * rank, "init": init},
                      "routing": {"strategy": strategy, "num_adapters": 3, "top_k": 2, **routing}})


# ---- item 1: adapter.init ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lora", "bottleneck", "gated"])
def test_perft_init_has_the_papers_statistics(kind):
    torch.manual_seed(0)
    rank = 8
    bank = AdapterBank(kind, 16, 256, 256, rank, alpha=16, init="perft")
    downs = [bank.down] + ([bank.gate_up] if kind == "gated" else [])
    for t in downs:  # A / W_down / W_g, W_u ~ N(0, 2/r): std sqrt(2/8) = 0.5 over 32,768 draws
        assert abs(t.std().item() - math.sqrt(2 / rank)) < 0.01 and abs(t.mean().item()) < 0.01
    up = bank.up.detach()
    assert 0 < up.abs().max().item() < 1e-5 and abs(up.std().item() - 1e-6) < 2e-8  # B / W_up / W_d ~ 1e-6·N(0, 1)
    kaiming = AdapterBank(kind, 16, 256, 256, rank, alpha=16)
    assert torch.count_nonzero(kaiming.up) == 0
    bound = 1 / math.sqrt(256)  # kaiming-uniform(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in)), std 1/sqrt(3·d_in)
    assert kaiming.down.abs().max().item() <= bound and abs(kaiming.down.std().item() - bound / math.sqrt(3)) < 2e-3


def test_attention_lora_keeps_pefts_default_init_under_perft(tiny_checkpoint):
    lm = load_model(tiny_checkpoint("olmoe"))
    peft = attach(lm, _cfg("shared", attention_lora=True, rank=8))
    attn = [m for m in lm.model.modules() if isinstance(m, LoraLinear)]
    assert attn and all(torch.count_nonzero(m.lora.up) == 0 for m in attn)  # the paper's q/v baseline: PEFT's
    shared = [m for m in lm.model.modules() if isinstance(m, AdapterBank) and m.init == "perft"]
    assert shared and all(torch.count_nonzero(m.up) > 0 for m in shared)
    assert peft.cfg.adapter.init == "perft"
    # the routed router as the paper's code leaves it: N(0, config.initializer_range) (the tiny model's 64^-0.5)
    routers = torch.cat([r.router.weight.flatten() for r in
                         attach(load_model(tiny_checkpoint("olmoe")), _cfg("routed")).routed.values()])
    assert abs(routers.std().item() / lm.model.config.initializer_range - 1) < 0.1, routers.std()


@pytest.mark.parametrize("strategy, kind, placement", [("shared", "lora", "parallel"), ("dense", "bottleneck", "parallel"),
                                                       ("routed", "gated", "parallel"), ("embedded", "lora", "parallel"),
                                                       ("embedded", "lora", "inside")])
def test_a_fresh_perft_adapter_leaves_the_output_nearly_unchanged(strategy, kind, placement, tiny_checkpoint):
    lm = load_model(tiny_checkpoint("qwen3_moe"))
    ids = torch.randint(3, lm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm.model(ids).logits
    attach(lm, _cfg(strategy, kind, placement))
    with torch.no_grad():
        after = lm.model(ids).logits
    change = (after - before).abs().max().item()
    # B ~ 1e-6: the change is of order 1e-6 · |A h| · alpha/r, far below the logits' own scale, yet not zero
    assert 0 < change < 1e-3 * before.abs().max().item(), change
