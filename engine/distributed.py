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

import atexit
import hashlib
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as tdist

#: seconds any collective (and the rendezvous) waits for the other ranks before the job ends with an error
ENV_TIMEOUT = "MOETUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
#: bytes each rank handed to collectives, by kind (the benchmark reads and resets it)
TRAFFIC: dict[str, int] = {"all_reduce": 0, "all_to_all": 0, "broadcast": 0}


class DistributedError(RuntimeError):
    """A job of several ranks that cannot go on: a rank died or stopped answering, or the ranks disagree."""


@dataclass
class Dist:
    """This process's place in a job of several ranks."""

    rank: int
    world_size: int
    local_rank: int
    group: Any
    device: torch.device
    timeout_s: float
    expert_parallel: int = 1
    #: set once a collective failed: the group is then left alone at exit (destroying it could wait on a dead peer)
    failed: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes events, checkpoints and the adapter."""
        return self.rank == 0

    @property
    def backend(self) -> str:
        """nccl or gloo."""
        return tdist.get_backend(self.group)


def timeout_s() -> float:
    """MOETUNE_DIST_TIMEOUT (seconds), or the default of 600."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds; set it to e.g. 600.") from None
    if value <= 0:
        raise DistributedError(f"{ENV_TIMEOUT}={raw!r} must be more than 0 seconds.")
    return value


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "").strip() or "1"
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={raw!r} is not an integer; start the job with torchrun.") from None


def init_from_env(device: str | None = None, timeout: float | None = None) -> Dist | None:
    """Join the job torchrun / accelerate launch described in the environment; None for a single process.
    `device` "cpu" forces gloo on the CPU; otherwise CUDA (NCCL, GPU LOCAL_RANK) when present."""
    world = world_size_from_env()
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start the job with "
                               "`torchrun --nproc-per-node N` or `moetune train CONFIG --gpus N`.")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    wait = timeout if timeout is not None else timeout_s()
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: LOCAL_RANK {local_rank} but this machine shows "
                                   f"{torch.cuda.device_count()} GPU(s); start at most that many ranks per machine.")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not tdist.is_initialized():
        try:
            tdist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                     timeout=timedelta(seconds=wait),
                                     **({"device_id": dev} if use_cuda else {}))
        except Exception as e:  # rendezvous timed out, address unreachable ...
            raise DistributedError(f"rank {rank} of {world}: could not join the job at "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {wait:g} s "
                                   f"({_first_line(e)}).") from None
        atexit.register(_close_at_exit)
    d = Dist(rank, world, local_rank, tdist.group.WORLD, dev, wait)
    _JOB.append(d)
    return d


_JOB: list[Dist] = []


def _close_at_exit() -> None:
    if tdist.is_initialized() and not any(d.failed for d in _JOB):
        tdist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _collective(dist: Dist, what: str, fn: Callable[[], Any]) -> Any:
    """Run one collective; a failure (a peer died, the timeout passed) becomes one DistributedError."""
    try:
        return fn()
    except Exception as e:
        dist.failed = True
        raise DistributedError(f"rank {dist.rank} of {dist.world_size}: {what} failed, another rank died or stopped "
                               f"answering within {ENV_TIMEOUT}={dist.timeout_s:g} s ({_first_line(e)}); the job "
                               "ends. Resume it with --resume once every rank can run.") from None


def all_reduce(dist: Dist, tensor: torch.Tensor, what: str, op=None) -> torch.Tensor:
    """In-place all-reduce (SUM unless `op`) of `tensor` over the job, counted in TRAFFIC."""
    TRAFFIC["all_reduce"] += tensor.numel() * tensor.element_size()
    _collective(dist, what, lambda: tdist.all_reduce(tensor, op=op or tdist.ReduceOp.SUM, group=dist.group))
    return tensor


def is_main(dist: Dist | None) -> bool:
    """Whether this process writes the run's files (a single process, or rank 0)."""
    return dist is None or dist.is_main


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
        from .data import make_batches

        order = make_batches(self.examples, self.micro_batch * self.world, seed=self.seed + e)
        return [b for b in order if len(b) >= self.world]

    def tensors(self, idx: list[int], device) -> dict[str, torch.Tensor]:
        """This rank's rows of the global micro-batch `idx`, padded as the whole global batch is."""
        from .data import collate

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
    from .data import IGNORE_INDEX

    counts = torch.tensor([int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro], dtype=torch.float64,
                          device=dist.device)
    all_reduce(dist, counts, "summing the token counts")
    return [max(1, int(c)) for c in counts.tolist()]


# ---- balance losses ----------------------------------------------------------------------------
def install_balance_stats(dist: Dist | None) -> None:
    """Make the routers' Switch balance loss use the job's routing counts (engine.routing.strategies)."""
    from .routing import strategies

    if dist is None:
        strategies.GLOBAL_COUNTS = None
        return

    def reduce(counts: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
        buf = torch.cat([counts.detach().to(torch.float64).flatten(),
                         torch.tensor([float(tokens)], dtype=torch.float64, device=counts.device)]).to(dist.device)
        all_reduce(dist, buf, "summing the routers' balance statistics")
        return buf[:-1].to(counts.device), float(buf[-1])

    strategies.GLOBAL_COUNTS = reduce


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
            _collective(dist, "sharing the initial adapters", lambda: tdist.broadcast(buf, 0, group=dist.group))
            p.data.copy_(buf.to(p.device))


def seed_rank(dist: Dist | None, seed: int) -> None:
    """Give ranks other than 0 their own random stream (dropout masks must differ between ranks' rows)."""
    if dist is not None and dist.rank > 0:
        torch.manual_seed(seed * 1_000_003 + dist.rank)


def _broadcast_object(dist: Dist, obj: Any, what: str) -> Any:
    box = [obj if dist.is_main else None]
    _collective(dist, what, lambda: tdist.broadcast_object_list(box, src=0, group=dist.group,
                                                                device=dist.device if dist.backend == "nccl" else None))
    return box[0]


def _gather_object(dist: Dist, obj: Any, what: str) -> list | None:
    out = [None] * dist.world_size if dist.is_main else None
    _collective(dist, what, lambda: tdist.gather_object(obj, out, dst=0, group=dist.group))
    return out


def load_checkpoint(dist: Dist | None, run_dir: Path | None, warn: Callable[[str], None]):
    """(path, adapter tensors, torch state, trainer state) of the run's newest good checkpoint on every rank
    (rank 0 reads and verifies it, so the other machines need no copy; `ckpt.load_latest`), or None when there
    is none to resume. An error on rank 0 (every checkpoint damaged) is raised on every rank, not left to hang."""
    from . import checkpoint as ckpt
    from .io import DamagedFileError

    if dist is None:
        return ckpt.load_latest(run_dir, warn) if run_dir is not None else None
    result, notes = None, []
    if dist.is_main and run_dir is not None:
        try:
            result = ("ok", ckpt.load_latest(run_dir, notes.append))
        except DamagedFileError as e:
            result = ("damaged", str(e))
    kind, value = _broadcast_object(dist, result or ("ok", None), "sharing the checkpoint to resume")
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
    """This rank's entry of a per-rank list in a checkpoint's torch state (`rng` for a single process)."""
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

        return _collective(dist, "gathering the experts' adapters", lambda: gather_expert_state(peft, dist.group))
    return peft.adapter_state_dict()


def restore_adapter(dist: Dist | None, peft, tensors: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's adapter tensors (one process's layout) into this rank's model (its shard of the
    experts under expert parallelism)."""
    if dist is not None and dist.expert_parallel > 1:
        from .expert_parallel import scatter_expert_state

        _collective(dist, "sharing the experts' adapters", lambda: scatter_expert_state(peft, tensors, dist.group))
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
    ranks = _gather_object(dist, mine, "gathering every rank's RNG state")
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
    """`train.expert_parallel: N`: split every MoE layer's experts across the job's ranks (engine.expert_parallel),
    after attach and before the optimizer and any offload; a clear error where it cannot run."""
    from .config import ConfigError

    n = cfg.train.expert_parallel
    if n == 1:
        return
    from .expert_parallel import check_expert_parallel, shard_experts as split

    check_expert_parallel(n, dist.world_size if dist is not None else 1)  # the planner's rule, the same words
    if cfg.eval.benchmarks:
        raise ConfigError("eval.benchmarks: benchmarks after training do not run under train.expert_parallel > 1 "
                          "(one process holds part of the experts); leave eval.benchmarks empty and run "
                          "`moetune eval --run DIR` on the saved adapter.")

    _collective(dist, "splitting the experts", lambda: split(peft, dist.group, device=dist.device))
    dist.expert_parallel = n


def clip_grad_norm(dist: Dist | None, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """torch's gradient clipping (max_norm inf: measure only); under expert parallelism with the norm over every
    rank's expert shards. Returns the total norm, the same on every rank (gradients are all-reduced first)."""
    if dist is not None and dist.expert_parallel > 1:
        from .expert_parallel import clip_grad_norm as clip

        return float(_collective(dist, "clipping the gradients", lambda: clip(params, max_norm, dist.group)))
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


# ---- launching -----------------------------------------------------------------------------------
def torchrun_command(nproc: int, cli_args: Sequence[str]) -> list[str]:
    """The torchrun command (this Python's torch.distributed.run) that starts `moetune CLI_ARGS` as `nproc`
    ranks on this machine, with a local rendezvous on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "engine.cli", *cli_args]


def launch_local(gpus: int | None, cli_args: Sequence[str]) -> None:
    """`moetune train --gpus N`: become torchrun with N ranks (this call then never returns). Returns when this
    process trains itself: no --gpus, --gpus 1, or already a rank of a launcher's job of that many ranks."""
    if gpus is None:
        return
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: give the number of GPUs (ranks) on this machine, 1 or more.")
    if world_size_from_env() > 1:  # torchrun / accelerate launch started us: join their job
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
        if local and local != gpus:
            raise ValueError(f"--gpus {gpus}, but the launcher started {local} ranks on this machine; leave "
                             "--gpus out under torchrun / accelerate launch.")
        return
    if gpus == 1:
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < gpus:
        raise ValueError(f"--gpus {gpus}, but this machine shows {torch.cuda.device_count()} GPU(s); "
                         "give at most that many.")
    from .process import child_env

    cmd = torchrun_command(gpus, cli_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, child_env())  # the launcher takes this process's place (and its signals)
