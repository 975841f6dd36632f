"""The frozen expert bank: replaces a family's experts module, computes only the (token, expert)
pairs the router chose, grouped by expert, and runs the `embedded` adapters inside.

A layer's routed pairs are sorted by expert once; then the whole layer is a handful of grouped
operations, with no Python loop over experts:
- the touched experts' weights dequantised in one batched call (`store.weights_batched`, from the
  stacked NF4 tensors; a store without it is read expert by expert into one stacked buffer);
- one grouped GEMM per projection (`engine.model.grouped`: `torch._grouped_mm` where the device supports it,
  segment matmuls elsewhere);
- the per-expert adapters (`inside` LoRA, `parallel` LoRA / bottleneck / gated) batched over experts
  in the same grouped form (`AdapterBank.forward_grouped`; `inside` gate and up as one pair,
  `AdapterBank.forward_pair_grouped`);
- one `index_add_` of the gated outputs, in the order transformers' eager loop adds them.

Dequantised weights are never kept for backward: `GroupedFrozenLinear` saves nothing of the weights and
dequantises them again (one batched call per pass) when the gradient of its input is needed — except right
after a gradient-checkpoint recompute of a one-group layer, whose weights go straight to the backward that
follows (`_RecomputeHandoff`: two decodes a layer-step, not three). Touched
experts are taken in chunks (`group_size`: a quarter of the layer's experts or 32 MiB, whichever is more,
within `max_group_bytes` of dequantised weights), which bounds the transient memory of a layer.

Backends (`model.expert_backend`): `torch` as above; `grouped-nf4-gemm` (CUDA, optional package) decodes
NF4 inside the grouped GEMM and its backward, so nothing is dequantised at all; `auto` takes the kernels
when they are installed and the layer qualifies, else `torch`. `loop` is the earlier per-expert path
(one dequantisation, two `F.linear` and the adapter calls per expert), kept as the reference.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .grouped import group_offsets, group_rows, grouped_mm_frozen, sort_by_group

if TYPE_CHECKING:  # the banks are handed in by engine.adapters.attach; the model layer never imports adapters
    from ..adapters.banks import AdapterBank

#: ExpertBank backends; the config's `model.expert_backend` takes the first three
BACKENDS = ("auto", "torch", "grouped-nf4-gemm", "loop")
#: most bytes of dequantised expert weights one grouped pass holds at a time (more touched experts: chunks) ...
MAX_GROUP_BYTES = 256 << 20
#: ... and at most 1/GROUPS_PER_LAYER of a layer's experts, so the transient stays a fraction of the layer ...
GROUPS_PER_LAYER = 4
#: ... unless that is under MIN_GROUP_BYTES (small layers: one more group costs more time than it saves memory)
MIN_GROUP_BYTES = 32 << 20
KERNEL_MODULE = "nf4_grouped"  # the module the `grouped-nf4-gemm` distribution installs


class ExpertStore(Protocol):
    """Where frozen expert weights live (resident bf16, NF4, offloaded...)."""

    num_experts: int

    def weights(self, expert: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I] of one expert, dequantised on `device`."""
        ...


# ---- per-expert reference path ------------------------------------------------------------------
class _ExpertWeights:
    """One expert's weights fetched at most once per pass; dropped after the last use."""

    def __init__(self, store: ExpertStore, expert: int, device, dtype):
        self.store, self.expert, self.device, self.dtype = store, expert, device, dtype
        self._w: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, which: int) -> torch.Tensor:
        if self._w is None:
            self._w = self.store.weights(self.expert, self.device, self.dtype)
        return self._w[which]

    def release(self) -> None:
        self._w = None


class FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ for a frozen W that is re-fetched in backward instead of being saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: _ExpertWeights, which: int, release_after_backward: bool):
        ctx.weights, ctx.which, ctx.release = weights, which, release_after_backward
        return F.linear(x, weights.get(which))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = ctx.weights.get(ctx.which)
        grad_x = grad @ w.to(grad.dtype)
        if ctx.release:
            ctx.weights.release()
        return grad_x, None, None, None


# ---- grouped path -------------------------------------------------------------------------------
def fetch_weights(store, experts: Sequence[int], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [n, 2I, H] and down [n, H, I] of `experts`: one batched call when the store has one, else
    expert by expert into one stacked buffer (one expert's temporary at a time)."""
    batched = getattr(store, "weights_batched", None)
    if batched is not None:
        return batched(experts, device, dtype)
    return stack_weights(store, experts, device, dtype)


def stack_weights(store, experts: Sequence[int], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [n, 2I, H] and down [n, H, I] of `experts` read expert by expert (`store.weights`) into one
    stacked buffer, one expert's temporary at a time: the per-expert path."""
    gate_up = down = None
    for i, e in enumerate(experts):
        gu, dn = store.weights(e, device, dtype)
        if gate_up is None:
            gate_up = gu.new_empty(len(experts), *gu.shape)
            down = dn.new_empty(len(experts), *dn.shape)
        gate_up[i].copy_(gu)
        down[i].copy_(dn)
        del gu, dn
    return gate_up, down


class _DequantisedGroup:
    """The touched experts of one chunk, dequantised at most once per pass (both projections in one
    batched fetch), dropped after the last use; grouped GEMMs over them."""

    def __init__(self, store, experts: list[int], counts: list[int], offs: torch.Tensor, device, dtype,
                 handoff: "_RecomputeHandoff | None" = None):
        self.store, self.experts, self.counts, self.offs = store, experts, counts, offs
        self.device, self.dtype, self.handoff = device, dtype, handoff
        self.key = (tuple(experts), device, dtype)
        self._w: tuple[torch.Tensor, torch.Tensor] | None = None

    def _get(self, which: int) -> torch.Tensor:
        if self._w is None and self.handoff is not None:
            self._w = self.handoff.take(self.key)
        if self._w is None:
            self._w = fetch_weights(self.store, self.experts, self.device, self.dtype)
        return self._w[which]

    def forward_mm(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x [N, in] -> [N, out]: each group's rows times its expert's Wᵀ."""
        w = self._get(which)
        return grouped_mm_frozen(x, w.transpose(1, 2).to(x.dtype), self.offs, self.counts)

    def backward_mm(self, grad: torch.Tensor, which: int) -> torch.Tensor:
        """grad [N, out] -> [N, in]: each group's rows times its expert's W."""
        w = self._get(which)
        return grouped_mm_frozen(grad, w.to(grad.dtype), self.offs, self.counts)

    def release(self) -> None:
        self._w = None


class _RecomputeHandoff:
    """The weights a checkpoint recompute (a forward run by the autograd engine, inside backward) dequantised,
    handed to the backward of the same experts that follows at once, so a checkpointed layer dequantises twice
    a step, not three times. One entry, taken once; a forward outside backward drops it."""

    def __init__(self):
        self.key, self.weights = None, None

    def put(self, key: tuple, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Keep `weights` for the next `take(key)`."""
        self.key, self.weights = key, weights

    def take(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept weights when they are `key`'s (then forgotten), else None."""
        if self.key != key:
            return None
        weights, self.key, self.weights = self.weights, None, None
        return weights

    def clear(self) -> None:
        """Drop what is kept."""
        self.key, self.weights = None, None


class _PackedGroup:
    """The touched experts through the `grouped-nf4-gemm` kernels: NF4 decoded inside the GEMM (forward)
    and inside its transposed GEMM (backward, dgrad); nothing is dequantised or kept.

    Written against grouped-nf4-gemm 0.51's documented API (`nf4_grouped.gemm_4bit_grouped` /
    `dgrad_4bit_grouped`: `a [T, K]` bf16 group-sorted, `B [E, N, K/2]` uint8, fp32 `absmax [E, N, K/64]`,
    per-group `sizes`, `expert_ids`); it runs only on CUDA and has NOT been run by this project yet (no GPU
    was lent when it was written; Triton's CPU interpreter, 3.4 and 3.9, fails inside the package's own
    kernels). What is checked on the CPU: `NF4ExpertStore.packed_operands` decodes, as the package's
    `dequant_ref` does, to the stored weights (tests/test_experts_grouped.py). A GPU run must compare it with
    the `torch` backend (bench/bench_step.py --expert-backend) before it is trusted. Imported lazily, so CPU
    runs never import it.
    """

    def __init__(self, store, experts: list[int], counts: list[int]):
        self.store, self.experts, self.counts = store, experts, counts

    def _operands(self, which: int, device: torch.device):
        return self.store.packed_operands(("gate_up", "down")[which], device)

    def forward_mm(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x [N, in] bf16 -> [N, out] bf16 by the fused NF4 grouped GEMM."""
        from nf4_grouped import gemm_4bit_grouped

        packed, absmax = self._operands(which, x.device)
        return gemm_4bit_grouped(x.contiguous(), packed, absmax, self.counts, self.experts)

    def backward_mm(self, grad: torch.Tensor, which: int) -> torch.Tensor:
        """grad [N, out] -> [N, in] by the fused dgrad kernel (dequantise-then-GEMM when it declines the shape)."""
        from nf4_grouped import dgrad_4bit_grouped, dgrad_eligible

        grad = grad.to(torch.bfloat16).contiguous()
        packed, absmax = self._operands(which, grad.device)
        if dgrad_eligible(grad, packed, absmax) is None:
            return dgrad_4bit_grouped(grad, packed, absmax, self.counts, self.experts)
        w = fetch_weights(self.store, self.experts, grad.device, grad.dtype)[which]
        return grouped_mm_frozen(grad, w, group_offsets(self.counts, grad.device), self.counts)

    def release(self) -> None:
        """Nothing is held."""


class GroupedFrozenLinear(torch.autograd.Function):
    """y = x Wₑᵀ for every group of rows with its frozen expert weight; the weights are fetched again in
    backward (nothing of them is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, which: int, release_after_backward: bool):
        ctx.group, ctx.which, ctx.release = group, which, release_after_backward
        return group.forward_mm(x, which)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = ctx.group.backward_mm(grad.contiguous(), ctx.which)
        if ctx.release:
            ctx.group.release()
        ctx.group = None
        return grad_x, None, None, None


def group_size(num_experts: int, hidden_size: int, intermediate_size: int, itemsize: int,
               max_group_bytes: int = MAX_GROUP_BYTES) -> int:
    """Experts one grouped pass dequantises at a time: a 1/GROUPS_PER_LAYER share of the layer or MIN_GROUP_BYTES,
    whichever is more, within `max_group_bytes`, at least one (the planner's dequantisation workspace)."""
    per = 3 * hidden_size * intermediate_size * itemsize
    share = max(-(-num_experts // GROUPS_PER_LAYER), MIN_GROUP_BYTES // per)
    return max(1, min(max_group_bytes // per, share))


def kernels_installed() -> bool:
    """Whether the optional `grouped-nf4-gemm` package is importable (checked without importing it)."""
    return importlib.util.find_spec(KERNEL_MODULE) is not None


class ExpertBank(nn.Module):
    """Experts of one MoE layer, computed sparsely from a weight store, with optional per-expert adapters.

    `parallel`: an AdapterBank of E adapters H -> H, P_e(h) added beside expert e before gating.
    `inside`:   LoRA banks on each expert's gate, up and down projections.
    `backend`:  one of BACKENDS (module docstring).
    `glu`:      the experts' gated activation (gate, up) -> hidden, when it is not act(gate)·up (gpt-oss).
    `bias`:     the experts' biases, gate_up [E, 2I] (gate then up) and down [E, H], added before the gate g_e.
    """

    def __init__(self, store: ExpertStore, activation: str, hidden_size: int, intermediate_size: int,
                 parallel: AdapterBank | None = None, inside: dict[str, AdapterBank] | None = None,
                 backend: str = "auto", max_group_bytes: int = MAX_GROUP_BYTES, glu=None,
                 bias: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        from transformers.activations import ACT2FN

        if backend not in BACKENDS:
            raise ValueError(f"model.expert_backend: {backend!r} is not one of {', '.join(BACKENDS[:3])}.")
        if backend == "grouped-nf4-gemm" and not kernels_installed():
            raise ValueError("model.expert_backend: grouped-nf4-gemm is not installed; `pip install "
                             "grouped-nf4-gemm` (CUDA only), or set model.expert_backend to auto or torch.")
        self.store = store
        self.num_experts = store.num_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.act_fn = ACT2FN[activation]
        self.glu = glu
        if bias is not None:  # frozen, not saved with the adapter (the base checkpoint has them)
            self.register_buffer("gate_up_bias", bias[0].detach(), persistent=False)
            self.register_buffer("down_bias", bias[1].detach(), persistent=False)
        else:
            self.gate_up_bias = self.down_bias = None
        self.parallel = parallel
        self.inside = nn.ModuleDict(inside) if inside else None
        self.backend, self.max_group_bytes = backend, max_group_bytes
        #: the backend the last grouped forward used ("torch" or "grouped-nf4-gemm")
        self.last_backend: str | None = None
        self._handoff = _RecomputeHandoff()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.backend == "loop":
            return self.forward_loop(hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        per_expert, toks, slots = self._by_expert(top_k_index)
        if not any(per_expert):
            return out
        x = hidden_states[toks].to(_compute_dtype(hidden_states))
        gates = top_k_weights[toks, slots, None]
        # a checkpoint recompute of a layer that is one group: its backward follows at once and takes its weights
        recompute = torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1
        if not recompute:
            self._handoff.clear()
        for rows, y in self._grouped(x, per_expert, hand_off=recompute):
            whole = rows.start == 0 and rows.stop == x.shape[0]
            g = gates if whole else gates[rows]
            out.index_add_(0, toks if whole else toks[rows], (y * g).to(out.dtype))
        return out

    def _grouped(self, x: torch.Tensor, per_expert: Sequence[int],
                 hand_off: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
        """The experts (plus their adapters) on rows `x` sorted by expert (`per_expert[e]` rows of expert e, at
        least one expert with rows), a group of experts at a time: (the group's rows of x, their outputs).
        `hand_off`: a recompute whose one group keeps its weights for the backward that follows."""
        experts = [e for e, n in enumerate(per_expert) if n]
        packed = self._use_kernels(x)
        self.last_backend = "grouped-nf4-gemm" if packed else "torch"
        chunks = [experts] if packed else self._chunks(experts, x.dtype)
        start = 0
        for chunk in chunks:
            counts = [per_expert[e] for e in chunk]
            rows = slice(start, start + sum(counts))
            start = rows.stop
            whole = rows.start == 0 and rows.stop == x.shape[0]
            yield rows, self._group_forward(x if whole else x[rows], chunk, counts, packed,
                                            hand_off=hand_off and len(chunks) == 1)

    def _by_expert(self, top_k_index: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(token, slot) pairs grouped by expert (engine.model.grouped.sort_by_group)."""
        return sort_by_group(top_k_index, self.num_experts)

    def _chunks(self, experts: list[int], dtype: torch.dtype) -> list[list[int]]:
        n = group_size(self.num_experts, self.hidden_size, self.intermediate_size,
                       torch.empty((), dtype=dtype).element_size(), self.max_group_bytes)
        return [experts[i:i + n] for i in range(0, len(experts), n)]

    def _use_kernels(self, x: torch.Tensor) -> bool:
        """Whether this pass runs on the grouped-nf4-gemm kernels (raises when they are forced and cannot)."""
        if self.backend not in ("auto", "grouped-nf4-gemm"):
            return False
        why = self._kernels_unavailable(x)
        if why is not None and self.backend == "grouped-nf4-gemm":
            raise RuntimeError(f"model.expert_backend is grouped-nf4-gemm, but {why}; set it to auto or torch.")
        return why is None

    def _kernels_unavailable(self, x: torch.Tensor) -> str | None:
        if x.device.type != "cuda":
            return f"the experts compute on {x.device.type}, and its kernels are CUDA only"
        if x.dtype != torch.bfloat16:
            return f"the experts compute in {x.dtype}, and its kernels take bfloat16"
        if not kernels_installed():
            return "grouped-nf4-gemm is not installed"
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return "the GPU is older than sm_80"
        if not hasattr(self.store, "packed_operands"):
            return f"the experts are not resident NF4 ({type(self.store).__name__})"
        if self.hidden_size % 64 or self.intermediate_size % 64:
            return "hidden and expert intermediate sizes must be multiples of 64"
        if not self.store.packed_available("down", x.device):
            return "the NF4 experts are not on the compute device"
        return None

    def _group_forward(self, x: torch.Tensor, experts: list[int], counts: list[int], packed: bool,
                       hand_off: bool = False) -> torch.Tensor:
        """Experts (plus their adapters) on their groups of rows: x [N, H] sorted by expert -> [N, H]; `hand_off`:
        keep the dequantised weights for the backward that follows (a checkpoint recompute)."""
        offs = group_offsets(counts, x.device)
        group = _PackedGroup(self.store, experts, counts) if packed else \
            _DequantisedGroup(self.store, experts, counts, offs, x.device, x.dtype, self._handoff)
        gate_up = GroupedFrozenLinear.apply(x, group, 0, True)
        if self.gate_up_bias is not None:
            gate_up = gate_up + group_rows(self.gate_up_bias, experts, counts).to(gate_up.dtype)
        if self.inside is not None:
            gate_up = gate_up + self._inside_gate_up(x, experts, offs, counts).to(gate_up.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        act = self._activate(gate, up)
        # the gate_up backward releases the weights; when it will not run (x needs no gradient), the down one does
        y = GroupedFrozenLinear.apply(act, group, 1, not x.requires_grad)
        if self.down_bias is not None:
            y = y + group_rows(self.down_bias, experts, counts).to(y.dtype)
        if hand_off and not packed:
            self._handoff.put(group.key, group._w)
        group.release()  # forward is done with the weights; backward fetches them again (or takes the handoff)
        if self.inside is not None:
            y = y + self.inside["down"].forward_grouped(act, experts, offs, counts).to(y.dtype)
        if self.parallel is not None:
            y = y + self.parallel.forward_grouped(x, experts, offs, counts).to(y.dtype)
        return y

    def _activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The experts' gated activation: act(gate)·up, or the family's own form (`glu`)."""
        return self.act_fn(gate) * up if self.glu is None else self.glu(gate, up)

    def _inside_gate_up(self, x: torch.Tensor, experts: list[int], offs: torch.Tensor,
                        counts: list[int]) -> torch.Tensor:
        """The `inside` LoRA deltas of gate and up, side by side [N, 2I]: one pair of grouped matmuls for both."""
        g, u = self.inside["gate"], self.inside["up"]
        if g.pairs_with(u):
            return g.forward_pair_grouped(u, x, experts, offs, counts)
        return torch.cat([g.forward_grouped(x, experts, offs, counts), u.forward_grouped(x, experts, offs, counts)], -1)

    # ---- the per-expert reference -----------------------------------------------------------------
    def forward_loop(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
        """The earlier per-expert loop (backend `loop`): the reference the grouped path is tested against."""
        out = torch.zeros_like(hidden_states)
        counts, toks, slots = self._by_expert(top_k_index)
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            tok, pos = toks[start:start + n], slots[start:start + n]
            start += n
            y = self.expert_forward(hidden_states[tok], e)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e (plus its adapter) on the tokens routed to it: x [t, H] -> [t, H]."""
        w = _ExpertWeights(self.store, e, x.device, x.dtype)
        gate_up = FrozenLinear.apply(x, w, 0, True)
        if self.gate_up_bias is not None:
            gate_up = gate_up + self.gate_up_bias[e].to(gate_up.dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        if self.inside is not None:
            gate = gate + self.inside["gate"].forward_one(x, e)
            up = up + self.inside["up"].forward_one(x, e)
        act = self._activate(gate, up)
        y = FrozenLinear.apply(act, w, 1, False)
        w.release()  # forward is done with the weights; backward fetches them again
        if self.down_bias is not None:
            y = y + self.down_bias[e].to(y.dtype)
        if self.inside is not None:
            y = y + self.inside["down"].forward_one(act, e)
        if self.parallel is not None:
            y = y + self.parallel.forward_one(x, e)
        return y


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device (as F.linear would), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
