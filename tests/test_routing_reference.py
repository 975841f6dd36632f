"""The gates each strategy weighs its adapters by, against a reference written here from the modules'
parameters (softmax and top-k by hand, not the code under test):

- `routed`: its OWN router's softmax over its N adapters, top-k, renormalised when asked —
  `Σ_{j ∈ topk(p̃)} p̃_j · P_j(h)`, never the MoE router's gates (DESIGN, "The method");
- `embedded`: the MoE's own routing — `Σ_{e ∈ topk(p)} g_e · P_e(h)`, with the family's renormalisation.

Each test also swaps in a wrong variant (the MoE router's gates for `routed`, the authors' OLMoE mistake;
uniform or unnormalised gates for `embedded`) and checks that the comparison then fails.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import from_dict
from engine.model import ExpertBank, load_model
from engine.adapters import attach
from engine.adapters.strategies import RoutedAdapters

from .conftest import FAMILY_NAMES

T = 10  # tokens


def _softmax(x: torch.Tensor) -> torch.Tensor:
    z = (x - x.max(dim=-1, keepdim=True).values).exp()
    return z / z.sum(dim=-1, keepdim=True)


def _top_k(probs: torch.Tensor, k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and gates of the k largest probabilities of each row, by a plain sort."""
    idx = torch.stack([torch.tensor(sorted(range(row.numel()), key=lambda j: -float(row[j]))[:k]) for row in probs])
    gates = torch.gather(probs, 1, idx)
    return idx, gates / gates.sum(dim=-1, keepdim=True) if renormalise else gates


def _lora(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """(alpha / r) · B A h for one adapter, token by token."""
    return torch.stack([scale * (B @ (A @ x)) for x in h])


def _weighted_sum(h, idx, gates, A, B, scale) -> torch.Tensor:
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for slot in range(idx.shape[1]):
            j = int(idx[t, slot])
            out[t] += gates[t, slot] * _lora(h[t:t + 1], A[j], B[j], scale)[0]
    return out


def _attached(checkpoint, routing: dict, seed: int = 0):
    lm = load_model(checkpoint)
    cfg = from_dict({"model": {"quant": "bf16"}, "adapter": {"kind": "lora", "placement": "parallel", "rank": 3,
                                                             "alpha": 6.0}, "routing": routing})
    peft = attach(lm, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero up-projections, so every adapter adds something
        for _, p in peft.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    layer, block = next(iter(lm.family.moe_blocks(lm.model)))
    h = torch.randn(1, T, lm.config.hidden_size, generator=g)
    return lm, peft, block, h


def _adapter_delta(peft, block, h) -> torch.Tensor:
    """What the adapters add to the MoE block's output: block(h) minus the block with adapters off."""
    with torch.no_grad():
        full = _hidden(block(h))
        with peft.disabled():
            base = _hidden(block(h))
    return (full - base)[0]


def _adapter_input(lm, block, x: torch.Tensor) -> torch.Tensor:
    """What the adapters beside the block (and the embedded ones) read: the block's input, but for Gemma 4, whose
    experts (and so the adapters beside them) read the layer's pre_feedforward_layernorm_2 of it."""
    if lm.config.model_type == "gemma4_text":
        return block.layer.pre_feedforward_layernorm_2(x)
    return x


def _hidden(output):
    """A block's hidden states (gpt-oss's block also returns its router scores)."""
    return output[0] if isinstance(output, tuple) else output


# ---- routed: its own router ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_routed_weighs_adapters_by_its_own_router(family, renormalize, tiny_checkpoint, monkeypatch):
    lm, peft, block, h = _attached(tiny_checkpoint(family, experts=4, top_k=2),
                                   {"strategy": "routed", "num_adapters": 4, "top_k": 2, "renormalize": renormalize})
    routed = block.peft
    assert isinstance(routed, RoutedAdapters)
    with torch.no_grad():
        x = _adapter_input(lm, block, h[0])
        own = _softmax(x @ routed.router.weight.T)  # p̃ over the N adapters
        idx, gates = _top_k(own, 2, renormalize)
        want = _weighted_sum(x, idx, gates, routed.bank.down, routed.bank.up, routed.bank.scale)
    got = _adapter_delta(peft, block, h)
    assert want.abs().max() > 1e-2  # the adapters do add something here
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # the wrong gates — the MoE router's, as the authors' OLMoE code had it — are caught by this reference
    moe_router = lm.family.router(block)

    def base_router_gates(self, hh):
        logits, gates, top = moe_router(hh)
        return _softmax(logits.float()), gates.float(), top

    monkeypatch.setattr(RoutedAdapters, "route", base_router_gates)
    wrong = _adapter_delta(peft, block, h)
    assert not torch.allclose(wrong, want, rtol=1e-3, atol=1e-3)


# ---- embedded: the MoE's routing -------------------------------------------------------------

def _moe_gates(lm, block, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE's top-k and gates from its router's weight (and bias, gpt-oss): softmax, top-k, renormalised where
    the family does (Mixtral and Qwen3.5 always; gpt-oss and Granite, whose softmax over the top-k logits is exactly
    that; the others when config.norm_topk_prob; DeepSeek-V2 never), times DeepSeek's routed_scaling_factor;
    DeepSeek-V3 and GLM-4.5: sigmoid scores, chosen with e_score_correction_bias among the best topk_group of n_group
    groups (ranked by their best two), the unbiased scores renormalised and scaled; ERNIE: the bias chooses among
    softmax scores; LFM2-MoE: sigmoid scores chosen with the block's expert_bias, renormalised (+1e-6 as
    transformers) and scaled."""
    cfg, router = lm.config, lm.family.router(block)
    if cfg.model_type == "gemma4_text":  # scores of RMSNorm(x)·scale/√H; renormalised top-k, times per-expert scales
        normed = x / (x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps).sqrt()
        idx, gates = _top_k(_softmax(normed * router.scale * cfg.hidden_size ** -0.5 @ router.proj.weight.T), k, True)
        return idx, gates * router.per_expert_scale[idx]
    bias = getattr(router, "bias", None)
    logits = x @ router.weight.T + (0 if bias is None else bias)
    if cfg.model_type == "ernie4_5_moe":  # the correction bias picks the experts; the gates are the probabilities
        probs = _softmax(logits)
        idx, _ = _top_k(probs + router.moe_statics.e_score_correction_bias[0], k, False)
        gates = torch.gather(probs, 1, idx)
        return idx, gates / gates.sum(dim=-1, keepdim=True)
    if cfg.model_type == "lfm2_moe":  # sigmoid scores, the block's expert_bias chooses, the scores renormalised
        scores = torch.sigmoid(logits)
        idx, _ = _top_k(scores + block.expert_bias, k, False)
        gates = torch.gather(scores, 1, idx)
        return idx, gates / (gates.sum(dim=-1, keepdim=True) + 1e-6) * cfg.routed_scaling_factor
    if cfg.model_type in ("deepseek_v3", "glm4_moe", "glm4_moe_lite"):  # sigmoid routers with the correction bias
        scores = torch.sigmoid(logits)
        choice = scores + router.e_score_correction_bias
        groups = choice.reshape(choice.shape[0], cfg.n_group, -1)
        group_score = groups.sort(dim=-1, descending=True).values[..., :2].sum(-1)
        keep, _ = _top_k(group_score, cfg.topk_group, False)
        masked = torch.full_like(groups, -float("inf"))
        for t in range(groups.shape[0]):
            masked[t, keep[t]] = groups[t, keep[t]]
        idx, _ = _top_k(masked.reshape(choice.shape), k, False)
        gates = torch.gather(scores, 1, idx)
        return idx, gates / gates.sum(dim=-1, keepdim=True) * cfg.routed_scaling_factor
    renorm = cfg.model_type in ("mixtral", "gpt_oss", "granitemoe", "granitemoehybrid", "qwen3_5_moe_text") or (
        bool(getattr(cfg, "norm_topk_prob", False)) and cfg.model_type != "deepseek_v2")
    idx, gates = _top_k(_softmax(logits), k, renorm)
    return idx, gates * getattr(cfg, "routed_scaling_factor", 1.0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_embedded_weighs_adapters_by_the_moe_gates(family, tiny_checkpoint, monkeypatch):
    lm, peft, block, h = _attached(tiny_checkpoint(family, experts=4, top_k=2), {"strategy": "embedded"})
    bank = block.experts
    assert isinstance(bank, ExpertBank) and bank.parallel is not None
    with torch.no_grad():
        idx, gates = _moe_gates(lm, block, h[0], 2)
        x = _adapter_input(lm, block, h[0])
        want = _weighted_sum(x, idx, gates, bank.parallel.down, bank.parallel.up, bank.parallel.scale)
    got = _adapter_delta(peft, block, h)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # an expert bank that ignored the MoE's gates (each routed expert weighted 1/k) fails the comparison
    real_forward = ExpertBank.forward

    def uniform_gates(self, hidden_states, top_k_index, top_k_weights):
        return real_forward(self, hidden_states, top_k_index, torch.full_like(top_k_weights, 0.5))

    monkeypatch.setattr(ExpertBank, "forward", uniform_gates)
    assert not torch.allclose(_adapter_delta(peft, block, h), want, rtol=1e-3, atol=1e-3)


def test_the_reference_tells_renormalised_from_raw_gates(tiny_checkpoint):
    """The reference is sharp enough to separate the two gate rules the families use (renormalised top-k
    vs raw softmax top-k): for one model the two predictions differ, and the module matches exactly one."""
    lm, peft, block, h = _attached(tiny_checkpoint("qwen3_moe", experts=4, top_k=2), {"strategy": "embedded"})
    bank, x = block.experts.parallel, h[0]
    with torch.no_grad():
        probs = _softmax(x @ lm.family.router(block).weight.T)
        preds = {r: _weighted_sum(x, *_top_k(probs, 2, r), bank.down, bank.up, bank.scale) for r in (True, False)}
    got = _adapter_delta(peft, block, h)
    matches = [r for r, want in preds.items() if torch.allclose(got, want, rtol=1e-5, atol=1e-5)]
    assert matches == [bool(lm.config.norm_topk_prob)]
