"""Routed-PEFT on the tiny checkpoints of every family: zero init, the embedded strategy against a
slow reference, the routed strategy's top-k and balance loss, learning, save/load, accounting."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from engine.config import from_dict
from engine.model import load_model
from engine.adapters import AdapterMismatchError, attach, balance_loss, load_adapter, save_adapter

from .conftest import FAMILY_NAMES
from .tolerance import assert_close

STRATEGIES = ["shared", "dense", "routed", "embedded"]
KINDS = ["lora", "bottleneck", "gated"]
# every strategy x kind, plus LoRA inside the experts (embedded only)
COMBOS = [(s, k, "parallel") for s, k in itertools.product(STRATEGIES, KINDS)] + [("embedded", "lora", "inside")]


def _cfg(strategy, kind, placement="parallel", **routing):
    return from_dict({"model": {"quant": "bf16"}, "adapter": {"kind": kind, "placement": placement, "rank": 4, "alpha": 8},
                      "routing": {"strategy": strategy, "num_adapters": 3, "top_k": 2, **routing}})


def _load(path):
    lm = load_model(path)
    lm.model.config._experts_implementation = "eager"  # transformers' plain loop, the exact reference
    return lm


def _ids(vocab, shape=(2, 12), seed=0):
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _randomize(peft, seed=0):
    """Give every adapter tensor (zero-initialised ups included) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("strategy, kind, placement", COMBOS)
def test_fresh_adapters_leave_logits_unchanged(family, strategy, kind, placement, tiny_checkpoint):
    lm = _load(tiny_checkpoint(family))
    ids = _ids(lm.config.vocab_size)
    with torch.no_grad():
        before = lm.model(ids).logits
    peft = attach(lm, _cfg(strategy, kind, placement, attention_lora=True))
    assert peft.parameter_report()["trainable"] > 0
    with torch.no_grad():
        after = lm.model(ids).logits
        with peft.disabled():
            off = lm.model(ids).logits
    assert torch.equal(off, after)
    if lm.family.expert_glu(lm.config) is None:  # the expert bank computes transformers' own layout, bit for bit
        assert torch.equal(before, after)
    else:  # gpt-oss: transposed, interleaved experts: the same sums in another order
        assert_close(after, before, what="logits")


def _reference_embedded(block, fam, h, bank_params, kind, placement, glu, bias):
    """Loop over tokens and their routed experts in plain PyTorch: Σ_e g_e (E_e(h) + P_e(h)); `glu(gate, up)` is
    the experts' gated activation, `bias` their (gate_up [E, 2I], down [E, H]) biases or None."""
    _, gates, idx = fam.router(block)(h)
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for slot in range(idx.shape[1]):
            e = int(idx[t, slot])
            gu = block.experts.store.weights(e, h.device, h.dtype)
            inter = gu[0].shape[0] // 2
            W_g, W_u, W_d = gu[0][:inter], gu[0][inter:], gu[1]
            b_g, b_u, b_d = (0, 0, 0) if bias is None else (bias[0][e, :inter], bias[0][e, inter:], bias[1][e])
            x = h[t]
            if placement == "inside":
                s = 8 / 4
                A, B = bank_params["gate"]
                g_pre = W_g @ x + b_g + s * B[e] @ (A[e] @ x)
                A, B = bank_params["up"]
                u_pre = W_u @ x + b_u + s * B[e] @ (A[e] @ x)
                a = glu(g_pre, u_pre)
                A, B = bank_params["down"]
                y = W_d @ a + b_d + s * B[e] @ (A[e] @ a)
            else:
                y = W_d @ glu(W_g @ x + b_g, W_u @ x + b_u) + b_d
                down, gate_up, up = bank_params["parallel"]
                if kind == "lora":
                    p = (8 / 4) * up[e] @ (down[e] @ x)
                elif kind == "bottleneck":
                    p = up[e] @ F.silu(down[e] @ x)
                else:
                    p = up[e] @ glu(down[e] @ x, gate_up[e] @ x)
                y = y + p
            out[t] += gates[t, slot] * y
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kind, placement", [("lora", "parallel"), ("bottleneck", "parallel"),
                                             ("gated", "parallel"), ("lora", "inside")])
def test_embedded_equals_slow_reference(family, kind, placement, tiny_checkpoint):
    lm = _load(tiny_checkpoint(family))
    peft = attach(lm, _cfg("embedded", kind, placement))
    _randomize(peft)
    block = dict(lm.family.moe_blocks(lm.model))[1]
    bank = block.experts
    if placement == "inside":
        params = {k: (b.down, b.up) for k, b in bank.inside.items()}
        tensors = [t for pair in params.values() for t in pair]
    else:
        p = bank.parallel
        params = {"parallel": (p.down, getattr(p, "gate_up", None), p.up)}
        tensors = [t for t in params["parallel"] if t is not None]
    h = torch.randn(6, lm.config.hidden_size, generator=torch.Generator().manual_seed(3), requires_grad=True)
    fast = bank(h, *reversed(lm.family.router(block)(h)[1:]))
    fam_glu = lm.family.expert_glu(lm.config)  # the family's own form (gpt-oss), else act(gate)·up
    glu = fam_glu if fam_glu is not None else (lambda g, u: bank.act_fn(g) * u)
    slow = _reference_embedded(block, lm.family, h, params, kind, placement, glu, lm.family.expert_biases(
        dict(lm.family.moe_blocks(load_model(tiny_checkpoint(family)).model))[1]))
    assert_close(fast, slow, what="output")
    g_fast = torch.autograd.grad(fast.square().sum(), [h, *tensors])
    g_slow = torch.autograd.grad(slow.square().sum(), [h, *tensors])
    for a, b in zip(g_fast, g_slow):
        assert_close(a, b, what="gradient")
    # experts that no token was routed to get exactly zero gradient on their adapters
    h1 = h[:1].detach()
    _, _, idx1 = lm.family.router(block)(h1)
    unrouted = sorted(set(range(lm.family.num_experts(lm.config))) - set(idx1.flatten().tolist()))
    assert unrouted, "one token routes to top-2 of 4 experts"
    out1 = bank(h1, *reversed(lm.family.router(block)(h1)[1:]))
    grads = torch.autograd.grad(out1.square().sum(), tensors, allow_unused=True)
    for g in grads:
        assert g is not None
        assert torch.count_nonzero(g[unrouted]) == 0
        assert torch.count_nonzero(g[idx1.flatten()]) > 0


def test_routed_picks_exactly_k_and_balance_loss(tiny_checkpoint):
    lm = _load(tiny_checkpoint("olmoe"))
    peft = attach(lm, _cfg("routed", "lora", num_adapters=5, top_k=3, balance_loss=0.01))
    module = peft.routed[0]
    h = torch.randn(40, lm.config.hidden_size)
    probs, gates, idx = module.route(h)
    assert idx.shape == (40, 3)
    assert all(len(set(row.tolist())) == 3 for row in idx)  # k distinct adapters per token
    torch.testing.assert_close(gates.sum(-1), torch.ones(40))
    ids = _ids(lm.config.vocab_size)
    peft.clear_losses()
    lm.model(ids)
    stats = peft.routing_stats()
    assert sum(stats[0]["adapters"]) == ids.numel() * 3
    assert sum(stats[1]["experts"]) == ids.numel() * 2
    aux = peft.aux_loss()
    assert aux is not None and aux.item() > 0
    (g,) = torch.autograd.grad(aux, [module.router.weight])
    assert g.abs().sum() > 0
    # disabled: no balance loss at all, so it cannot move the router
    lm2 = _load(tiny_checkpoint("olmoe"))
    peft2 = attach(lm2, _cfg("routed", "lora", num_adapters=5, top_k=3, balance_loss=0.0))
    lm2.model(ids)
    assert peft2.aux_loss() is None


def test_routed_gates_without_renormalisation_are_router_probs(tiny_checkpoint):
    lm = _load(tiny_checkpoint("mixtral"))
    peft = attach(lm, _cfg("routed", "gated", renormalize=False))
    probs, gates, idx = peft.routed[0].route(torch.randn(7, lm.config.hidden_size))
    torch.testing.assert_close(gates, probs.gather(1, idx))


def test_balance_loss_values():
    # perfectly balanced: 4 tokens, 4 adapters, k=1, uniform probabilities -> 1.0
    probs = torch.full((4, 4), 0.25)
    assert balance_loss(probs, torch.arange(4).unsqueeze(1), 4).item() == pytest.approx(1.0)
    # all tokens on adapter 0 with certainty -> N
    probs = F.one_hot(torch.zeros(4, dtype=torch.long), 4).float()
    assert balance_loss(probs, torch.zeros(4, 1, dtype=torch.long), 4).item() == pytest.approx(4.0)


def test_base_router_balance_loss_and_training(tiny_checkpoint):
    lm = _load(tiny_checkpoint("qwen3_moe"))
    peft = attach(lm, _cfg("shared", "lora", base_balance_loss=0.01, train_router=True))
    names = [n for n, _ in peft.trainable_parameters()]
    assert "model.layers.0.mlp.gate.weight" in names
    lm.model(_ids(lm.config.vocab_size))
    aux = peft.aux_loss()
    router = lm.family.router(dict(lm.family.moe_blocks(lm.model))[0])
    (g,) = torch.autograd.grad(aux, [router.weight])
    assert g.abs().sum() > 0


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
@pytest.mark.parametrize("strategy, kind, placement", COMBOS)
def test_training_steps_lower_the_loss(family, strategy, kind, placement, tiny_checkpoint):
    torch.manual_seed(0)
    lm = _load(tiny_checkpoint(family))
    peft = attach(lm, _cfg(strategy, kind, placement, balance_loss=0.01))
    ids = _ids(lm.config.vocab_size, (4, 16), seed=1)
    opt = torch.optim.AdamW([p for _, p in peft.trainable_parameters()], lr=1e-2)
    losses = []
    for _ in range(6):
        out = lm.model(ids, labels=ids)
        aux = peft.aux_loss()
        loss = out.loss + (aux if aux is not None else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_save_load_identical_logits_and_wrong_base_refused(family, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(family)
    lm = _load(path)
    peft = attach(lm, _cfg("routed", "gated", attention_lora=True, layers=[1]))
    _randomize(peft, seed=5)
    ids = _ids(lm.config.vocab_size)
    with torch.no_grad():
        want = lm.model(ids).logits
    save_adapter(peft, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter.safetensors", "moetune.json"}
    lm2 = _load(path)
    peft2 = load_adapter(lm2, tmp_path)
    with torch.no_grad():
        got = lm2.model(ids).logits
    assert torch.equal(want, got)
    assert peft2.parameter_report() == peft.parameter_report()
    other = _load(tiny_checkpoint(family, experts=6))
    with pytest.raises(AdapterMismatchError, match="different config"):
        load_adapter(other, tmp_path)


def _closed_form(strategy, kind, placement, H, I, E, N, r, layers):
    per = {"lora": 2 * H * r, "bottleneck": 2 * H * r, "gated": 3 * H * r}[kind]
    if strategy == "shared":
        n = per
    elif strategy == "dense":
        n = N * per
    elif strategy == "routed":
        n = N * per + H * N
    elif placement == "inside":
        n = E * 3 * r * (H + I)
    else:
        n = E * per
    return n * layers


def attention_closed_form(cfg, r):
    """LoRA parameters r·(in + out) of one layer's attention projections, from the config alone: q/k/v/o, or
    MLA's q_proj (or q_a_proj + q_b_proj), kv_a_proj_with_mqa, kv_b_proj and o_proj."""
    H, heads = cfg.hidden_size, cfg.num_attention_heads
    if getattr(cfg, "kv_lora_rank", None):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = [(H, cfg.q_lora_rank), (cfg.q_lora_rank, heads * qk)] if cfg.q_lora_rank else [(H, heads * qk)]
        shapes = q + [(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                      (cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)), (heads * cfg.v_head_dim, H)]
    elif cfg.model_type == "gemma4_text":  # per-layer head_dim / kv heads: the first (sliding) layer's
        layer = cfg.per_layer_config[0]
        q, kv = heads * layer.head_dim, layer.num_key_value_heads * layer.head_dim
        shapes = [(H, q), (H, kv), (H, kv), (q, H)]
    else:
        hd = getattr(cfg, "head_dim", None) or H // heads
        q, kv = heads * hd, cfg.num_key_value_heads * hd
        gate = 2 if cfg.model_type in ("qwen3_5_moe_text", "qwen3_next") else 1  # q_proj also gives the output gate
        shapes = [(H, gate * q), (H, kv), (H, kv), (q, H)]
    return r * sum(i + o for i, o in shapes)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("strategy, kind, placement", COMBOS)
def test_trainable_counts_match_closed_form(family, strategy, kind, placement, tiny_checkpoint):
    lm = _load(tiny_checkpoint(family))
    f = lm.family.facts(lm.config)
    peft = attach(lm, _cfg(strategy, kind, placement, attention_lora=True, layers="every:2"))
    rep = peft.parameter_report()
    H, I, E, r = f.hidden_size, f.expert_intermediate_size, f.num_experts, 4
    want = _closed_form(strategy, kind, placement, H, I, E, 3, r, layers=1)  # every:2 of 2 MoE layers -> the first
    assert rep["by_group"][strategy] == want
    first = f.moe_layers[0]
    types = getattr(lm.config, "layer_types", None)  # Qwen3.5: linear-attention layers take no attention LoRA
    attention = 0 if types and types[first] == "linear_attention" else attention_closed_form(lm.config, r)
    assert rep["by_group"].get("attention", 0) == attention
    assert rep["trainable"] == want + attention
    assert rep["by_layer"] == {first: want + attention}
    assert rep["percent"] == pytest.approx(100 * rep["trainable"] / rep["base"])


@pytest.mark.parametrize("strategy, kind, placement", [("routed", "gated", "parallel"), ("embedded", "lora", "inside"),
                                                       ("dense", "bottleneck", "parallel")])
def test_adapters_are_fp32_masters_on_a_bf16_model(strategy, kind, placement, tiny_checkpoint):
    """On a bf16 model the adapters stay fp32 (small updates survive), compute in bf16, get fp32 gradients."""
    lm = load_model(tiny_checkpoint("mixtral"), dtype=torch.bfloat16)
    peft = attach(lm, _cfg(strategy, kind, placement, attention_lora=True))
    _randomize(peft)
    ids = _ids(lm.config.vocab_size)
    out = lm.model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    params = peft.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for _, p in params)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for _, p in params if p.grad is not None)
    assert sum(p.grad is not None for _, p in params) > len(params) // 2


@pytest.mark.parametrize("strategy, kind, placement", [("routed", "gated", "parallel"), ("embedded", "lora", "inside"),
                                                       ("shared", "bottleneck", "parallel")])
def test_disabled_gives_the_base_model_back_exactly(strategy, kind, placement, tiny_checkpoint):
    """`peft.disabled()`: every adapter (attention LoRA, a trained router included) steps aside; after the
    block the adapted model is back, bit for bit."""
    lm = _load(tiny_checkpoint("qwen2_moe"))
    ids = _ids(lm.config.vocab_size)
    with torch.no_grad():
        base = lm.model(ids).logits
    peft = attach(lm, _cfg(strategy, kind, placement, attention_lora=True, train_router=True))
    _randomize(peft)
    with torch.no_grad():
        adapted = lm.model(ids).logits
        with peft.disabled():
            off = lm.model(ids).logits
        again = lm.model(ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.equal(off, base) and torch.equal(again, adapted)


def test_sigmoid_router_balance_loss_uses_its_normalised_scores(tiny_checkpoint):
    """DeepSeek-V3's router scores each expert with a sigmoid: its base balance loss is transformers' load-balancing
    loss (E · Σ_e f_e · P_e, k when balanced) with P_e the mean of the scores normalised over the experts (DeepSeek-V3's
    sequence-wise balance loss, over the batch), f_e the share of tokens whose top-k (chosen with
    e_score_correction_bias) holds e — computed here by hand from the router's weight."""
    lm = _load(tiny_checkpoint("deepseek_v3"))
    peft = attach(lm, _cfg("shared", "lora", base_balance_loss=1.0))
    layer, block = next(lm.family.moe_blocks(lm.model))
    router = lm.family.router(block)
    h = torch.randn(15, lm.config.hidden_size, generator=torch.Generator().manual_seed(2))  # odd: f not uniform
    peft.clear_losses()
    _, gates, idx = router(h)
    scores = torch.sigmoid(h @ router.weight.T)
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)
    f = torch.bincount(idx.flatten(), minlength=4).float() / idx.shape[0]
    want = 4 * (f * P).sum()
    got = peft.aux_loss()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    softmax = 4 * (f * torch.softmax(h @ router.weight.T, -1).mean(0)).sum()
    assert abs(float(softmax - want)) > 1e-3  # a softmax reading of the sigmoid router's logits is caught
    # the chosen experts' gates: renormalised, times routed_scaling_factor
    torch.testing.assert_close(gates.sum(-1), torch.full((15,), lm.config.routed_scaling_factor))
    assert peft.routing_stats()[layer]["experts"] == torch.bincount(idx.flatten(), minlength=4).tolist()
    assert "sigmoid" in lm.family.router_note(lm.config)
