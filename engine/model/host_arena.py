"""One MoE layer's experts in host memory as the offload cache wants them: a single buffer (an arena) holding the
experts one after another, each expert's tensors side by side in one fixed-size record, page-locked as a whole.

Why one arena, not `Tensor.pin_memory()` per tensor: torch's pinned-memory allocator (CachingHostAllocator) rounds
every block up to a power of two, so the stacked per-layer NF4 tensors of Mixtral pinned 26.6 GB for 23.3 GB of
experts (+14 %), Qwen3-30B-A3B 19.9 GB for 15.0 (+33 %), Qwen1.5-MoE 10.0 for 6.4 (+55 %). The arena is a plain
host allocation of exactly `arena_nbytes` bytes, page-locked with `cudaHostRegister` (what torch.distributed's
checkpoint stager does for its staging buffers), so the pinned bytes are the planner's host figure, to the byte.

Why expert-major records: one expert is one contiguous byte range, and consecutive experts are consecutive
ranges, so the cache copies an expert — or a run of them into consecutive slots — in one copy, not one per tensor
(an NF4 expert is 8 tensors).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Protocol

import torch

#: every tensor of a record starts on a 16-byte boundary (fp32 / bf16 views, 16-byte aligned GEMM operands)
ALIGN = 16
#: the arena is page-aligned and a whole number of pages, so registering it never touches another allocation's page
PAGE = 4096

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class RecordLayout:
    """Where each tensor of one record (one expert) sits: name -> (byte offset, shape, dtype)."""

    fields: dict[str, tuple[int, tuple[int, ...], torch.dtype]]
    nbytes: int  # the record's size, a multiple of ALIGN
    data_nbytes: int  # the tensors' own bytes (without the alignment padding)

    @classmethod
    def of(cls, specs: Specs) -> "RecordLayout":
        """The layout of tensors with these (shape, dtype), in the given order."""
        fields, offset, data = {}, 0, 0
        for name, (shape, dtype) in specs.items():
            fields[name] = (offset, tuple(shape), dtype)
            size = _nbytes(tuple(shape), dtype)
            data += size
            offset = _round(offset + size, ALIGN)
        return cls(fields, offset, data)

    @classmethod
    def of_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RecordLayout":
        """The layout of one expert's tensors as a host store hands them out."""
        return cls.of({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})

    def views(self, record: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors inside one record (uint8 [>= nbytes], contiguous): contiguous views, no copy."""
        out = {}
        for name, (offset, shape, dtype) in self.fields.items():
            size = _nbytes(shape, dtype)
            out[name] = record[offset:offset + size].view(dtype).view(shape)
        return out

    def stacked_views(self, records: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of n records (uint8 [n, >= nbytes], rows contiguous) as [n, *shape] strided views, no copy."""
        n = records.shape[0]
        out = {}
        for name, (offset, shape, dtype) in self.fields.items():
            size = _nbytes(shape, dtype)
            out[name] = records[:, offset:offset + size].view(dtype).view(n, *shape)
        return out


def arena_nbytes(per_expert: Specs, num_experts: int, shared: Specs | None = None) -> int:
    """Bytes of the arena of `num_experts` records of `per_expert` tensors and one record of `shared` ones (code
    tables): what `HostArena` allocates and pins, and what the planner counts as pinned host memory."""
    shared_bytes = RecordLayout.of(shared or {}).nbytes
    return _round(num_experts * RecordLayout.of(per_expert).nbytes + shared_bytes, PAGE)


def _register(ptr: int, nbytes: int) -> None:
    """Page-lock [ptr, ptr + nbytes) for the current CUDA context (portable: every device's copies are async)."""
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))  # 1: cudaHostRegisterPortable
    if err != 0:
        raise RuntimeError(f"pinning {nbytes / 1e9:.2f} GB of host memory for the offloaded experts failed (CUDA "
                           f"error {err}); lower the number of offloaded layers or free host memory.")


def _unregister(ptr: int, buffer: torch.Tensor) -> None:
    del buffer  # kept alive until now by this finalizer's arguments
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: the process is going away with its mappings
        pass


class HostArena:
    """`per_expert` tensors ([E, ...] each) and `shared` ones (no expert axis) copied into one host buffer of
    `arena_nbytes` bytes, expert after expert; `pin` page-locks it (cudaHostRegister, undone when the arena goes).

    `tensors`: the same names as [E, ...] strided views (and the shared ones), to use in place of the originals;
    `records` uint8 [E, layout.nbytes]; `layout` one record's RecordLayout.
    """

    def __init__(self, per_expert: dict[str, torch.Tensor], shared: dict[str, torch.Tensor] | None = None,
                 pin: bool = False):
        shared = shared or {}
        first = next(iter(per_expert.values()))
        self.num_experts = first.shape[0]
        self.layout = RecordLayout.of({k: (tuple(v.shape[1:]), v.dtype) for k, v in per_expert.items()})
        shared_layout = RecordLayout.of_tensors(shared)
        self.nbytes = arena_nbytes({k: (tuple(v.shape[1:]), v.dtype) for k, v in per_expert.items()},
                                   self.num_experts, {k: (tuple(v.shape), v.dtype) for k, v in shared.items()})
        buffer = torch.empty(self.nbytes + PAGE, dtype=torch.uint8)  # plain host memory: exactly what is asked
        start = (-buffer.data_ptr()) % PAGE
        self.buffer = buffer[start:start + self.nbytes]  # page-aligned, whole pages, inside `buffer`
        body = self.num_experts * self.layout.nbytes
        self.records = self.buffer[:body].view(self.num_experts, self.layout.nbytes)
        self.tensors = self.layout.stacked_views(self.records)
        self.tensors.update(shared_layout.views(self.buffer[body:body + shared_layout.nbytes]))
        with torch.no_grad():
            for name, t in {**per_expert, **shared}.items():
                self.tensors[name].copy_(t)
        self.pinned = False
        if pin:
            self.pin()

    def pin(self) -> "HostArena":
        """Page-lock the arena (once); returns self."""
        if not self.pinned:
            ptr = self.buffer.data_ptr()
            _register(ptr, self.nbytes)
            weakref.finalize(self, _unregister, ptr, self.buffer)
            self.pinned = True
        return self

    def expert(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's tensors: views into its record."""
        return self.layout.views(self.records[e])


# ---- host stores -------------------------------------------------------------------------------
class HostExpertStore(Protocol):
    """Experts of one layer in host memory, as the raw tensors the cache moves."""

    num_experts: int

    def expert_tensors(self, expert: int) -> dict[str, torch.Tensor]:
        """The stored (possibly quantised) tensors of one expert, on the host."""
        ...

    def weights_from_tensors(self, tensors: dict[str, torch.Tensor], device: torch.device,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I], dequantised from `tensors` (already on `device`), as new tensors."""
        ...

    # optional: weights_from_stacked(tensors stacked [n, ...], device, dtype) -> gate_up [n, 2I, H], down [n, H, I]
    # in one dequantisation (OffloadedExpertStore.weights_batched uses it when it is there); `arena` (a HostArena
    # whose records are the experts): the cache then copies an expert, or a run of them, in one copy


class DenseHostStore:
    """Unquantised experts in host memory: one arena, expert after expert (page-locked when asked)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, pin: bool | None = None):
        pin = torch.cuda.is_available() if pin is None else pin
        self.num_experts = gate_up.shape[0]
        self.arena = HostArena({"gate_up": gate_up.detach(), "down": down.detach()}, pin=pin)

    @classmethod
    def from_store(cls, store, pin: bool | None = None) -> "DenseHostStore":
        """Copy a resident fused store (`gate_up [E, 2I, H]`, `down [E, H, I]`) to host memory."""
        return cls(store.gate_up, store.down, pin=pin)

    def expert_tensors(self, expert: int) -> dict[str, torch.Tensor]:
        """One expert's `gate_up` and `down` in host memory (views into its record)."""
        return self.arena.expert(expert)

    def weights_from_tensors(self, tensors, device, dtype):
        """New copies of the tensors on `device` in `dtype`."""
        return (tensors["gate_up"].to(device=device, dtype=dtype, copy=True),
                tensors["down"].to(device=device, dtype=dtype, copy=True))

    def weights_from_stacked(self, tensors, device, dtype):
        """The same for n experts' tensors stacked on a leading axis: gate_up [n, 2I, H], down [n, H, I]."""
        return self.weights_from_tensors(tensors, device, dtype)

    def nbytes(self) -> int:
        """Host bytes of all experts (their tensors; the arena adds at most 15 bytes a tensor and a page)."""
        return self.num_experts * self.arena.layout.data_nbytes


def as_host_store(store, pin: bool | None = None) -> HostExpertStore:
    """A host store for an expert store: itself (packed into its host arena) when it already is one, else a host
    copy of its experts; page-locked when `pin` (default: when CUDA is there)."""
    pin = torch.cuda.is_available() if pin is None else pin
    if hasattr(store, "expert_tensors") and hasattr(store, "weights_from_tensors"):
        if hasattr(store, "pin_memory"):
            store.pin_memory(pin)  # one arena, expert after expert; page-locked for asynchronous copies
        return store
    if hasattr(store, "gate_up") and hasattr(store, "down"):
        return DenseHostStore.from_store(store, pin=pin)
    raise TypeError(f"{type(store).__name__} cannot be offloaded: it needs expert_tensors(e) and "
                    "weights_from_tensors(tensors, device, dtype), or fused gate_up/down tensors.")


def host_layout(host) -> RecordLayout:
    """One expert's record layout for a host store: its arena's, else laid out from its expert 0's tensors."""
    arena = getattr(host, "arena", None)
    return arena.layout if arena is not None else RecordLayout.of_tensors(host.expert_tensors(0))
