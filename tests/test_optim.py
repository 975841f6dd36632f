"""SparseAdamW: AdamW on dense parameters and always-used rows, untouched adapter rows frozen bit for
bit (value, moments, step), per-row bias correction when a row is routed again, state-dict round trip."""

from __future__ import annotations

import copy
import io

import torch

from engine.adapters.banks import AdapterBank
from engine.training import SparseAdamW, sparse_params_of

HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def _bank(num=4, seed=0):
    torch.manual_seed(seed)
    bank = AdapterBank("gated", num, 6, 5, rank=3)
    with torch.no_grad():
        bank.up.normal_(0, 0.3)  # non-zero ups, so every touched row gets a non-zero gradient
    return bank


def _use(bank, rows, seed):
    """A loss through adapters `rows` of the bank; backward fills the grads (and marks the rows)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((bank.forward_one(torch.randn(3, bank.d_in, generator=g), r) ** 2).sum() for r in rows)
    loss.backward()


def _state(opt, p):
    s = opt.state[p]
    return s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone()


def test_dense_and_always_touched_rows_equal_torch_adamw():
    torch.manual_seed(0)
    dense = torch.nn.Parameter(torch.randn(5, 3))
    ours_bank, ref_bank = _bank(), _bank()
    ref_dense = torch.nn.Parameter(dense.detach().clone())
    opt = SparseAdamW([dense, *ours_bank.parameters()], **HP, sparse_params=sparse_params_of(ours_bank))
    ref = torch.optim.AdamW([ref_dense, *ref_bank.parameters()], foreach=False, **HP)
    assert all(opt.is_sparse(p) for p in ours_bank.parameters()) and not opt.is_sparse(dense)
    for step in range(5):
        for d, bank, o in ((dense, ours_bank, opt), (ref_dense, ref_bank, ref)):
            o.zero_grad()
            _use(bank, range(bank.num), seed=step)
            (d.sin().sum() * (step + 1)).backward()
            o.step()
        assert torch.equal(dense, ref_dense)
        for p, q in zip(ours_bank.parameters(), ref_bank.parameters()):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
            assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


def test_zero_gradient_on_a_used_row_still_counts_as_a_step():
    """Fresh LoRA: B = 0, so A's gradient is exactly zero on used rows; AdamW still steps them."""
    torch.manual_seed(0)
    ours, ref = AdapterBank("lora", 3, 4, 4, rank=2), AdapterBank("lora", 3, 4, 4, rank=2)
    ref.load_state_dict(ours.state_dict())
    opt = SparseAdamW(ours.parameters(), **HP, sparse_params=sparse_params_of(ours))
    ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **HP)
    for step in range(3):
        for bank, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            _use(bank, range(3), seed=step)
            o.step()
    assert torch.equal(opt.state[ours.down]["step"], torch.full((3,), 3.0))
    assert torch.equal(ours.down, ref.down) and torch.equal(ours.up, ref.up)


def test_untouched_rows_and_moments_do_not_change():
    bank = _bank()
    opt = SparseAdamW(bank.parameters(), **HP, sparse_params=sparse_params_of(bank))
    _use(bank, [0, 1, 2], seed=0)
    opt.step()
    opt.zero_grad()
    params = [p for p in bank.parameters()]
    before = {id(p): (p.detach().clone(), *_state(opt, p)) for p in params}
    # step 2 uses adapters 1 and 2 only: rows 0 and 3 must not move at all
    _use(bank, [1, 2], seed=1)
    assert bank.touched == {1, 2}
    opt.step()
    assert bank.touched == set()  # consumed by the step
    for p in params:
        value, m, v, step = before[id(p)]
        m1, v1, step1 = _state(opt, p)
        for r in (0, 3):
            assert torch.equal(p[r], value[r])
            assert torch.equal(m1[r], m[r]) and torch.equal(v1[r], v[r])
            assert step1[r] == step[r]
        assert torch.count_nonzero(m[0]) > 0  # row 0 has moments that plain AdamW would have decayed
        for r in (1, 2):
            assert not torch.equal(p[r], value[r]) and step1[r] == step[r] + 1
    assert torch.equal(opt.state[bank.down]["step"], torch.tensor([1.0, 2.0, 2.0, 0.0]))
    # a forward without autograd (evaluation) marks nothing
    with torch.no_grad():
        bank.forward_one(torch.randn(2, bank.d_in), 3)
    assert bank.touched == set()


def test_row_routed_again_continues_its_own_bias_correction():
    """Row 2, used at steps 1, 2 and 4, ends exactly where AdamW on that row alone ends after 3 updates."""
    bank = _bank()
    solo = torch.nn.Parameter(bank.down[2].detach().clone())
    opt = SparseAdamW(bank.parameters(), **HP, sparse_params=sparse_params_of(bank))
    ref = torch.optim.AdamW([solo], foreach=False, **HP)
    schedule = [[0, 2], [2, 3], [0, 1], [1, 2]]
    for step, rows in enumerate(schedule):
        opt.zero_grad()
        _use(bank, rows, seed=step)
        if 2 in rows:
            solo.grad = bank.down.grad[2].clone()
            ref.step()
        opt.step()
    assert opt.state[bank.down]["step"][2] == 3
    assert torch.equal(bank.down[2], solo)
    assert torch.equal(opt.state[bank.down]["exp_avg"][2], ref.state[solo]["exp_avg"])


def test_rows_without_a_bank_follow_nonzero_gradients():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SparseAdamW([p], **HP, sparse_params=[p])
    before = p.detach().clone()
    p.grad = torch.zeros(4, 3)
    p.grad[1] = 1.0
    opt.step()
    assert torch.equal(opt.state[p]["step"], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(p[[0, 2, 3]], before[[0, 2, 3]]) and not torch.equal(p[1], before[1])


def test_state_dict_round_trip_continues_identically():
    bank = _bank()
    opt = SparseAdamW(bank.parameters(), **HP, sparse_params=sparse_params_of(bank))
    schedule = [[0, 1], [1, 3], [2], [0, 3]]
    for step, rows in enumerate(schedule[:2]):
        opt.zero_grad()
        _use(bank, rows, seed=step)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": bank.state_dict(), "opt": opt.state_dict()}, buf)
    twin = copy.deepcopy(bank)
    buf.seek(0)
    saved = torch.load(buf)
    twin.load_state_dict(saved["model"])
    twin_opt = SparseAdamW(twin.parameters(), **HP, sparse_params=sparse_params_of(twin))
    twin_opt.load_state_dict(saved["opt"])
    assert twin_opt.state[twin.down]["step"].dtype == torch.float32
    for step, rows in enumerate(schedule[2:], start=2):
        for b, o in ((bank, opt), (twin, twin_opt)):
            o.zero_grad()
            _use(b, rows, seed=step)
            o.step()
    for p, q in zip(bank.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], twin_opt.state[q][key])
