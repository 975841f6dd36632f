"""The planted-structure experiment behind tests/test_planted.py (issue 22, item 5).

One frozen Qwen3-MoE block (a real family's MoE layer, from a tiny config: hidden 32, 8 experts, top-2) and
inputs its router separates: each input is a cluster centre that the router sends to a chosen expert first,
plus noise that lives in the directions the router does not read (so the noise moves the output, not the
routing). A target is the block's own output plus a known change of one kind:

- `shared`:   one rank-12 linear change U Vᵀ x, the same for every token;
- `expert`:   a different rank-2 change per expert, weighted by the MoE's own top-k gates,
              Σ_{e ∈ topk(x)} g_e(x) U_e V_eᵀ x (what `embedded` adds, computed here from the router's output);
- `routed`:   4 rank-2 changes picked top-2 by a second router that reads only the noise directions, so its
              partition of the inputs is independent of the MoE's (what `routed` adds, with a router to find).

Each strategy is attached with engine.adapters.attach (the real modules: ParallelAdapters, RoutedAdapters, the
ExpertBank's per-expert banks), at matched trainable parameters (engine.sweep.match_rank, the sweep's own
matching), trained with Adam on the adapter parameters at each lr of a small grid; the lr is picked on a
validation set and the loss reported on a separate test set. Loss = mean squared error to the target divided by
the change's own mean square (1.0: nothing of the change learnt; 0: all of it).

    .venv/bin/python -m tests.planted     # prints the table (about 40 s on one core)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

HIDDEN, EXPERTS, TOP_K = 32, 8, 2
TARGET_PARAMS = 1100  # embedded rank 2 = 1,024; shared rank 17 = 1,088; dense 4 x rank 4; routed 4 x rank 4 + router
STRATEGIES = {  # name: config overrides (attention-free: the change lives in the MoE layer)
    "shared": ["routing.strategy=shared"],
    "dense": ["routing.strategy=dense", "routing.num_adapters=4"],
    "routed": ["routing.strategy=routed", "routing.num_adapters=4", "routing.top_k=2"],
    "embedded": ["routing.strategy=embedded", "adapter.placement=parallel"],
    "embedded-inside": ["routing.strategy=embedded", "adapter.placement=inside"],
}
CHANGES = ("shared", "expert", "routed")
LRS = (3e-3, 1e-2, 3e-2)
STEPS = 150
N_TRAIN, N_VAL, N_TEST = 1024, 512, 1024


@dataclass
class Fit:
    strategy: str
    change: str
    rank: int
    trainable: int
    lr: float
    val: dict  # lr -> validation loss
    test: float


def build_block(tmp: Path, seed: int = 0):
    """A 1-layer Qwen3-MoE (random weights, seed) written as config.json into `tmp`, returned loaded."""
    from engine.model import LoadedModel, get_family, tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3_moe", layers=1, hidden=HIDDEN, experts=EXPERTS, top_k=TOP_K, vocab_size=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    config.save_pretrained(tmp)
    return lambda: LoadedModel(_copy(model), get_family("qwen3_moe"), tmp)


def _copy(model):
    import copy

    return copy.deepcopy(model)


class Inputs:
    """Token vectors the block's router separates: centre of cluster m (routed to expert m first, a fixed second
    expert) in the router's row space, plus noise in its orthogonal complement (invisible to the router)."""

    def __init__(self, router_weight: torch.Tensor, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        W = router_weight.detach().double()  # [E, H]
        E, H = W.shape
        q, _ = torch.linalg.qr(W.T)  # [H, E]: an orthonormal basis of the router's row space
        self.row_basis = q.float()
        self.null_proj = (torch.eye(H, dtype=torch.float64) - q @ q.T).float()  # onto what the router cannot see
        logits = torch.randn(E, E, generator=g, dtype=torch.float64) * 0.5
        logits += torch.eye(E, dtype=torch.float64) * 4.0  # expert m clearly first for cluster m
        self.centres = (torch.linalg.pinv(W) @ logits.T).T.float()  # [E, H], W c_m = logits[m]
        self.seed = seed

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n vectors [n, H] and their cluster labels."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, self.centres.shape[0], (n,), generator=g)
        noise = torch.randn(n, self.centres.shape[1], generator=g) @ self.null_proj.T
        return self.centres[labels] + noise, labels


def _low_rank(n: int, rank: int, g: torch.Generator) -> torch.Tensor:
    """n random maps H -> H of the given rank, [n, H, H]."""
    U = torch.randn(n, HIDDEN, rank, generator=g)
    V = torch.randn(n, HIDDEN, rank, generator=g)
    return U @ V.transpose(1, 2) / HIDDEN


class Changes:
    """The three planted changes, computed from the frozen router's output (never from the code under test)."""

    def __init__(self, router, inputs: Inputs, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.router = router
        self.M_shared = _low_rank(1, 12, g)[0]
        self.M_expert = _low_rank(EXPERTS, 2, g)
        self.M_routed = _low_rank(4, 2, g)
        # the second router reads only the noise directions: its partition is independent of the MoE's
        self.W_t = torch.randn(4, HIDDEN, generator=g) @ inputs.null_proj * 1.5
        self.scale: dict[str, float] = {}

    @torch.no_grad()
    def raw(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == "shared":
            return x @ self.M_shared.T
        if kind == "expert":
            _, gates, idx = self.router(x)
            per = torch.einsum("eij,tj->tei", self.M_expert, x)  # every expert's change [T, E, H]
            return (gates.unsqueeze(-1) * per.gather(1, idx.unsqueeze(-1).expand(-1, -1, HIDDEN))).sum(1)
        probs = torch.softmax(x @ self.W_t.T, dim=-1)
        top, idx = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        per = torch.einsum("eij,tj->tei", self.M_routed, x)
        return (top.unsqueeze(-1) * per.gather(1, idx.unsqueeze(-1).expand(-1, -1, HIDDEN))).sum(1)

    def __call__(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The change, scaled to a mean square of 1 on the first inputs it sees."""
        d = self.raw(kind, x)
        if kind not in self.scale:
            self.scale[kind] = float(d.pow(2).mean().rsqrt())
        return d * self.scale[kind]


def match(model_dir: Path, overrides: list[str]):
    """The sweep's rank matching (engine.sweep.match_rank) at TARGET_PARAMS, α = 2r."""
    from engine.sweep import match_rank

    data = {"model": {"path": str(model_dir), "quant": "bf16"}, "adapter": {"kind": "lora", "rank": 1, "alpha": 2}}
    return match_rank(data, overrides, TARGET_PARAMS)


def train_one(make_loaded, overrides, rank, alpha, x, targets, lr, seed=0):
    """Attach one strategy, train its adapters with Adam on (x, target) full-batch; returns (peft, block)."""
    from engine.adapters import attach
    from engine.config import apply_overrides, from_dict

    cfg = from_dict(apply_overrides({"model": {"quant": "bf16"}, "adapter": {"kind": "lora", "rank": rank,
                                                                              "alpha": alpha}}, overrides))
    loaded = make_loaded()
    torch.manual_seed(seed)
    peft = attach(loaded, cfg)
    (_, block), = loaded.family.moe_blocks(loaded.model)
    params = [p for _, p in peft.trainable_parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(STEPS):
        loss = (block(x[None])[0] - targets).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return peft, block


@torch.no_grad()
def rel_loss(block, x, target, change):
    return float((block(x[None])[0] - target).pow(2).mean() / change.pow(2).mean())


def run(tmp: Path, strategies=STRATEGIES, changes=CHANGES, lrs=LRS, seed: int = 0,
        log=print) -> dict[tuple[str, str], Fit]:
    """Every strategy on every change, each at its best lr on the validation set: {(strategy, change): Fit}.
    `seed` draws the block's weights, the inputs and the changes."""
    make_loaded = build_block(tmp, seed)
    probe = make_loaded()
    (_, block0), = probe.family.moe_blocks(probe.model)
    router = probe.family.router(block0)
    inputs = Inputs(router.weight, seed)
    sizes = ((N_TRAIN, 10 + 3 * seed), (N_VAL, 11 + 3 * seed), (N_TEST, 12 + 3 * seed))
    (x_tr, _), (x_va, _), (x_te, _) = (inputs.sample(n, s) for n, s in sizes)
    changes_ = Changes(router, inputs, seed + 1)
    with torch.no_grad():
        base = {k: block0(x[None])[0] for k, x in (("tr", x_tr), ("va", x_va), ("te", x_te))}
    delta = {(c, k): changes_(c, x) for c in changes for k, x in (("tr", x_tr), ("va", x_va), ("te", x_te))}
    out = {}
    for name, overrides in strategies.items():
        m = match(tmp, overrides)
        assert m.matched, f"{name}: {m.note}"
        for c in changes:
            val, test = {}, {}
            for lr in lrs:
                t0 = time.time()
                _, block = train_one(make_loaded, overrides, m.rank, m.alpha, x_tr, base["tr"] + delta[c, "tr"], lr)
                val[lr] = rel_loss(block, x_va, base["va"] + delta[c, "va"], delta[c, "va"])
                test[lr] = rel_loss(block, x_te, base["te"] + delta[c, "te"], delta[c, "te"])
                log(f"  {name:16s} {c:7s} lr {lr:g}: val {val[lr]:.4f} test {test[lr]:.4f} ({time.time() - t0:.1f}s)")
            best = min(val, key=val.get)
            out[name, c] = Fit(name, c, m.rank, m.trainable, best, val, test[best])
    return out


def table(fits: dict[tuple[str, str], Fit]) -> str:
    changes = sorted({c for _, c in fits}, key=CHANGES.index)
    names = list(dict.fromkeys(s for s, _ in fits))
    lines = [f"{'strategy':16s} {'rank':>4s} {'params':>6s} " + " ".join(f"{c + ' (lr)':>18s}" for c in changes)]
    for s in names:
        f0 = fits[s, changes[0]]
        lines.append(f"{s:16s} {f0.rank:4d} {f0.trainable:6d} "
                     + " ".join(f"{fits[s, c].test:9.5f} ({fits[s, c].lr:.0e})" for c in changes))
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    import sys

    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        fits = run(Path(d), seed=int(sys.argv[1]) if len(sys.argv) > 1 else 0, log=lambda *a: None)
    print(table(fits))
    print(f"{time.time() - t0:.1f}s")
