"""Expert parallelism on 2 gloo ranks (CPU), each given half of a batch, against one process on the whole
batch: the same logits and the same adapter gradients (the sharded ones gathered, the replicated ones summed
as the data-parallel all-reduce sums them), for NF4 and bf16 stores, embedded inside / parallel and shared;
a skewed batch (an expert fed by one rank only, one fed by none) and a batch that leaves one rank's experts
idle; memory really freed; the full adapter state gathered and scattered back; the norm clipped over the
ranks as one process clips it; and a clear error when expert_parallel does not divide the experts.

The two ranks run every case in one pair of spawned processes (module fixture), so the file stays fast."""

from __future__ import annotations

import gc
import multiprocessing as mp
import socket
import traceback
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import ConfigError, from_dict
from engine.model import load_model
from engine.adapters import attach

from .tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
#: [batch, seq]: each rank takes BATCH // WORLD rows
BATCH, SEQ = 4, 12
CLIP = 1e-3  # small enough that clipping always scales

CASES = {
    "mixtral-nf4-embedded-parallel": dict(family="mixtral", quant="nf4", strategy="embedded", kind="lora",
                                          placement="parallel", checkpointing=True),
    "olmoe-bf16-embedded-inside": dict(family="olmoe", quant="bf16", strategy="embedded", kind="lora",
                                       placement="inside"),
    "mixtral-bf16-shared": dict(family="mixtral", quant="bf16", strategy="shared", kind="lora", placement="parallel"),
    "olmoe-nf4-skewed": dict(family="olmoe", quant="nf4", strategy="embedded", kind="gated", placement="parallel",
                             routing="skewed", checkpointing=True),
    "mixtral-bf16-rank1-idle": dict(family="mixtral", quant="bf16", strategy="embedded", kind="bottleneck",
                                    placement="parallel", routing="first-experts"),
    # Gemma 4: the shared adapter hooks its layer's experts module, which sharding replaces
    "gemma4-bf16-shared": dict(family="gemma4", quant="bf16", strategy="shared", kind="lora", placement="parallel"),
}


# ---- one case, in one process (world 1: the reference) or on one rank ----------------------------------
def _config(case: dict):
    return from_dict({"model": {"quant": case["quant"], "expert_backend": "torch"},
                      "adapter": {"kind": case["kind"], "placement": case["placement"], "rank": 4, "alpha": 8},
                      "routing": {"strategy": case["strategy"], "top_k": 2}})


def _forced_routing(rule: str, token_rank):
    """A router hook that replaces the top-2 experts by a rule (gates: the router's renormalised probabilities):
    `skewed`: rank 0's tokens use experts (0, 2) / (1, 0), rank 1's (0, 1) / (1, 0): expert 2 (on rank 1) gets
    tokens from rank 0 only, expert 3 none; `first-experts`: every token uses (0, 1) / (1, 0): rank 1's experts
    get nothing at all."""

    def hook(module, args, output):
        logits, _, _ = output
        T = logits.shape[0]
        odd = torch.arange(T) % 2 == 1
        first = torch.where(odd, 1, 0)
        second = torch.where(odd, 0, 1)
        if rule == "skewed":
            second = torch.where(~odd & (token_rank(T) == 0), 2, second)
        idx = torch.stack([first, second], dim=1).to(logits.device)
        w = F.softmax(logits.float(), dim=-1).gather(1, idx)
        return logits, (w / w.sum(-1, keepdim=True)).to(output[1].dtype), idx

    return hook


def run_case(name: str, ckpt: Path, ids: torch.Tensor, rank: int = 0, world: int = 1) -> dict:
    """Forward + backward of the case on this rank's rows of `ids` (all of them in one process): logits, the
    full adapter gradients (gathered / summed over the ranks), values, used rows, clipped gradients and memory."""
    import torch.distributed as dist

    from engine.training import expert_parallel as ep

    case = CASES[name]
    torch.manual_seed(0)
    lm = load_model(ckpt)
    peft = attach(lm, _config(case))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every adapter tensor random (zero-initialised ups too), the same on every rank
        for _, p in peft.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    per = ids.shape[0] // world
    token_rank = (lambda T: torch.full((T,), rank)) if world > 1 else (lambda T: torch.arange(T) // (T // WORLD))
    if "routing" in case:
        for _, block in peft.family.moe_blocks(lm.model):
            peft.family.router(block).register_forward_hook(_forced_routing(case["routing"], token_rank))
    out: dict = {}
    if world > 1:
        full = {layer: bank.store.nbytes() for layer, bank in peft.banks.items()}
        ref = None
        if case["quant"] == "nf4":
            ref = weakref.ref(next(iter(peft.banks.values())).store.tensors["gate_up.weight"])
        ep.shard_experts(peft, None)
        gc.collect()
        out["store_bytes"] = {layer: (full[layer], bank.store.nbytes()) for layer, bank in peft.banks.items()}
        out["full_store_freed"] = None if ref is None else ref() is None
        out["shapes"] = {n: (tuple(p.shape), ep.is_sharded(p)) for n, p in peft.trainable_parameters()}
    model = lm.model
    model.train()
    if case.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    needs_grad: dict[int, bool] = {}  # per MoE layer: whether its experts' input needs a gradient
    for layer, bank in peft.banks.items():
        bank.register_forward_pre_hook(lambda m, args, layer=layer: needs_grad.__setitem__(layer, args[0].requires_grad))
    mine = ids[rank * per:(rank + 1) * per]
    ep.EXCHANGES.update(forward=0, backward=0)
    logits = model(input_ids=mine).logits
    targets = ids[:, 1:].numel()  # the global count: each rank's sum over the whole batch's count
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), mine[:, 1:].reshape(-1),
                           reduction="sum") / targets
    loss.backward()
    out["exchanges"] = (ep.EXCHANGES["forward"], ep.EXCHANGES["backward"])
    # backward exchanges to expect: both reverses where the input needs a gradient, else the results' one
    # where the bank trains adapters
    out["expected_backward"] = sum(2 if needs_grad[layer] else int(any(p.requires_grad for p in bank.parameters()))
                                   for layer, bank in peft.banks.items())
    params = peft.trainable_parameters()
    if world > 1:
        for _, p in params:  # what data parallel does with the replicated gradients: sum them
            if not ep.is_sharded(p):
                dist.all_reduce(p.grad)

    def full_grads():  # an adapter no token reached has no gradient: zeros, as one process's rows
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in params}
        if world == 1:
            return {n: g.clone() for n, g in grads.items()}
        return {n: ep.gather_rows(g, None, dst=None) if ep.is_sharded(p) else g.clone()
                for (n, p), g in zip(params, grads.values())}

    out["logits"] = logits.detach()
    out["no_grad"] = sorted(n for n, p in params if p.grad is None)
    out["grads"] = full_grads()
    out["touched"] = {}
    for layer, bank in peft.banks.items():
        if bank.parallel is not None:
            rows = sorted(bank.parallel.touched)
            if world > 1:
                everyone = [None] * world
                dist.all_gather_object(everyone, [bank.shard.first + r for r in rows])
                rows = sorted(r for got in everyone for r in got)
            out["touched"][layer] = rows
    if world > 1:
        out["received"] = {layer: bank.last_received for layer, bank in peft.banks.items()}
        out["state"] = ep.gather_expert_state(peft)
        bumped = {n: t + 1 for n, t in out["state"].items()}
        ep.scatter_expert_state(peft, bumped if rank == 0 else {})
        out["state_after_scatter"] = ep.gather_expert_state(peft)
        try:
            ep.scatter_expert_state(peft, dict(list(bumped.items())[1:]) if rank == 0 else {})
            out["mismatch_error"] = None
        except ValueError as e:
            out["mismatch_error"] = str(e)
        out["norm"] = float(ep.clip_grad_norm([p for _, p in params], CLIP))
    else:
        out["state"] = {n: p.detach().clone() for n, p in params}
        out["norm"] = float(torch.nn.utils.clip_grad_norm_([p for _, p in params], CLIP))
    out["clipped"] = full_grads()
    return out


def _worker(rank: int, port: int, ckpts: dict, ids: torch.Tensor, folder: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        for name in CASES:
            torch.save(run_case(name, ckpts[name], ids, rank, WORLD), Path(folder) / f"{name}-{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(folder) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(case["family"]) for name, case in CASES.items()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 500, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ranks(checkpoints, ids, tmp_path_factory):
    """name -> [rank 0's results, rank 1's]: every case on 2 gloo ranks, in one pair of processes."""
    folder = tmp_path_factory.mktemp("ep")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, checkpoints, ids, str(folder))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [f.read_text() for f in sorted(folder.glob("error-*.txt"))]
    assert not hung and not errors and all(p.exitcode == 0 for p in procs), \
        f"ranks {hung} hung; " + "\n".join(errors)
    return {name: [torch.load(folder / f"{name}-{r}.pt", weights_only=False) for r in range(WORLD)]
            for name in CASES}


@pytest.fixture(scope="module")
def references(checkpoints, ids):
    return {name: run_case(name, checkpoints[name], ids) for name in CASES}


# ---- the facts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_one_process_on_the_whole_batch(name, ranks, references):
    got = torch.cat([r["logits"] for r in ranks[name]])
    assert_close(got, references[name]["logits"], what=f"{name} logits")


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_gradients_equal_one_process(name, ranks, references):
    ref = references[name]["grads"]
    for r in ranks[name]:
        assert set(r["grads"]) == set(ref)
        for n, g in r["grads"].items():
            assert g.shape == ref[n].shape, n
            assert ref[n].abs().max() > 0, n  # every adapter tensor gets a gradient
            assert_close(g, ref[n], what=f"{name} grad {n}")


@pytest.mark.parametrize("name", list(CASES))
def test_clipping_uses_the_norm_over_all_ranks(name, ranks, references):
    ref = references[name]
    for r in ranks[name]:
        assert r["norm"] == pytest.approx(ref["norm"], rel=1e-5) and r["norm"] > CLIP
        for n, g in r["clipped"].items():
            assert_close(g, ref["clipped"][n], what=f"{name} clipped grad {n}")


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_takes_part_in_every_exchange(name, ranks, references):
    """Whatever each rank's routing, both ranks run the same token exchanges forward and backward (on NCCL a
    rank that skipped one would hang the job, on gloo it would corrupt the next): 2 a layer forward (2 more for
    each layer recomputed by gradient checkpointing), and backward the reverses that one process's graph has."""
    layers = len(ranks[name][0]["received"])
    forward = 2 * layers * (2 if CASES[name].get("checkpointing") else 1)
    backward = references[name]["expected_backward"]
    assert backward >= layers
    assert [r["exchanges"] for r in ranks[name]] == [(forward, backward)] * WORLD


def test_skewed_batch_an_expert_fed_by_one_rank_and_one_fed_by_none(ranks, references):
    name = "olmoe-nf4-skewed"
    ref = references[name]
    rank0, rank1 = ranks[name]
    for layer, rows in ref["touched"].items():
        assert rows == [0, 1, 2]  # expert 3 got nothing, one process or two
        assert rank0["touched"][layer] == rows
    # rank 1 owns experts 2 and 3: it received only the rank-0 tokens routed to expert 2 (half of them)
    T = SEQ * BATCH // WORLD  # tokens per rank, 2 pairs each
    assert set(rank1["received"].values()) == {T // 2}, rank1["received"]
    # rank 0 owns experts 0 and 1: all of rank 1's pairs, and rank 0's pairs but those sent to expert 2
    assert set(rank0["received"].values()) == {2 * T + 2 * T - T // 2}, rank0["received"]
    for n, g in rank0["grads"].items():
        if n.endswith(("parallel.down", "parallel.up", "parallel.gate_up")):
            assert torch.count_nonzero(g[3]) == 0 and torch.count_nonzero(g[2]) > 0, n  # row 3: no token


def test_a_rank_whose_experts_get_no_token_still_exchanges_and_backpropagates(ranks, references):
    name = "mixtral-bf16-rank1-idle"
    rank0, rank1 = ranks[name]
    assert set(rank1["received"].values()) == {0}
    assert all(rows == [0, 1] for rows in rank0["touched"].values())
    assert all(rows == [0, 1] for rows in references[name]["touched"].values())


@pytest.mark.parametrize("name", ["mixtral-nf4-embedded-parallel", "olmoe-bf16-embedded-inside",
                                  "mixtral-bf16-shared"])
def test_each_rank_keeps_half_the_experts_and_frees_the_rest(name, ranks):
    for r in ranks[name]:
        for layer, (full, kept) in r["store_bytes"].items():
            tables = 4 * (16 + 256) if CASES[name]["quant"] == "nf4" else 0  # the NF4 code tables, kept whole
            assert kept - tables == (full - tables) // WORLD, (layer, full, kept)
        if r["full_store_freed"] is not None:
            assert r["full_store_freed"], "the full NF4 store is still alive after sharding"
    ref_shapes = {n: tuple(t.shape) for n, t in ranks[name][0]["state"].items()}
    for n, (shape, sharded) in ranks[name][0]["shapes"].items():
        per_expert = CASES[name]["strategy"] == "embedded" and ".experts." in n
        assert sharded == per_expert, n
        assert shape == ((ref_shapes[n][0] // WORLD, *ref_shapes[n][1:]) if per_expert else ref_shapes[n]), n


@pytest.mark.parametrize("name", ["mixtral-nf4-embedded-parallel", "olmoe-bf16-embedded-inside"])
def test_gathered_state_is_one_process_state_and_scatters_back(name, ranks, references):
    rank0, rank1 = ranks[name]
    assert rank1["state"] == {} and rank1["state_after_scatter"] == {}
    ref = references[name]["state"]
    assert set(rank0["state"]) == set(ref)
    for n, t in rank0["state"].items():
        assert torch.equal(t, ref[n]), n
        assert torch.equal(rank0["state_after_scatter"][n], ref[n] + 1), n
    for r in ranks[name]:  # a state that does not match: the same one-line error on every rank, no hang
        assert r["mismatch_error"] and "missing" in r["mismatch_error"]


def test_expert_parallel_must_divide_the_experts_and_equal_the_world():
    from engine.config import check_expert_parallel

    with pytest.raises(ConfigError, match=r"^train\.expert_parallel: 3 does not divide the model's 8 experts; "
                                          r"choose one of 1, 2, 4, 8\.$"):
        check_expert_parallel(3, num_experts=8)
    for world in (3, 4):  # the experts are split over every rank of the job: no hybrid of replicas and shards
        with pytest.raises(ConfigError, match=rf"^train\.expert_parallel: 2 needs a job of exactly 2 ranks \(this one "
                                              rf"has {world}\)"):
            check_expert_parallel(2, world_size=world)
    check_expert_parallel(2, world_size=2, num_experts=8)
    check_expert_parallel(1, world_size=4, num_experts=8)
    with pytest.raises(ConfigError, match=r"train\.expert_parallel: 0 is out of range"):
        from_dict({"train": {"expert_parallel": 0}})
    with pytest.raises(ConfigError, match=r"train\.expert_parallel: expected an integer"):
        from_dict({"train": {"expert_parallel": 1.5}})
