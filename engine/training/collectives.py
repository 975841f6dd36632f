"""The job of several ranks that every distributed feature stands on: joining it from torchrun's (or
`accelerate launch`'s) environment, collectives that wait at most MOETUNE_DIST_TIMEOUT seconds and end a stuck
job with one DistributedError instead of a hang, the bytes each rank hands to collectives (TRAFFIC), object
broadcast / gather, and `moetune train --gpus N` becoming torchrun."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
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


#: the job this process joined (at most one), for the exit handler
_JOB: list[Dist] = []


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


def _close_at_exit() -> None:
    if tdist.is_initialized() and not any(d.failed for d in _JOB):
        tdist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def collective(dist: Dist, what: str, fn: Callable[[], Any]) -> Any:
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
    collective(dist, what, lambda: tdist.all_reduce(tensor, op=op or tdist.ReduceOp.SUM, group=dist.group))
    return tensor


def is_main(dist: Dist | None) -> bool:
    """Whether this process writes the run's files (a single process, or rank 0)."""
    return dist is None or dist.is_main


def to_host(obj: Any) -> Any:
    """`obj` with every tensor in it (nested dicts, lists, tuples) copied to the CPU: what the object collectives
    send. A pickled CUDA tensor unpickles on the device it came from — on every rank — and not at all on a
    machine without that device; CPU tensors unpickle anywhere, and each rank moves its share to its device."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, dict):
        return type(obj)((k, to_host(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_host(v) for v in obj)
    return obj


def broadcast_object(dist: Dist, obj: Any, what: str) -> Any:
    """Rank 0's `obj` on every rank (its tensors travel on the CPU: `to_host`)."""
    box = [to_host(obj) if dist.is_main else None]
    collective(dist, what, lambda: tdist.broadcast_object_list(box, src=0, group=dist.group,
                                                                device=dist.device if dist.backend == "nccl" else None))
    return box[0]


def gather_object(dist: Dist, obj: Any, what: str) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere), its tensors on the CPU (`to_host`)."""
    out = [None] * dist.world_size if dist.is_main else None
    obj = to_host(obj)
    collective(dist, what, lambda: tdist.gather_object(obj, out, dst=0, group=dist.group))
    return out


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
    from ..runs import child_env

    cmd = torchrun_command(gpus, cli_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, child_env())  # the launcher takes this process's place (and its signals)
