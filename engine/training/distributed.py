"""Data-parallel training over torch.distributed (NCCL on GPUs, gloo on CPU; launched by torchrun or
`accelerate launch`, which set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT).

N ranks at micro-batch b compute exactly what one process at micro-batch N·b computes:
- data: every rank draws the same global order of micro-batches of N·b examples (the single process's
  order) and takes its contiguous slice, padded to the global batch's width, so each rank's rows are the
  single process's rows token for token — pad tokens included, which the MoE routes like any other;
- loss: every micro-batch's loss is a sum over its response tokens divided by the GLOBAL token count
  (all-reduced), and gradients are summed over the ranks, so the sum is the single-process mean's gradient;
- the balance losses (Switch f·P) use the all-reduced routing counts f; P stays local and its sum over the
  ranks is the global mean, so the losses add up across ranks to the single process's, gradient included;
- the sparse optimizer's used rows are the union over the ranks (an all-reduced 0/1 mask), never local
  routing, so replicas cannot drift; a checksum of every rank's adapters at each checkpoint proves it.
Rank 0 alone writes events, checkpoints and the adapter; every rank's RNG goes into the checkpoint.
Each collective waits at most MOETUNE_DIST_TIMEOUT seconds: a dead or stuck rank ends the job with one
clear error (DistributedError), never a hang.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as tdist

from .collectives import TRAFFIC, Dist, DistributedError, all_reduce, broadcast_object, collective, gather_object


# ---- data --------------------------------------------------------------------------------------
def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch of n rows that `rank` takes: contiguous, as even as can be."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class RankBatches:
    """A rank's share of the single process's order: global micro-batches of world × micro_batch examples
    (the order `Batches` draws at that micro-batch), each cut into `world` contiguous slices padded to the
    global batch's width. A last global batch too short to give every rank a row is left out."""

    def __init__(self, batches, dist: Dist):
        self.inner, self.rank, self.world = batches, dist.rank, dist.world_size
        self.examples, self.pad_id, self.seed = batches.examples, batches.pad_id, batches.seed
        self.micro_batch = batches.micro_batch  # per rank

    def epoch(self, e: int) -> list[list[int]]:
        """Global micro-batches of epoch e (example indices), the same on every rank."""
        from ..data import make_batches

        order = make_batches(self.examples, self.micro_batch * self.world, seed=self.seed + e)
        return [b for b in order if len(b) >= self.world]

    def tensors(self, idx: list[int], device) -> dict[str, torch.Tensor]:
        """This rank's rows of the global micro-batch `idx`, padded as the whole global batch is."""
        from ..data import collate

        lo, hi = shard_bounds(len(idx), self.rank, self.world)
        full = collate([self.examples[i] for i in idx], self.pad_id)
        return {k: v[lo:hi].to(device) for k, v in full.items()}


def shard(batches, dist: Dist | None):
    """`batches` itself for a single process, else this rank's RankBatches of it."""
    return batches if dist is None else RankBatches(batches, dist)


def global_token_counts(dist: Dist | None, micro: Sequence[dict[str, torch.Tensor]]) -> list[int] | None:
    """Per micro-batch, the response tokens (labels after the shift) of all ranks together; None alone."""
    if dist is None:
        return None
    from ..data import IGNORE_INDEX

    counts = torch.tensor([int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro], dtype=torch.float64,
                          device=dist.device)
    all_reduce(dist, counts, "summing the token counts")
    return [max(1, int(c)) for c in counts.tolist()]


# ---- balance losses ----------------------------------------------------------------------------
def install_balance_stats(dist: Dist | None) -> None:
    """Make the routers' balance losses use the job's routing counts (engine.adapters.balance.GLOBAL_SUM)."""
    from ..adapters import balance

    if dist is None:
        balance.GLOBAL_SUM = None
        return

    def reduce(t: torch.Tensor) -> torch.Tensor:
        buf = t.detach().to(device=dist.device, dtype=torch.float64).clone()
        all_reduce(dist, buf, "summing the routers' balance statistics")
        return buf.to(t.device)

    balance.GLOBAL_SUM = reduce


# ---- gradients and used rows -------------------------------------------------------------------
def _sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "moetune_expert_shard", False))


def reduce_gradients(dist: Dist | None, params: Sequence[torch.nn.Parameter], banks: Sequence) -> None:
    """Sum the replicated parameters' gradients over the ranks and give every AdapterBank the union of the
    rows used on any rank, in one all-reduce. Expert-parallel shards keep theirs (already global)."""
    if dist is None:
        return
    replicated = [p for p in params if not _sharded(p)]
    shared_banks = [b for b in {id(b): b for b in banks}.values()
                    if not any(_sharded(p) for p in b.parameters(recurse=False))]
    parts = [(p.grad.detach().reshape(-1).to(torch.float32) if p.grad is not None
              else torch.zeros(p.numel(), dtype=torch.float32, device=p.device)) for p in replicated]
    present = torch.tensor([float(p.grad is not None) for p in replicated], dtype=torch.float32)
    masks = []
    for b in shared_banks:
        m = torch.zeros(b.num, dtype=torch.float32)
        if b.touched:
            m[sorted(b.touched)] = 1.0
        masks.append(m)
    flat = torch.cat([t.to(dist.device) for t in (*parts, present, *masks)]) if (parts or masks) else None
    if flat is None:
        return
    all_reduce(dist, flat, "summing the adapter gradients")
    offset = 0
    grads = []
    for p in replicated:
        grads.append(flat[offset:offset + p.numel()])
        offset += p.numel()
    flags = flat[offset:offset + len(replicated)].tolist()
    offset += len(replicated)
    for p, g, flag in zip(replicated, grads, flags):
        p.grad = g.view_as(p).to(device=p.device, dtype=p.dtype).clone() if flag > 0 else None
    for b in shared_banks:
        mask = flat[offset:offset + b.num]
        offset += b.num
        b.touched = set(torch.nonzero(mask > 0).flatten().tolist())


def reduce_report(dist: Dist | None, loss: float, aux: float, tokens: int, usage: list[list[int]] | None,
                  stop: bool) -> tuple[float, float, int, list[list[int]] | None, bool]:
    """This step's loss, balance loss, tokens and expert usage summed over the ranks, and whether any rank
    was told to stop (SIGTERM, SIGINT): every rank then stops after the same step."""
    if dist is None:
        return loss, aux, tokens, usage, stop
    flat_usage = [c for row in usage for c in row] if usage else []
    buf = torch.tensor([loss, aux, float(tokens), float(bool(stop)), *map(float, flat_usage)], dtype=torch.float64,
                       device=dist.device)
    all_reduce(dist, buf, "agreeing on the step's loss and on stopping")
    v = buf.tolist()
    if usage:
        it = iter(int(c) for c in v[4:])
        usage = [[next(it) for _ in row] for row in usage]
    return v[0], v[1], int(v[2]), usage, v[3] > 0


# ---- start, checkpoints, resume ----------------------------------------------------------------
def broadcast_parameters(dist: Dist | None, params: Sequence[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's initial replicated parameters (as DDP does), whatever their seeds did."""
    if dist is None:
        return
    for p in params:
        if not _sharded(p):
            TRAFFIC["broadcast"] += p.numel() * p.element_size()
            buf = p.data.to(dist.device)
            collective(dist, "sharing the initial adapters", lambda: tdist.broadcast(buf, 0, group=dist.group))
            p.data.copy_(buf.to(p.device))


def seed_rank(dist: Dist | None, seed: int) -> None:
    """Give ranks other than 0 their own random stream (dropout masks must differ between ranks' rows)."""
    if dist is not None and dist.rank > 0:
        torch.manual_seed(seed * 1_000_003 + dist.rank)


def load_checkpoint(dist: Dist | None, run_dir: Path | None, warn: Callable[[str], None]):
    """(path, adapter tensors, torch state, trainer state) of the run's newest good checkpoint on every rank
    (rank 0 reads and verifies it, so the other machines need no copy; `ckpt.load_latest`), or None when there
    is none to resume. An error on rank 0 (every checkpoint damaged) is raised on every rank, not left to hang."""
    from . import checkpoint as ckpt
    from ..io import DamagedFileError

    if dist is None:
        return ckpt.load_latest(run_dir, warn) if run_dir is not None else None
    result, notes = None, []
    if dist.is_main and run_dir is not None:
        try:
            result = ("ok", ckpt.load_latest(run_dir, notes.append))
        except DamagedFileError as e:
            result = ("damaged", str(e))
    kind, value = broadcast_object(dist, result or ("ok", None), "sharing the checkpoint to resume")
    for note in notes:
        warn(note)
    if kind == "damaged":
        raise DamagedFileError(value)
    return value


def check_world_size(dist: Dist | None, state: dict, path: Path | str = "the checkpoint") -> None:
    """A checkpoint resumes only under the world size that wrote it (the global batch and every rank's RNG
    depend on it); say so with both sizes."""
    have = dist.world_size if dist is not None else 1
    want = int(state.get("world_size", 1))
    if have != want:
        raise DistributedError(
            f"{path} was written by a job of {want} rank(s), and this job has {have}; resume with the same "
            f"number (`moetune train CONFIG --resume --gpus {want}`, or torchrun --nproc-per-node with "
            f"{want} ranks in all), or start a new run.")


def rank_state(dist: Dist | None, tstate: dict, key: str) -> Any:
    """This rank's entry of a per-rank list in a checkpoint's torch state (`rng` for a single process). The state
    is on the CPU (loaded with map_location="cpu", sent through the object collectives as CPU tensors); the
    optimizer's `load_state_dict` moves this rank's share to its parameters' device."""
    if dist is None:
        return tstate[key]
    ranks = tstate.get(f"{key}_ranks")
    if ranks is None and key == "optimizer" and dist.expert_parallel == 1:
        return tstate[key]  # data parallel: every replica's optimizer state is rank 0's
    if ranks is None or len(ranks) != dist.world_size:
        raise DistributedError(f"the checkpoint holds no {key} state for {dist.world_size} ranks; resume it with "
                               "the world size that wrote it.")
    return ranks[dist.rank]


def adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the adapter tensors' bytes, in name order (bit-identical replicas give equal digests)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def adapter_state(dist: Dist | None, peft) -> dict[str, torch.Tensor]:
    """The adapter tensors as one process holds them: under expert parallelism gathered from every rank
    (collective; complete on rank 0 only), else this rank's own."""
    if dist is not None and dist.expert_parallel > 1:
        from .expert_parallel import gather_expert_state

        return collective(dist, "gathering the experts' adapters", lambda: gather_expert_state(peft, dist.group))
    return peft.adapter_state_dict()


def restore_adapter(dist: Dist | None, peft, tensors: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's adapter tensors (one process's layout) into this rank's model (its shard of the
    experts under expert parallelism)."""
    if dist is not None and dist.expert_parallel > 1:
        from .expert_parallel import scatter_expert_state

        collective(dist, "sharing the experts' adapters", lambda: scatter_expert_state(peft, tensors, dist.group))
        return
    for n, p in peft.trainable_parameters():
        p.data.copy_(tensors[n])


def checkpoint_parts(dist: Dist | None, peft, optimizer) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors, torch state, trainer state) of a checkpoint, on every rank together (only rank 0's
    are complete): the adapter as one process holds it; every rank's RNG (and, under expert parallelism, its
    optimizer state) and the world size; every rank's digest of the replicated adapters, checked equal
    (replicas that drifted stop the job rather than train on)."""
    from . import checkpoint as ckpt

    adapter = adapter_state(dist, peft)
    if dist is None:
        return adapter, {}, {}
    replicated = {n: p for n, p in peft.trainable_parameters() if not _sharded(p)}
    mine = {"rng": ckpt.rng_state(), "digest": adapter_digest(replicated),
            **({"optimizer": optimizer.state_dict()} if dist.expert_parallel > 1 else {})}
    ranks = gather_object(dist, mine, "gathering every rank's RNG state")
    if not dist.is_main:
        return {}, {}, {}
    digests = [r["digest"] for r in ranks]
    if len(set(digests)) != 1:
        raise DistributedError(f"the replicated adapters differ between ranks (sha256 {', '.join(d[:12] for d in digests)}); "
                               "the job stops before it trains on diverged replicas.")
    extra = {"rng_ranks": [r["rng"] for r in ranks]}
    if dist.expert_parallel > 1:
        extra["optimizer_ranks"] = [r["optimizer"] for r in ranks]
    return adapter, extra, {"world_size": dist.world_size, "expert_parallel": dist.expert_parallel,
                            "replica_sha256": digests}


def shard_experts(dist: Dist | None, peft, cfg) -> None:
    """`train.expert_parallel: N`: split every MoE layer's experts across the job's ranks (engine.training.expert_parallel),
    after attach and before the optimizer and any offload; a clear error where it cannot run."""
    from ..config import ConfigError

    n = cfg.train.expert_parallel
    if n == 1:
        return
    from ..config import check_expert_parallel
    from .expert_parallel import shard_experts as split

    check_expert_parallel(n, dist.world_size if dist is not None else 1)  # the planner's rule, the same words
    if cfg.eval.benchmarks:
        raise ConfigError("eval.benchmarks: benchmarks after training do not run under train.expert_parallel > 1 "
                          "(one process holds part of the experts); leave eval.benchmarks empty and run "
                          "`moetune eval --run DIR` on the saved adapter.")

    collective(dist, "splitting the experts", lambda: split(peft, dist.group, device=dist.device))
    dist.expert_parallel = n


def clip_grad_norm(dist: Dist | None, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """torch's gradient clipping (max_norm inf: measure only); under expert parallelism with the norm over every
    rank's expert shards. Returns the total norm, the same on every rank (gradients are all-reduced first)."""
    if dist is not None and dist.expert_parallel > 1:
        from .expert_parallel import clip_grad_norm as clip

        return float(collective(dist, "clipping the gradients", lambda: clip(params, max_norm, dist.group)))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def join_replicas(dist: Dist | None, params: Sequence[torch.nn.Parameter], seed: int) -> None:
    """Before the first step: every rank takes rank 0's adapters, its own dropout stream, and the job's
    routing counts for the balance losses."""
    install_balance_stats(dist)
    broadcast_parameters(dist, params)
    seed_rank(dist, seed)


class NullLog:
    """The event log of ranks other than 0: they write nothing."""

    def emit(self, type: str, **fields: Any) -> dict:
        """Drop the event."""
        return {"type": type, **fields}

    def set_position(self, step: int) -> None:
        """Nothing to move."""

    def close(self) -> None:
        """Nothing to close."""


