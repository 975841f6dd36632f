"""Experts that do not fit the GPU budget: a host store in (pinned) CPU memory, a cache of expert
slots on the compute device shared by all layers, copies on a side stream, and the schedule that
prefetches along the step's sweep (DESIGN "Memory").

- the host side (`HostExpertStore`, `DenseHostStore`, `as_host_store`: one exact, page-locked arena a layer,
  expert after expert) is `engine.model.host_arena`, re-exported here.
- `ExpertCache`: `num_slots` slots (one device buffer), each holding one expert's raw record, keyed (layer, expert).
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

import contextlib
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .grouped import host_tensor_to
from .host_arena import DenseHostStore, HostExpertStore, RecordLayout, as_host_store, host_layout

PHASES = ("forward", "backward")

__all__ = ["DenseHostStore", "ExpertCache", "HostExpertStore", "OffloadSchedule", "OffloadedExpertStore",
           "as_host_store", "offload_banks"]  # the host side re-exported from engine.model.host_arena


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
        self.layout: RecordLayout | None = None  # the layout `tensors` were cut with


class ExpertCache:
    """A fixed number of expert slots on `device`, shared by every offloaded layer, keyed (layer, expert).

    `device` may be a CPU device (tests): copies are then synchronous, and bytes are counted the same.
    `num_layers` sets the sweep length (default: the highest registered layer + 1).

    Slot memory is one device buffer (`allocate`: slots × the largest expert record, `engine.model.host_arena`),
    allocated once on the current stream; the copy stream then waits for that stream before its first write, so
    it never writes memory the caching allocator handed back while kernels queued earlier still read it. A slot's
    tensors are views into its row. Copies move whole records: a run of consecutive experts of an arena'd host
    store going to consecutive slots is one copy and one event, not one copy per tensor and expert.
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
        self._layouts: dict[int, RecordLayout] = {}
        self.arena: torch.Tensor | None = None  # uint8 [num_slots, record bytes] on the device: every slot

    # ---- setup ---------------------------------------------------------------------------------
    def register(self, layer: int, host: HostExpertStore) -> None:
        """Serve `layer`'s experts from `host`."""
        self.sources[layer] = host
        self._layouts[layer] = host_layout(host)
        self._max_layer = max(self._max_layer, layer)

    def allocate(self) -> None:
        """Allocate every slot now, as one buffer of slots × the largest registered expert record (again, emptying
        the cache, when a larger expert was registered since)."""
        need = max((lay.nbytes for lay in self._layouts.values()), default=0)
        if self.arena is not None and self.arena.shape[1] >= need:
            return
        if self.arena is not None:  # the old slots may still be read or written on either stream: wait, start empty
            self.clear()
            if self._cuda:
                torch.cuda.current_stream(self.device).synchronize()
            self.slots = [_Slot() for _ in range(self.num_slots)]
        self.arena = torch.empty((self.num_slots, need), dtype=torch.uint8, device=self.device)
        if self._cuda:  # order the copy stream's writes after everything queued on the allocating stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    @property
    def num_layers(self) -> int:
        """Layers in one sweep."""
        return self._num_layers or self._max_layer + 1

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes of one expert's tensors (what is counted as moved over PCIe; its record adds the padding of
        16-byte aligned fields)."""
        return self._layouts[layer].data_nbytes

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
    def _claim(self, index: int, key: tuple[int, int]) -> None:
        """Give slot `index` to expert `key` (evicting what it held); its bytes come with `_copy_in`."""
        slot = self.slots[index]
        if slot.key is not None:
            del self.where[slot.key]
            del self._lru[slot.key[0]][slot.key[1]]
            self.stats.evictions += 1
        elif self._free and self._free[-1] == index:
            self._free.pop()
        layout = self._layouts[key[0]]
        if slot.layout is not layout:
            slot.tensors, slot.layout = layout.views(self.arena[index]), layout
        slot.key = key
        self.where[key] = index
        self._lru[key[0]][key[1]] = index

    def _runs(self, batch: list[tuple[int, tuple[int, int]]]) -> list[list[tuple[int, tuple[int, int]]]]:
        """`batch` cut into runs that one copy can move: consecutive slots taking consecutive experts of one layer
        whose host records are contiguous and as wide as a slot."""
        runs: list[list[tuple[int, tuple[int, int]]]] = []
        for index, key in sorted(batch):
            if runs:
                last_index, (last_layer, last_e) = runs[-1][-1]
                records = self._host_records(key[0])
                if (index, key) == (last_index + 1, (last_layer, last_e + 1)) and records is not None \
                        and records.shape[1] == self.arena.shape[1]:
                    runs[-1].append((index, key))
                    continue
            runs.append([(index, key)])
        return runs

    def _host_records(self, layer: int) -> torch.Tensor | None:
        arena = getattr(self.sources[layer], "arena", None)
        return arena.records if arena is not None and arena.layout == self._layouts[layer] else None

    def _copy_in(self, batch: list[tuple[int, tuple[int, int]]], side: bool) -> None:
        """Copy the experts of `batch` ((slot, key) pairs, claimed) into their slots: on the side stream (prefetch)
        or the current one (miss), one copy and one event a run (`_runs`), counted in the stats."""
        if not batch:
            return
        stream = None
        if self._cuda:
            stream = self.copy_stream if side else torch.cuda.current_stream(self.device)
            for index, _ in batch:
                wait = self.slots[index].read if side else self.slots[index].ready
                if wait is not None:  # side: readers of the old content are done; miss: a prefetch into it is
                    stream.wait_event(wait)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for run in self._runs(batch):
                first, (layer, e0) = run[0]
                records = self._host_records(layer)
                if records is not None and (len(run) == 1 or records.shape[1] == self.arena.shape[1]):
                    width = records.shape[1]
                    self.arena[first:first + len(run), :width].copy_(records[e0:e0 + len(run)], non_blocking=True)
                else:  # a host store without an arena: tensor by tensor
                    for index, (l, e) in run:
                        for k, v in self.sources[l].expert_tensors(e).items():
                            self.slots[index].tensors[k].copy_(v, non_blocking=True)
                if stream is not None:
                    event = torch.cuda.Event()
                    event.record(stream)
                    for index, _ in run:
                        self.slots[index].ready = event
                nbytes = len(run) * self._layouts[layer].data_nbytes
                self.stats.bytes_moved += nbytes
                self.stats.per_layer[layer].bytes += nbytes

    def records(self, indices: Sequence[int], layer: int) -> torch.Tensor:
        """The records of slots `indices` (of `layer`'s experts) as uint8 [n, record bytes] on the device: a view
        when the slots are consecutive, else one gather. Read it before `done_reading` of those slots."""
        width = self._layouts[layer].nbytes
        first = indices[0]
        if list(indices) == list(range(first, first + len(indices))):
            return self.arena[first:first + len(indices), :width]
        return self.arena.index_select(0, host_tensor_to(indices, self.device))[:, :width]

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
            self.allocate()
            index = self._victim()
            self._claim(index, key)
            self._copy_in([(index, key)], side=False)
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
        self.allocate()
        batch = []
        for e in sorted(set(experts)):
            key = (layer, e)
            if key in self.where:
                continue
            index = self._victim(need_farther_than=target)
            if index is None:
                break
            self._claim(index, key)  # claimed now (never a victim again in this call), copied below in runs
            self._touch(index)
            self.stats.prefetched += 1
            self.stats.per_layer[layer].prefetched += 1
            batch.append((index, key))
        self._copy_in(batch, side=True)
        return len(batch)


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
        group from its cache slots' records (or expert by expert, see the class)."""
        if not self.batched:
            from .expert_bank import stack_weights

            return stack_weights(self, experts, device, dtype)
        cache, layout = self.cache, self.cache._layouts[self.layer]
        if all((self.layer, e) in cache.where for e in experts):  # all cached: nothing is evicted while we read
            indices = [cache.get(self.layer, e)[0] for e in experts]
            records = cache.records(indices, self.layer)  # consecutive slots: a view; else one gather
        else:  # misses may evict a slot this group already read: take each record as it comes in
            indices, records = [], None
            for i, e in enumerate(experts):
                index, _ = cache.get(self.layer, e)
                if records is None:
                    records = torch.empty((len(experts), layout.nbytes), dtype=torch.uint8, device=cache.arena.device)
                records[i].copy_(cache.records([index], self.layer)[0])
                cache.done_reading(index)
        weights = self.host.weights_from_stacked(layout.stacked_views(records), device, dtype)
        for index in indices:  # after the dequantisation's reads of the slots were issued
            cache.done_reading(index)
        return weights

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
    cache.allocate()  # every slot up front, in one buffer, before the step's activations fragment the GPU
    return cache
