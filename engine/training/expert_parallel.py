"""Expert parallelism (`train.expert_parallel: N`): every MoE layer's experts are split across the N ranks
of a process group — rank r keeps experts [r·E/N, (r+1)·E/N): their frozen NF4 / bf16 stores and the rows of
their per-expert adapters (`embedded`: the parallel AdapterBank or the inside LoRA banks), still fused
`[E/N, ...]` tensors — and the other ranks' experts are freed.

A sharded layer (`ShardedExpertBank`) routes as before (the router is replicated), sorts its (token, expert)
pairs by expert (so by owner rank), exchanges the pair counts, then the token rows, with
`torch.distributed.all_to_all_single`; the owner computes its experts on what it received with the expert
bank's grouped path, sends the results back the same way, and the sender combines them with its gates.
Gradients take the reverse exchanges (`AllToAll`). Every rank takes part in every exchange, in the same order,
whatever its routing (a rank that sends or receives nothing exchanges empty tensors), so an expert with tokens
on some ranks only, or on none, never hangs the job.

Parameters that are sharded carry `p.moetune_expert_shard = True` (their banks too): their gradients already sum
every rank's tokens, so the data-parallel all-reduce leaves them out, and their banks' `touched` rows (the
sparse optimizer's "stepped" rows) are local rows, already global. `gather_expert_state` / `scatter_expert_state`
turn the sharded adapters into the state dict one process has (for saving) and back (for resuming);
`clip_grad_norm` is torch's clipping with the norm of the sharded gradients summed over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..adapters.banks import AdapterBank
from ..config import check_expert_parallel
from ..model import ExpertBank
from ..model.expert_bank import _compute_dtype
from ..model.grouped import sort_by_group
from .collectives import TRAFFIC
from ..model import DenseExpertStore, NF4ExpertStore
from ..model.stores import PARTS

#: the attribute that marks a sharded (not replicated) parameter or adapter bank
SHARD_ATTR = "moetune_expert_shard"
#: token exchanges this process took part in (forward: dispatch and return; backward: their reverses), and the
#: bytes it sent in them; the same numbers on every rank of a step, whatever the routing
EXCHANGES = {"forward": 0, "backward": 0, "bytes": 0}


@dataclass(frozen=True)
class ExpertShard:
    """Which experts of a layer this rank holds: [first, first + per_rank) of num_experts, over `world` ranks."""

    rank: int
    world: int
    num_experts: int
    group: object = None  # the torch.distributed process group (None: the default group)

    @property
    def per_rank(self) -> int:
        """Experts of the layer each rank holds."""
        return self.num_experts // self.world

    @property
    def first(self) -> int:
        """The global index of this rank's first expert."""
        return self.rank * self.per_rank

    @property
    def rows(self) -> slice:
        """The rows of a fused [E, ...] tensor this rank keeps."""
        return slice(self.first, self.first + self.per_rank)


def _group_rank_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed initialised (launch with torchrun, or "
                           "`moetune train --gpus N`).")
    return dist.get_rank(group), dist.get_world_size(group)


# ---- the exchange -------------------------------------------------------------------------------
class AllToAll(torch.autograd.Function):
    """Rows of `x` sent to the ranks of `group` (`send[i]` rows to rank i, in rank order), rows received from
    them (`recv[i]` from rank i); the backward sends the gradients back the reverse way.

    `anchors` (tensors that require grad) make the output require grad even when `x` does not, so that every
    rank's backward reaches this exchange whenever any rank's does: a rank that happens to send or receive
    nothing still takes part (its gradients for the anchors are None)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group, *anchors: torch.Tensor):
        ctx.recv, ctx.send, ctx.group, ctx.anchors = recv, send, group, len(anchors)
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        _count("forward", x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        _count("backward", grad)
        return (back, None, None, None, *([None] * ctx.anchors))


def _count(direction: str, sent: torch.Tensor) -> None:
    """Count one exchange here and in the job's traffic figures (engine.training.collectives.TRAFFIC)."""
    nbytes = sent.numel() * sent.element_size()
    EXCHANGES[direction] += 1
    EXCHANGES["bytes"] += nbytes
    TRAFFIC["all_to_all"] = TRAFFIC.get("all_to_all", 0) + nbytes


# ---- the sharded bank ---------------------------------------------------------------------------
class ShardedExpertBank(ExpertBank):
    """An ExpertBank holding one rank's slice of a layer's experts (store and per-expert adapters, local
    indices 0..E/N-1); its forward exchanges tokens with the other ranks so every (token, expert) pair is
    computed by the expert's owner (module docstring). Its adapter parameters keep the names they had."""

    def __init__(self, store, activation: str, hidden_size: int, intermediate_size: int, *, shard: ExpertShard,
                 parallel: AdapterBank | None = None, inside: dict[str, AdapterBank] | None = None,
                 backend: str = "auto", max_group_bytes: int | None = None, glu=None, bias=None):
        kwargs = {} if max_group_bytes is None else {"max_group_bytes": max_group_bytes}
        super().__init__(store, activation, hidden_size, intermediate_size, parallel=parallel, inside=inside,
                         backend=backend, glu=glu, bias=bias, **kwargs)
        if store.num_experts != shard.per_rank:
            raise ValueError(f"ShardedExpertBank: the store holds {store.num_experts} experts, the shard "
                             f"{shard.per_rank}.")
        self.shard = shard
        #: (token, expert) pairs this rank's experts computed in the last forward (the tokens it received)
        self.last_received = 0

    def extra_repr(self) -> str:
        s = self.shard
        return f"experts {s.first}..{s.first + s.per_rank - 1} of {s.num_experts} (rank {s.rank} of {s.world})"

    def _anchors(self) -> tuple[torch.Tensor, ...]:
        """Trainable parameters of the bank while autograd is on (AllToAll's `anchors`)."""
        if not torch.is_grad_enabled():
            return ()
        return tuple(p for p in self.parameters() if p.requires_grad)[:1]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        s = self.shard
        # (token, slot) pairs by global expert, slot-major within an expert: ExpertBank's sort and add order
        pairs, toks, slots = sort_by_group(top_k_index, s.num_experts)
        with torch.no_grad():
            per_expert = torch.tensor(pairs, device=top_k_index.device)
            from_ranks = torch.empty_like(per_expert)
            dist.all_to_all_single(from_ranks, per_expert, group=s.group)  # [src, local expert] pair counts
            counts = torch.stack([per_expert, from_ranks]).view(2, s.world, s.per_rank).cpu()
        send = counts[0].sum(1).tolist()
        received = counts[1]  # [world, per_rank]
        recv = received.sum(1).tolist()
        x = hidden_states[toks].to(_compute_dtype(hidden_states))
        x_recv = AllToAll.apply(x, recv, send, s.group)
        # rows arrive by source rank, each block sorted by expert: regroup them by local expert
        local = torch.repeat_interleave(torch.arange(s.per_rank).repeat(s.world), received.reshape(-1))
        perm = torch.argsort(local, stable=True).to(x.device)
        y_local = self._local_forward(x_recv[perm], received.sum(0).tolist())
        y_recv = y_local[torch.argsort(perm)]
        y = AllToAll.apply(y_recv, send, recv, s.group, *self._anchors())
        self.last_received = int(sum(recv))
        out = torch.zeros_like(hidden_states)
        out.index_add_(0, toks, (y * top_k_weights[toks, slots, None]).to(out.dtype))
        return out

    def _local_forward(self, x: torch.Tensor, per_expert: list[int]) -> torch.Tensor:
        """This rank's experts (plus adapters) on the rows it received, sorted by local expert: [R, H] -> [R, H]."""
        experts = [e for e, n in enumerate(per_expert) if n]
        if not experts:
            return x * 0  # [0, H], still on x's graph: the gradient exchange runs on this rank too
        if self.backend == "loop":
            ys, start = [], 0
            for e in experts:
                ys.append(self.expert_forward(x[start:start + per_expert[e]], e))
                start += per_expert[e]
            return torch.cat(ys)
        ys = [y for _, y in self._grouped(x, per_expert)]
        return ys[0] if len(ys) == 1 else torch.cat(ys)


# ---- sharding -----------------------------------------------------------------------------------
def shard_store(store, shard: ExpertShard, device: torch.device | str | None = None):
    """A new store holding only `shard`'s experts (copies, so the full store's memory can be freed), on `device`
    (default: where the store is)."""
    rows = shard.rows
    if isinstance(store, NF4ExpertStore):
        out = NF4ExpertStore(shard.per_rank, store.hidden_size, store.intermediate_size, store.dtype,
                             store.blocksize, allocate=False)
        out.tensors = {name: (t[rows] if name.startswith(PARTS) else t).clone()
                       for name, t in store.tensors.items()}
        out.filled = store.filled[rows].clone()
        return out.to(device) if device is not None else out
    if isinstance(store, DenseExpertStore):
        dev = store.gate_up.device if device is None else device
        return DenseExpertStore(store.gate_up[rows].to(dev, copy=True), store.down[rows].to(dev, copy=True))
    raise ValueError(f"train.expert_parallel: experts held by {type(store).__name__} cannot be sharded; shard "
                     "them before they are offloaded (resident NF4 or bf16 stores), or set memory.offload: off.")


def shard_adapter_bank(bank: AdapterBank, shard: ExpertShard) -> None:
    """Keep only `shard`'s rows of a per-expert AdapterBank (in place: new, smaller parameters, marked)."""
    if bank.num != shard.num_experts:
        raise ValueError(f"shard_adapter_bank: the bank has {bank.num} adapters, the layer {shard.num_experts} experts.")
    for name, p in list(bank.named_parameters(recurse=False)):
        new = nn.Parameter(p.detach()[shard.rows].clone(), requires_grad=p.requires_grad)
        setattr(new, SHARD_ATTR, True)
        setattr(bank, name, new)
    bank.num = shard.per_rank
    bank.touched = set()
    setattr(bank, SHARD_ATTR, True)


def shard_experts(peft, group=None, device: torch.device | str | None = None) -> None:
    """Split every MoE layer's experts (frozen stores and per-expert adapters) across the ranks of `group`, in
    place: rank r keeps experts [r·E/N, (r+1)·E/N) and the rest are freed; the layers then exchange tokens with
    the other ranks (module docstring). Call it after `attach` and before the optimizer is built (and before
    experts are offloaded); `device`: where the kept experts go (default: where they are)."""
    rank, world = _group_rank_world(group)
    if world == 1:
        return
    check_expert_parallel(world, num_experts=peft.facts.num_experts)
    f = peft.facts
    for layer, block in peft.family.moe_blocks(peft.model):
        bank = peft.banks[layer]
        if isinstance(bank, ShardedExpertBank):
            raise ValueError(f"shard_experts: layer {layer} is sharded already.")
        shard = ExpertShard(rank, world, bank.num_experts, group)
        for adapters in ([bank.parallel] if bank.parallel is not None else []) + \
                (list(bank.inside.values()) if bank.inside is not None else []):
            shard_adapter_bank(adapters, shard)
        store = shard_store(bank.store, shard, device)
        bias = None if bank.gate_up_bias is None else (bank.gate_up_bias[shard.rows].clone(),
                                                       bank.down_bias[shard.rows].clone())
        sharded = ShardedExpertBank(store, f.activation, bank.hidden_size, bank.intermediate_size, shard=shard,
                                    parallel=bank.parallel, inside=dict(bank.inside) if bank.inside is not None
                                    else None, backend=bank.backend, max_group_bytes=bank.max_group_bytes,
                                    glu=bank.glu, bias=bias)
        block.experts = sharded
        peft.banks[layer] = sharded
        if peft.loaded.expert_stores:  # the streamed full store would otherwise stay alive
            peft.loaded.expert_stores[layer] = store
        del bank


def is_sharded(p: torch.Tensor) -> bool:
    """Whether a parameter (or bank) is one rank's shard of experts rather than a replica."""
    return bool(getattr(p, SHARD_ATTR, False))


# ---- state across ranks -------------------------------------------------------------------------
def gather_rows(t: torch.Tensor, group=None, dst: int | None = 0) -> torch.Tensor | None:
    """Every rank's shard of a fused tensor (leading expert axis), concatenated in rank order: on group rank
    `dst` (None: every rank); the others get None. Collective: every rank of `group` calls it."""
    rank, world = _group_rank_world(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts) if dst is None or rank == dst else None


def local_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's rows of a full fused tensor (leading expert axis) under an even split over `group`."""
    rank, world = _group_rank_world(group)
    if t.shape[0] % world:
        raise ValueError(f"local_rows: {t.shape[0]} rows do not split over {world} ranks.")
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def gather_expert_state(peft, group=None) -> dict[str, torch.Tensor]:
    """On group rank 0: the full adapter state dict, as one process holds it (sharded tensors gathered); on the
    other ranks: {}. Collective."""
    rank, _ = _group_rank_world(group)
    out = {}
    for name, p in peft.trainable_parameters():
        full = gather_rows(p, group) if is_sharded(p) else p.detach()
        if rank == 0:
            out[name] = full
    return out


def scatter_expert_state(peft, tensors: dict[str, torch.Tensor], group=None) -> None:
    """Load a full adapter state dict (as `gather_expert_state` returns it) into a sharded model: group rank 0's
    `tensors` are checked and broadcast (other ranks may pass {}), each rank keeps its rows. Collective; a
    mismatch raises the same ValueError on every rank."""
    rank, _ = _group_rank_world(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    params = peft.trainable_parameters()
    error = [_state_mismatch(params, tensors, group) if rank == 0 else None]
    dist.broadcast_object_list(error, src=src, group=group)
    if error[0]:
        raise ValueError(error[0])
    with torch.no_grad():
        for name, p in params:
            shape = _full_shape(p, group)
            full = tensors[name].to(device=p.device, dtype=p.dtype) if rank == 0 else \
                torch.empty(shape, dtype=p.dtype, device=p.device)
            dist.broadcast(full, src=src, group=group)
            p.copy_(local_rows(full, group) if is_sharded(p) else full)


def _full_shape(p: torch.Tensor, group) -> tuple[int, ...]:
    if not is_sharded(p):
        return tuple(p.shape)
    return (p.shape[0] * dist.get_world_size(group), *p.shape[1:])


def _state_mismatch(params: Sequence[tuple[str, torch.Tensor]], tensors: dict[str, torch.Tensor], group) -> str | None:
    names = {n for n, _ in params}
    if set(tensors) != names:
        missing, unexpected = sorted(names - set(tensors)), sorted(set(tensors) - names)
        return f"the adapter state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}."
    for name, p in params:
        want = _full_shape(p, group)
        if tuple(tensors[name].shape) != want:
            return f"{name}: saved shape {tuple(tensors[name].shape)}, expected {want}."
    return None


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, group=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over a model whose sharded parameters are split across `group`: the norm
    is that of every rank's gradients together (replicated ones counted once: they must be equal on every rank,
    i.e. already all-reduced). Collective; returns the total norm."""
    grads = [p for p in params if p.grad is not None]
    device = grads[0].grad.device if grads else torch.device("cpu")
    sq = {True: torch.zeros((), dtype=torch.float32, device=device),
          False: torch.zeros((), dtype=torch.float32, device=device)}
    for p in grads:
        sq[is_sharded(p)] += p.grad.detach().float().pow(2).sum()
    dist.all_reduce(sq[True], group=group)
    total = (sq[True] + sq[False]).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in grads:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total
