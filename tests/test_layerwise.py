"""The layer-major step against plain micro-batch-major accumulation: same loss, same balance loss,
same expert usage, same gradients (fp32, tight tolerance), with padding in the micro-batches."""

from __future__ import annotations

import pytest
import torch

from engine.config import from_dict
from engine.training import layer_major_step, micro_batch_major_step
from engine.model import load_model
from engine.adapters import attach

from .tolerance import assert_close


def _cfg(strategy, placement="parallel", **routing):
    return from_dict({"model": {"quant": "bf16"}, "adapter": {"kind": "lora", "placement": placement, "rank": 4, "alpha": 8},
                      "routing": {"strategy": strategy, "num_adapters": 3, "top_k": 2, "balance_loss": 0.01,
                                  "base_balance_loss": 0.02, **routing}})


def _micro_batches(vocab, n=3, batch=2, seq=10, seed=0):
    """Micro-batches with right padding (and one left-padded row): pads masked out and labelled -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 2 - m:] = 0  # right padding, a different length per micro-batch
        if m == 1:
            mask[1, :3] = 0  # left padding
        ids[mask == 0] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _setup(path, cfg, seed=0):
    lm = load_model(path)
    peft = attach(lm, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lm.model.train()
    return lm, peft


def _grads(peft):
    return {n: p.grad.detach().clone() if p.grad is not None else None for n, p in peft.trainable_parameters()}


CASES = [
    ("olmoe", "embedded", "parallel", {}),
    ("olmoe", "routed", "parallel", {"attention_lora": True}),
    ("qwen2_moe", "embedded", "inside", {"attention_lora": True}),
    ("qwen2_moe", "routed", "parallel", {}),
    ("mixtral", "routed", "parallel", {"train_router": True}),
    ("gpt_oss", "embedded", "inside", {"attention_lora": True}),  # expert biases, clamped SwiGLU, block tuple output
    # a dense first layer, ungated shared experts, the router's correction bias; the trained router is fp32
    ("ernie4_5_moe", "shared", "parallel", {"attention_lora": True, "train_router": True}),
    # a dense first layer, MLA attention, shared experts, the sigmoid router's balance loss
    ("deepseek_v3", "embedded", "inside", {"attention_lora": True, "train_router": True}),
    # hybrid short-conv / attention layers after a dense one, a sigmoid router given its block's expert bias
    ("lfm2_moe", "dense", "parallel", {"attention_lora": True, "train_router": True}),
    # the hub's fused experts (block_sparse_moe), μP residual multipliers around the adapters, the `router` trained
    ("granitemoe", "embedded", "parallel", {"attention_lora": True, "train_router": True}),
    # Granite-4.0-H: Mamba-2 layers beside attention ones, the dense shared MLP outside the MoE block
    ("granitemoehybrid", "shared", "parallel", {"attention_lora": True}),
    # Qwen3-Next: fused Gated DeltaNet projections beside gated attention, the sigmoid-gated shared expert
    ("qwen3_next", "routed", "parallel", {"attention_lora": True}),
    # GLM-4.7-Flash: MLA with a query LoRA, the dense first layer from mlp_layer_types, GLM's sigmoid router trained
    ("glm4_moe_lite", "shared", "parallel", {"attention_lora": True, "train_router": True}),
    # Gemma 4: the MoE branch beside the dense MLP (adapters inside its norms), sliding and full attention layers
    # (k as v in the full ones), final logit soft-capping, the router's proj trained
    ("gemma4", "routed", "parallel", {"attention_lora": True, "train_router": True}),
]


@pytest.mark.parametrize("family, strategy, placement, extra", CASES)
def test_layer_major_equals_micro_batch_major(family, strategy, placement, extra, tiny_checkpoint):
    lm, peft = _setup(tiny_checkpoint(family), _cfg(strategy, placement, **extra))
    if family == "qwen2_moe":  # the trainer enables it; the layer-major step must not double it
        lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = _micro_batches(lm.config.vocab_size)
    accum = 4  # a divisor other than the number of micro-batches, as with a short last step

    ref = micro_batch_major_step(lm.model, peft, batches, accum)
    want = _grads(peft)
    lm.model.zero_grad(set_to_none=True)
    got = layer_major_step(lm.model, peft, batches, accum)
    have = _grads(peft)

    assert got.loss == pytest.approx(ref.loss, rel=1e-6)
    assert ref.aux > 0 and got.aux == pytest.approx(ref.aux, rel=1e-6)
    assert got.usage == ref.usage
    assert set(want) == set(have)
    for name in want:
        assert want[name] is not None and have[name] is not None, name
        assert want[name].abs().sum() > 0, name
        assert_close(have[name], want[name], what=name)
    assert all(getattr(layer, "gradient_checkpointing", False) == (family == "qwen2_moe")
               for layer in lm.model.model.layers)


class _Trace:
    def __init__(self):
        self.events = []

    def begin(self, phase, layer):
        self.events.append((phase, layer))

    def end(self, phase, layer):
        pass


def test_layer_order_and_dropout_recompute(tiny_checkpoint):
    """Layers are visited 0..L-1 then L-1..0 once per step; with dropout on, the recompute replays the
    forward's masks, so the gradient equals the plain loop's under the same per-layer RNG."""
    cfg = from_dict({"model": {"quant": "bf16"}, "adapter": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.3},
                     "routing": {"strategy": "embedded"}})
    lm, peft = _setup(tiny_checkpoint("olmoe", layers=3), cfg)
    batches = _micro_batches(lm.config.vocab_size, n=2)
    trace = _Trace()
    torch.manual_seed(0)
    res = layer_major_step(lm.model, peft, batches, hooks=trace)
    L = len(lm.model.model.layers)
    assert trace.events == [("forward", i) for i in range(L)] + [("backward", i) for i in reversed(range(L))]
    assert torch.isfinite(torch.tensor(res.loss))
    # same RNG seed, same step: identical gradients (the saved RNG states make recompute exact)
    first = _grads(peft)
    lm.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    layer_major_step(lm.model, peft, batches, hooks=trace)
    for name, g in _grads(peft).items():
        assert torch.equal(g, first[name]), name
    # and it is the true gradient: a central difference along it, dropout off
    lm.model.eval()
    name, p = next((n, p) for n, p in peft.trainable_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    lm.model.zero_grad(set_to_none=True)
    layer_major_step(lm.model, peft, batches)
    d = p.grad / p.grad.norm()
    directional = float((p.grad * d).sum())
    eps = 1e-3
    with torch.no_grad():
        p.add_(eps * d)
    plus = layer_major_step(lm.model, peft, batches).loss
    with torch.no_grad():
        p.sub_(2 * eps * d)
    minus = layer_major_step(lm.model, peft, batches).loss
    assert (plus - minus) / (2 * eps) == pytest.approx(directional, rel=2e-2)


def test_refuses_transformers_router_loss(tiny_checkpoint):
    lm, peft = _setup(tiny_checkpoint("mixtral"), _cfg("embedded"))
    lm.model.config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits"):
        layer_major_step(lm.model, peft, _micro_batches(lm.config.vocab_size, n=1))
