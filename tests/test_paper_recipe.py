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

from .tolerance import assert_close

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


# ---- item 2: balance losses on transformers' scale -------------------------------------------------------------
def _padded_ids(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe"])
def test_balance_losses_equal_transformers_load_balancing_loss_func(family, tiny_checkpoint):
    """Both routers' losses against transformers' own function on the same logits (pads masked as it masks them),
    values and gradients: the base router's against the model's own `output_router_logits` aux loss."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    lm = load_model(tiny_checkpoint(family, layers=3))
    peft = attach(lm, _cfg("routed", rank=4, num_adapters=4, top_k=2, balance_loss=0.01, base_balance_loss=0.02,
                           attention_lora=True))
    torch.manual_seed(1)
    with torch.no_grad():  # routers far from uniform, so the loss is not k by accident
        for r in peft.routed.values():
            r.router.weight.mul_(30)
    inputs = []  # the routed routers' inputs, to give transformers their logits
    for r in peft.routed.values():
        r.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    ids, mask = _padded_ids(lm.config.vocab_size)
    facts, params = peft.facts, [p for _, p in peft.trainable_parameters()]

    def losses():  # (ours, transformers') from one forward
        inputs.clear()
        peft.balance_begin(mask)
        out = lm.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        ours = peft.aux_loss()
        peft.clear_losses()
        base = load_balancing_loss_func(out.router_logits, facts.num_experts, facts.top_k, mask)
        routed_logits = tuple(h @ r.router.weight.T for h, r in zip(inputs, peft.routed.values()))
        assert len(out.router_logits) == len(routed_logits) == 3
        routed = load_balancing_loss_func(routed_logits, 4, 2, mask)
        assert abs(routed.item() - 2.0) > 1e-3  # k = 2 when balanced: these routers are not
        return ours, 0.02 * base + 0.01 * routed

    ours, want = losses()
    assert ours.item() == pytest.approx(want.item(), rel=1e-5)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    g_want = torch.autograd.grad(losses()[1], params, allow_unused=True)
    assert sum(g is not None for g in g_ours) > 3  # the routed routers, and the adapters before each router
    for a, b in zip(g_ours, g_want):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, ulps=1024, what="balance-loss gradient")


def test_balanced_routing_scores_k():
    from engine.adapters.balance import BalanceTerm

    for k in (1, 2, 4):
        term = BalanceTerm(8, k, coef=1.0)
        for _ in range(3):  # three layers, each perfectly balanced: uniform probabilities, every expert k/8 of slots
            probs = torch.full((16, 8), 1 / 8, requires_grad=True)
            idx = (torch.arange(16 * k) % 8).reshape(16, k)
            term.record(probs, idx)
        assert term.loss().item() == pytest.approx(k)
    old = BalanceTerm(8, 2, coef=1.0, scale=1)  # the per-layer scale before issue 22: 1 a layer, summed
    for _ in range(3):
        old.record(torch.full((16, 8), 1 / 8, requires_grad=True), (torch.arange(32) % 8).reshape(16, 2))
    assert old.loss().item() == pytest.approx(3.0)


def test_a_run_from_before_the_scale_change_resumes_on_its_own_scale(tiny_checkpoint, tmp_path, monkeypatch):
    """A checkpoint without `balance_scale` (written before issue 22) resumes on the per-layer scale, with a
    warning: its steps equal those of a run that trained on that scale throughout; new checkpoints record 2."""
    import hashlib
    import json

    from engine.data.synthetic import last_digit_rows
    from engine.runs import read_events
    from engine.training import loop, train
    from engine.training.checkpoint import checkpoint_dir

    (tmp_path / "train.json").write_text(json.dumps(last_digit_rows(32, seed=1)))
    cfg = from_dict({"model": {"path": str(tiny_checkpoint("qwen3_moe", layers=4)), "quant": "bf16"},
                     "adapter": {"rank": 4, "alpha": 8},
                     "routing": {"strategy": "routed", "num_adapters": 4, "balance_loss": 0.05, "base_balance_loss": 0.05},
                     "data": {"train": str(tmp_path / "train.json"), "max_len": 128},
                     "train": {"max_steps": 4, "lr": 3e-3, "micro_batch": 4, "save_every": 2,
                               "gradient_checkpointing": False}})
    setup = loop.setup

    def per_layer_setup(*args, **kwargs):  # MoETune before issue 22
        job = setup(*args, **kwargs)
        job.peft.set_balance_scale(1)
        return job

    def steps(run):
        events = read_events(run / "events.jsonl")[0]
        return {e["step"]: (e["loss"], e["balance_loss"]) for e in events if e["type"] == "step"}, events

    with monkeypatch.context() as m:
        m.setattr(loop, "setup", per_layer_setup)
        train(cfg, tmp_path / "old", echo=False)
        train(cfg, tmp_path / "parts", echo=False, stop_after=2)
    ck = checkpoint_dir(tmp_path / "parts", 2)
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state.pop("balance_scale") == 1  # as a checkpoint written before the field existed
    (ck / "trainer_state.json").write_text(json.dumps(state))
    sums = json.loads((ck / "checksums.json").read_text())
    sums["trainer_state.json"] = hashlib.sha256((ck / "trainer_state.json").read_bytes()).hexdigest()
    (ck / "checksums.json").write_text(json.dumps(sums))
    train(cfg, tmp_path / "parts", resume=True, echo=False)
    old, _ = steps(tmp_path / "old")
    parts, events = steps(tmp_path / "parts")
    assert parts == old
    assert any(e["type"] == "warning" and "per-layer" in e["message"] for e in events)
    new, new_events = steps(train(cfg, tmp_path / "new", echo=False) and tmp_path / "new")
    # the same first loss; the new balance loss is about k/L = 1/2 of the old at 4 layers and top-2
    assert new[1][0] == old[1][0] and 0.4 < new[1][1] / old[1][1] < 0.6, (new[1], old[1])
    assert [e["balance_scale"] for e in new_events if e["type"] == "start"] == [2]
    assert json.loads((checkpoint_dir(tmp_path / "new", 4) / "trainer_state.json").read_text())["balance_scale"] == 2


# ---- item 3: data.train_on_prompt -------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["alpaca", "llm-adapters", "chat"])
def test_train_on_prompt_labels_every_token(template, tmp_path, tokenizer):
    import json

    from engine.data import IGNORE_INDEX, load_examples

    rows = ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
            if template == "chat" else
            [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "answer": "5"},
             {"instruction": "Name a colour.", "input": "", "output": "Blue.", "answer": "Blue."}])
    f = tmp_path / "rows.json"
    f.write_text(json.dumps(rows))
    response, r_stats = load_examples(f, tokenizer, template, 256)
    everything, e_stats = load_examples(f, tokenizer, template, 256, train_on_prompt=True)
    for r, e in zip(response, everything):
        assert e.input_ids == r.input_ids and e.labels == e.input_ids  # the prompt is learned too
        assert IGNORE_INDEX in r.labels  # the default still masks it
        assert [t for t in r.labels if t != IGNORE_INDEX] == e.labels[len(e.labels) - len(
            [t for t in r.labels if t != IGNORE_INDEX]):]
    assert e_stats["trained_tokens"] == e_stats["tokens"] > r_stats["trained_tokens"]
    assert e_stats["train_on_prompt"] and not r_stats["train_on_prompt"]


def test_train_on_prompt_reaches_the_trainer(tiny_checkpoint, tmp_path):
    """The config field: the run's training set labels the prompt (its `start` event says so), while the held-out
    loss stays on the response, equal to a response-only run's held-out loss before any step."""
    import json

    from engine.data.synthetic import last_digit_rows
    from engine.runs import read_events
    from engine.training import train

    (tmp_path / "train.json").write_text(json.dumps(last_digit_rows(16, seed=1)))
    (tmp_path / "eval.json").write_text(json.dumps(last_digit_rows(8, seed=2)))
    evals, starts = [], []
    for on in (False, True):
        cfg = from_dict({"model": {"path": str(tiny_checkpoint("olmoe")), "quant": "bf16"},
                         "routing": {"strategy": "shared"}, "adapter": {"rank": 2, "alpha": 4},
                         "data": {"train": str(tmp_path / "train.json"), "eval": str(tmp_path / "eval.json"),
                                  "max_len": 128, "train_on_prompt": on},
                         "train": {"max_steps": 1, "lr": 0.0, "micro_batch": 4, "gradient_checkpointing": False}})
        events = read_events(train(cfg, tmp_path / f"run-{on}", echo=False) and tmp_path / f"run-{on}" / "events.jsonl")[0]
        starts.append(next(e for e in events if e["type"] == "start")["data"])
        evals.append(next(e["eval_loss"] for e in events if e["type"] == "eval"))
    assert not starts[0]["train_on_prompt"] and starts[1]["train_on_prompt"]
    assert starts[1]["trained_tokens"] == starts[1]["tokens"] > 2 * starts[0]["trained_tokens"]
    assert evals[0] == evals[1]  # lr 0: the same adapter; the held-out loss takes the same (response) tokens
