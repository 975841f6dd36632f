"""Experts that do not fit the GPU budget: a host store in (pinned) CPU memory, a cache of expert
slots on the compute device shared by all layers, copies on a side stream, and the schedule that
prefetches along the step's sweep (DESIGN "Memory").

- `HostExpertStore`: where an expert's raw (stored: NF4 or dense) tensors live on the host, and how
  to turn those tensors, once on the device, into dequantised weights. `DenseHostStore` holds plain
  tensors; a quantised store (engine.model.stores) provides the same two methods.
- `ExpertCache`: `num_slots` slots, each holding one expert's raw tensors, keyed (layer, expert).
  Eviction knows the sweep: the forward visits layers 0..L-1, the backward L-1..0, then the next
  step's forward, so the entry whose next use is furthest along that cycle goes first (the earliest
  layers during the forward, the last layers during the backward; the end of the forward keeps the
  last layers for the backward), ties least-recently-used. `prefetch()` copies on a side CUDA
  stream with events, and never evicts what is needed sooner than what it brings; on a CPU
  "device" everything is synchronous and the same bytes are counted. Counters: hits, misses,
  prefetched copies, bytes moved, per layer.
- `OffloadedExpertStore`: the `ExpertStore` interface (`num_experts`, `weights(e, device, dtype)`,
  `weights_batched`) of one layer, served from the cache; an ExpertBank uses it unchanged, one
  dequantisation per group of experts (their NF4 slots stacked on the device).
- `OffloadSchedule`: `LayerHooks` for `engine.training.steps.layer_major_step`: at each layer it tells the
  cache where the sweep is and prefetches the next layer (forward: the experts that layer used last
  step; backward: exactly the experts it used in this step's forward).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import torch

PHASES = ("forward", "backward")


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
    # in one dequantisation (OffloadedExpertStore.weights_batched uses it when it is there)


class DenseHostStore:
    """Unquantised experts in host memory, one contiguous (pinned when asked) pair per expert."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, pin: bool | None = None):
        pin = torch.cuda.is_available() if pin is None else pin
        self.num_experts = gate_up.shape[0]
        self._experts = []
        for e in range(self.num_experts):
            pair = {"gate_up": gate_up[e].detach().to("cpu", copy=True).contiguous(),
                    "down": down[e].detach().to("cpu", copy=True).contiguous()}
            if pin:
                pair = {k: v.pin_memory() for k, v in pair.items()}
            self._experts.append(pair)

    @classmethod
    def from_store(cls, store, pin: bool | None = None) -> "DenseHostStore":
        """Copy a resident fused store (`gate_up [E, 2I, H]`, `down [E, H, I]`) to host memory."""
        return cls(store.gate_up, store.down, pin=pin)

    def expert_tensors(self, expert: int) -> dict[str, torch.Tensor]:
        """One expert's `gate_up` and `down` in host memory."""
        return self._experts[expert]

    def weights_from_tensors(self, tensors, device, dtype):
        """New copies of the tensors on `device` in `dtype`."""
        return (tensors["gate_up"].to(device=device, dtype=dtype, copy=True),
                tensors["down"].to(device=device, dtype=dtype, copy=True))

    def weights_from_stacked(self, tensors, device, dtype):
        """The same for n experts' tensors stacked on a leading axis: gate_up [n, 2I, H], down [n, H, I]."""
        return self.weights_from_tensors(tensors, device, dtype)

    def nbytes(self) -> int:
        """Host bytes of all experts."""
        return sum(t.nbytes for pair in self._experts for t in pair.values())


def as_host_store(store, pin: bool | None = None) -> HostExpertStore:
    """A host store for an expert store: itself when it already is one, else a host copy of its experts."""
    if hasattr(store, "expert_tensors") and hasattr(store, "weights_from_tensors"):
        if (torch.cuda.is_available() if pin is None else pin) and hasattr(store, "pin_memory"):
            store.pin_memory()  # asynchronous copies to the GPU need page-locked host memory
        return store
    if hasattr(store, "gate_up") and hasattr(store, "down"):
        return DenseHostStore.from_store(store, pin=pin)
    raise TypeError(f"{type(store).__name__} cannot be offloaded: it needs expert_tensors(e) and "
                    "weights_from_tensors(tensors, device, dtype), or fused gate_up/down tensors.")


# ---- the cache ---------------------------------------------------------------------------------
@dataclass
class LayerCounts:
    """Cache traffic of one layer."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    bytes: int = 0


@dataclass
class CacheStats:
    """Cache traffic: requests served from a slot (hits), requests that had to copy (misses),
    copies issued ahead by prefetch, bytes moved host -> device, and the same per layer."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    evictions: int = 0
    bytes_moved: int = 0
    per_layer: dict[int, LayerCounts] = field(default_factory=lambda: defaultdict(LayerCounts))

    def as_dict(self) -> dict:
        """Plain numbers, for events and benchmarks."""
        return {"hits": self.hits, "misses": self.misses, "prefetched": self.prefetched,
                "evictions": self.evictions, "bytes_moved": self.bytes_moved,
                "per_layer": {k: vars(v).copy() for k, v in sorted(self.per_layer.items())}}


class _Slot:
    def __init__(self):
        self.key: tuple[int, int] | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.ready: torch.cuda.Event | None = None  # the copy into the slot is done
        self.read: torch.cuda.Event | None = None  # the last read of the slot is done
        self.last_use = 0


class ExpertCache:
    """A fixed number of expert slots on `device`, shared by every offloaded layer, keyed (layer, expert).

    `device` may be a CPU device (tests): copies are then synchronous, and bytes are counted the same.
    `num_layers` sets the sweep length (default: the highest registered layer + 1).
    """

    def __init__(self, num_slots: int, device: torch.device | str = "cuda", num_layers: int | None = None):
        if num_slots < 1:
            raise ValueError(f"ExpertCache: num_slots must be at least 1, got {num_slots}.")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_slots = num_slots
        self._num_layers = num_layers
        self._max_layer = 0
        self.slots = [_Slot() for _ in range(num_slots)]
        self.where: dict[tuple[int, int], int] = {}
        self._free = list(reversed(range(num_slots)))  # empty slots; pop() gives the lowest
        #: per layer: expert -> slot, least recently used first (eviction looks at one entry per layer)
        self._lru: dict[int, OrderedDict[int, int]] = defaultdict(OrderedDict)
        self.sources: dict[int, HostExpertStore] = {}
        self.stats = CacheStats()
        self.phase, self.layer = "forward", None
        #: experts requested per layer since that layer's forward began (the schedule's routing record)
        self.requested: dict[int, set[int]] = defaultdict(set)
        self._tick = 0
        self._cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self._cuda else None

    # ---- setup ---------------------------------------------------------------------------------
    def register(self, layer: int, host: HostExpertStore) -> None:
        """Serve `layer`'s experts from `host`."""
        self.sources[layer] = host
        self._max_layer = max(self._max_layer, layer)

    @property
    def num_layers(self) -> int:
        """Layers in one sweep."""
        return self._num_layers or self._max_layer + 1

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes one expert occupies in a slot (and moves over PCIe)."""
        return sum(t.nbytes for t in self.sources[layer].expert_tensors(expert).values())

    def reset_stats(self) -> None:
        """Zero the counters (the cache content stays)."""
        self.stats = CacheStats()

    def clear(self) -> None:
        """Forget every cached expert (slot memory is kept)."""
        self.synchronize()
        for slot in self.slots:
            slot.key = None
        self.where.clear()
        self._lru.clear()
        self._free = list(reversed(range(self.num_slots)))

    def synchronize(self) -> None:
        """Wait for copies in flight."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def resident(self, layer: int | None = None) -> list[tuple[int, int]]:
        """Cached keys (of one layer, or all), sorted."""
        return sorted(k for k in self.where if layer is None or k[0] == layer)

    # ---- where the sweep is --------------------------------------------------------------------
    def enter(self, phase: str, layer: int) -> None:
        """The sweep is now at `layer` going `phase` ("forward": 0..L-1, "backward": L-1..0)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase == "forward" and (self.phase, self.layer) != (phase, layer):
            self.requested[layer] = set()
        self.phase, self.layer = phase, layer

    def _position(self, phase: str, layer: int) -> int:
        return layer if phase == "forward" else 2 * self.num_layers - 1 - layer

    def _distance(self, layer: int) -> int:
        """How far along the forward/backward cycle `layer` is next needed (0: now)."""
        cycle = 2 * self.num_layers
        here = self._position(self.phase, self.layer if self.layer is not None else 0)
        return min((self._position("forward", layer) - here) % cycle,
                   (self._position("backward", layer) - here) % cycle)

    def _victim(self, need_farther_than: int | None = None) -> int | None:
        """The slot to reuse: an empty one, else the furthest next use (then least recently used)."""
        if self._free:
            return self._free[-1]
        best, best_rank = None, None
        for layer, entries in self._lru.items():  # O(layers): each layer's LRU entry is its candidate
            if not entries:
                continue
            index = next(iter(entries.values()))
            rank = (self._distance(layer), -self.slots[index].last_use)
            if best_rank is None or rank > best_rank:
                best, best_rank = index, rank
        if need_farther_than is not None and best_rank[0] <= need_farther_than:
            return None
        return best

    def _touch(self, index: int) -> None:
        slot = self.slots[index]
        self._tick += 1
        slot.last_use = self._tick
        self._lru[slot.key[0]].move_to_end(slot.key[1])

    # ---- moving experts ------------------------------------------------------------------------
    def _fill(self, index: int, key: tuple[int, int], side: bool) -> int:
        """Copy expert `key` into slot `index`: on the side stream (prefetch) or the current one (miss)."""
        slot = self.slots[index]
        if slot.key is not None:
            del self.where[slot.key]
            del self._lru[slot.key[0]][slot.key[1]]
            self.stats.evictions += 1
        elif self._free and self._free[-1] == index:
            self._free.pop()
        src = self.sources[key[0]].expert_tensors(key[1])
        if set(slot.tensors) != set(src) or any(slot.tensors[k].shape != v.shape or slot.tensors[k].dtype != v.dtype
                                                for k, v in src.items()):
            if slot.tensors and self._cuda:  # the old buffers may still be in use on either stream
                self.copy_stream.synchronize()
                torch.cuda.current_stream(self.device).synchronize()
            slot.tensors = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device) for k, v in src.items()}
        nbytes = 0
        if self._cuda:
            stream = self.copy_stream if side else torch.cuda.current_stream(self.device)
            if side and slot.read is not None:
                stream.wait_event(slot.read)  # readers of the old content are done
            if not side and slot.ready is not None:
                stream.wait_event(slot.ready)  # a prefetch may still be copying into this slot
            with torch.cuda.stream(stream):
                for k, v in src.items():
                    slot.tensors[k].copy_(v, non_blocking=True)
                    nbytes += v.nbytes
                slot.ready = torch.cuda.Event()
                slot.ready.record(stream)
        else:
            for k, v in src.items():
                slot.tensors[k].copy_(v)
                nbytes += v.nbytes
        slot.key = key
        self.where[key] = index
        self._lru[key[0]][key[1]] = index
        self.stats.bytes_moved += nbytes
        self.stats.per_layer[key[0]].bytes += nbytes
        return nbytes

    def get(self, layer: int, expert: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(slot index, raw tensors of the expert on the device), copying it in on a miss.

        Call `done_reading(slot)` once the reads of the tensors have been issued.
        """
        if layer != self.layer:  # no schedule told us: follow the request order
            self.phase = "forward" if self.layer is None or layer > self.layer else "backward"
            self.layer = layer
        key = (layer, expert)
        self.requested[layer].add(expert)
        counts = self.stats.per_layer[layer]
        index = self.where.get(key)
        if index is None:
            self.stats.misses += 1
            counts.misses += 1
            index = self._victim()
            self._fill(index, key, side=False)
        else:
            self.stats.hits += 1
            counts.hits += 1
        slot = self.slots[index]
        if self._cuda and slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self._touch(index)
        return index, slot.tensors

    def done_reading(self, index: int) -> None:
        """The reads of slot `index` are issued on the current stream: a later copy into it waits for them."""
        if self._cuda:
            slot = self.slots[index]
            slot.read = torch.cuda.Event()
            slot.read.record(torch.cuda.current_stream(self.device))

    def prefetch(self, layer: int, experts: Iterable[int]) -> int:
        """Start copying experts of `layer` that are not cached (side stream on CUDA); returns copies issued.

        Stops when the only slots left hold experts needed sooner than `layer`.
        """
        if layer not in self.sources:
            return 0
        target = self._distance(layer)
        issued = 0
        for e in sorted(set(experts)):
            key = (layer, e)
            if key in self.where:
                continue
            index = self._victim(need_farther_than=target)
            if index is None:
                break
            self._fill(index, key, side=True)
            self._touch(index)
            self.stats.prefetched += 1
            self.stats.per_layer[layer].prefetched += 1
            issued += 1
        return issued


class OffloadedExpertStore:
    """One layer's experts served through an ExpertCache: the `ExpertStore` interface of engine.model.expert_bank.

    `weights_batched` (what the expert bank's grouped path asks for) gathers a group's raw (NF4) tensors from
    their cache slots into one stacked buffer on the device, each slot read once, and dequantises the group in
    one call (`host.weights_from_stacked`); `batched=False`, or a host without that method, dequantises expert
    by expert instead (the earlier path, kept as the reference). Either way each expert crosses PCIe only on
    a cache miss or prefetch: the stacked buffer is a device-side copy.
    """

    def __init__(self, host: HostExpertStore, layer: int, cache: ExpertCache, batched: bool = True):
        self.host, self.layer, self.cache = host, layer, cache
        self.num_experts = host.num_experts
        self.batched = batched and hasattr(host, "weights_from_stacked")
        cache.register(layer, host)

    def weights_batched(self, experts: Sequence[int], device: torch.device,
                        dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [n, 2I, H] and down [n, H, I] of `experts`, dequantised on `device`: one dequantisation of the
        group from its stacked cache slots (or expert by expert, see the class)."""
        if not self.batched:
            from .expert_bank import stack_weights

            return stack_weights(self, experts, device, dtype)
        stacked: dict[str, torch.Tensor] = {}
        for i, e in enumerate(experts):
            index, tensors = self.cache.get(self.layer, e)
            for k, v in tensors.items():
                if k not in stacked:
                    stacked[k] = torch.empty((len(experts), *v.shape), dtype=v.dtype, device=v.device)
                stacked[k][i].copy_(v)
            self.cache.done_reading(index)
        return self.host.weights_from_stacked(stacked, device, dtype)

    def weights(self, expert: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I] of `expert`, dequantised on `device` from its cache slot."""
        index, tensors = self.cache.get(self.layer, expert)
        gate_up, down = self.host.weights_from_tensors(tensors, device, dtype)
        ptrs = {t.data_ptr() for t in tensors.values()}
        if gate_up.data_ptr() in ptrs:  # never hand out a view of a slot that may be overwritten
            gate_up = gate_up.clone()
        if down.data_ptr() in ptrs:
            down = down.clone()
        self.cache.done_reading(index)
        return gate_up, down


class OffloadSchedule:
    """LayerHooks for the layer-major step: keeps the cache told where the sweep is and prefetches
    the next layer while the current one computes.

    forward_prefetch: "previous" (the experts the layer was routed to last step; nothing on the
    first step), "all" (every expert of the layer) or "none". The backward always prefetches exactly
    the experts the forward routed to.
    """

    def __init__(self, cache: ExpertCache, forward_prefetch: str = "previous"):
        if forward_prefetch not in ("previous", "all", "none"):
            raise ValueError(f"forward_prefetch must be previous, all or none, got {forward_prefetch!r}")
        self.cache, self.forward_prefetch = cache, forward_prefetch

    def _forward_set(self, layer: int) -> set[int]:
        if self.forward_prefetch == "all":
            return set(range(self.cache.sources[layer].num_experts))
        if self.forward_prefetch == "previous":  # not yet cleared for this step: last step's routing
            return set(self.cache.requested.get(layer, ()))
        return set()

    def begin(self, phase: str, layer: int) -> None:
        """Enter `layer`: prefetch what it needs (if not there yet), then the next offloaded layer of the sweep."""
        cache = self.cache
        layers = sorted(cache.sources)
        if phase == "forward":
            ahead = {l: self._forward_set(l) for l in [l for l in layers if l >= layer][:2]}
        else:
            ahead = {l: set(cache.requested.get(l, ())) for l in [l for l in reversed(layers) if l <= layer][:2]}
        cache.enter(phase, layer)
        for l, experts in ahead.items():
            cache.prefetch(l, experts)

    def end(self, phase: str, layer: int) -> None:
        """Nothing to do after a layer: slots are reused by the policy."""


def offload_banks(banks: dict[int, "torch.nn.Module"], num_slots: int, device: torch.device | str = "cuda",
                  num_layers: int | None = None, pin: bool | None = None) -> ExpertCache:
    """Move the experts of every ExpertBank (by layer) behind one cache of `num_slots` slots on `device`."""
    cache = ExpertCache(num_slots, device, num_layers)
    for layer, bank in sorted(banks.items()):
        bank.store = OffloadedExpertStore(as_host_store(bank.store, pin=pin), layer, cache)
    return cache
