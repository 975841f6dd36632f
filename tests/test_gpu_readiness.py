"""What a first run on a real GPU would hit, checked on the CPU (issue 26, `pytest -m gpu_readiness`), part 1:
the planner counts what the layer-major step really keeps; the cache's copy stream never writes slot memory
before the stream that allocated it is done with it (a stream/event mock); checkpoint state is loaded onto the
CPU and crosses the object collectives as CPU tensors only; pinned host memory is exactly the planner's figure,
not torch's power-of-two blocks. Part 2 (grouped GEMM choice, host syncs, copy launches, the device check) is
tests/test_gpu_readiness_hot.py."""

from __future__ import annotations

import contextlib
import gc
import warnings

import pytest
import torch
import torch.distributed as tdist
from torch.utils._pytree import tree_flatten, tree_map

from engine.adapters import attach
from engine.config import from_dict, load
from engine.model import load_model, read_config
from engine.model.arch import get_family
from engine.model.offload import DenseHostStore, ExpertCache, as_host_store
from engine.model.stores import NF4ExpertStore
from engine.plan import plan
from engine.training import checkpoint as ckpt
from engine.training import collectives, distributed, layer_major_step

pytestmark = [pytest.mark.gpu_readiness, pytest.mark.usefixtures("one_thread")]


# ---- 1. the planner counts what the layer-major step keeps ---------------------------------------------------
def _live_storages(exclude: set[int]) -> dict[int, int]:
    """data_ptr -> bytes of every tensor storage Python can reach now, but those in `exclude` and uint8 ones (the
    RNG states the step saves per layer: host memory on a GPU)."""
    gc.collect()
    out = {}
    with warnings.catch_warnings():  # isinstance() on some of torch's deprecated module objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.dtype != torch.uint8 and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except Exception:  # tensors without storage (meta, wrapper subclasses)
                continue
            ptr = storage.data_ptr()
            if storage.nbytes() and ptr not in exclude:
                out[ptr] = storage.nbytes()
    return out


class _MeasureAtBackward:
    """LayerHooks that measure, when the backward sweep begins (the step's peak of kept tensors), the bytes of the
    storages created since `before`."""

    def __init__(self, before: set[int], last_layer: int):
        self.before, self.last_layer, self.kept = before, last_layer, None

    def begin(self, phase: str, layer: int) -> None:
        if phase == "backward" and layer == self.last_layer:
            self.kept = sum(_live_storages(self.before).values())

    def end(self, phase: str, layer: int) -> None:
        pass


def test_plan_counts_every_micro_batch_the_layer_major_step_keeps(tiny_checkpoint):
    """bf16 on the CPU, 3 layers, 4 micro-batches of 2 × 32 tokens: the bytes the step keeps when its backward sweep
    begins (every layer's input for every micro-batch, each micro-batch's gradient and layer arguments) are what
    the plan of the same config counts for it once the experts are offloaded — within the plan's conservative
    extras (an attention mask it counts where unpadded SDPA passes none, rotary tables per row)."""
    path = tiny_checkpoint("qwen3_moe", layers=3, hidden=128, experts=4)
    batch, seq, accum = 2, 32, 4
    cfg = from_dict({"model": {"path": str(path), "quant": "bf16"},
                     "adapter": {"kind": "lora", "placement": "parallel", "rank": 4, "alpha": 8},
                     "routing": {"strategy": "embedded"}, "data": {"max_len": seq},
                     "train": {"micro_batch": batch, "grad_accum": accum}})
    lm = load_model(path, dtype=torch.bfloat16)
    peft = attach(lm, cfg)
    before = set(_live_storages(set()))
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(accum):
        ids = torch.randint(3, lm.config.vocab_size, (batch, seq), generator=g)
        micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    layers = lm.config.num_hidden_layers
    hooks = _MeasureAtBackward(before, layers - 1)
    layer_major_step(lm.model, peft, micro, accum, hooks=hooks)
    hidden_states = (layers + 1) * accum * batch * seq * lm.config.hidden_size * 2  # inputs + carried, bf16
    assert hooks.kept >= hidden_states  # what the step keeps, at least its hidden states

    p = plan(cfg, model_config=lm.config, gpu_gb=0.5)  # below the CUDA reserve: the experts are offloaded
    assert "offloaded" in p.placement.values()
    counted = p.activations["layer_inputs"] + p.activations.get("micro_batches", 0)
    assert hooks.kept <= counted <= 1.15 * hooks.kept, (hooks.kept, counted)


def test_mixtral_24gb_preset_plan_is_honest_and_fits():
    """The Mixtral 24 GB preset (16 micro-batches of 1 × 256 tokens, offloaded): the plan counts 16 micro-batches'
    layer inputs (1.07 GB, not one micro-batch's 0.067) and still fits the 24 GB budget."""
    cfg = load("presets/mixtral-commonsense-24gb.yaml")
    p = plan(cfg, host_gb=64)  # a machine with the host RAM the offloaded experts need (this one may have less)
    assert p.fits and p.layers("offloaded") and p.gpu_total <= 24e9
    assert p.activations["layer_inputs"] == 32 * 16 * 256 * 4096 * 2
    assert p.activations["micro_batches"] >= 16 * 256 * 4096 * 2


# ---- 2. the copy stream never races the stream that allocated the slots ---------------------------------------
class _Streams:
    """torch.cuda's streams and events, mocked on the CPU: every allocation, copy, wait and sync in one log, with
    the stream it was issued on."""

    def __init__(self):
        self.log: list[tuple] = []
        self.default = _FakeStream("default", self)
        self.current = self.default

    def patch(self, monkeypatch) -> None:
        streams = self
        empty, copy_ = torch.empty, torch.Tensor.copy_

        @contextlib.contextmanager
        def stream(s):
            prev, streams.current = streams.current, s if s is not None else streams.current
            try:
                yield
            finally:
                streams.current = prev

        def logged_empty(*args, **kwargs):
            t = empty(*args, **kwargs)
            if "device" in kwargs:
                streams.log.append(("alloc", streams.current.name, t.untyped_storage().data_ptr()))
            return t

        def logged_copy(self, src, non_blocking=False):
            streams.log.append(("copy", streams.current.name, self.untyped_storage().data_ptr()))
            return copy_(self, src, non_blocking)

        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams.current)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: _FakeEvent(streams))
        monkeypatch.setattr(torch, "empty", logged_empty)
        monkeypatch.setattr(torch.Tensor, "copy_", logged_copy)


class _FakeStream:
    def __init__(self, name, streams):
        self.name, self.streams = name, streams

    def wait_stream(self, other):
        self.streams.log.append(("wait", self.name, other.name))

    def wait_event(self, event):
        if event.stream is not None:
            self.streams.log.append(("wait", self.name, event.stream))

    def synchronize(self):
        self.streams.log.append(("sync", self.name))


class _FakeEvent:
    def __init__(self, streams):
        self.streams, self.stream = streams, None

    def record(self, stream=None):
        self.stream = (stream or self.streams.current).name


def test_copy_stream_waits_for_the_allocating_stream_before_writing_fresh_slots(monkeypatch):
    """A fresh cache prefetches a layer on its copy stream: the slots' memory was allocated on the default stream
    (the caching allocator may hand back blocks that kernels queued there still read), so every copy-stream write
    into it must come after a wait of the copy stream on the default stream (or a sync of the default stream)."""
    g = torch.Generator().manual_seed(0)
    cache = ExpertCache(6, device="cpu", num_layers=2)
    for layer in range(2):
        cache.register(layer, DenseHostStore(torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 4, generator=g),
                                             pin=False))
    streams = _Streams()
    cache._cuda, cache.copy_stream = True, _FakeStream("copy", streams)
    streams.patch(monkeypatch)
    cache.enter("forward", 0)
    assert cache.prefetch(0, range(4)) == 4 and cache.prefetch(1, range(4)) == 2  # 6 slots
    log = streams.log
    allocated = {entry[2]: i for i, entry in enumerate(log) if entry[0] == "alloc" and entry[1] == "default"}
    writes = [(i, entry[2]) for i, entry in enumerate(log) if entry[0] == "copy" and entry[1] == "copy"]
    assert allocated and writes
    for j, ptr in writes:
        i = allocated.get(ptr)
        if i is None:
            continue
        ordered = any(entry in (("wait", "copy", "default"), ("sync", "default")) for entry in log[i + 1:j])
        assert ordered, f"copy-stream write at {j} into memory allocated at {i} on the default stream: {log[i:j + 1]}"
    assert all(cache.slots[k].ready is not None and cache.slots[k].ready.stream == "copy" for k in range(6))


# ---- 3. checkpoint state travels on the CPU -------------------------------------------------------------------
class _FakeCuda(torch.Tensor):
    """A tensor that says it lives on cuda:0 (its data on the CPU): what an optimizer state on a GPU looks like."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=torch.device("cuda", 0))

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        unwrap = lambda x: x.inner if isinstance(x, _FakeCuda) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func is torch.ops.aten._to_copy.default and torch.device(kwargs.get("device", "cuda")).type == "cpu":
            return out
        return tree_map(lambda x: _FakeCuda(x) if isinstance(x, torch.Tensor) else x, out)


@pytest.fixture
def one_rank_job():
    """A real gloo job of one rank in this process."""
    started = not tdist.is_initialized()
    if started:
        tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    yield collectives.Dist(0, 1, 0, tdist.group.WORLD, torch.device("cpu"), 60.0)
    if started:
        tdist.destroy_process_group()


def _spy_object_collectives(monkeypatch) -> list:
    """Wrap torch's object collectives: record every tensor that crosses and assert it is on the CPU."""
    seen = []

    def check(obj):
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                seen.append(t.device.type)
                assert t.device.type == "cpu", f"a {t.device} tensor crosses an object collective"

    for name in ("broadcast_object_list", "gather_object"):
        real = getattr(tdist, name)

        def spy(obj, *args, _real=real, **kwargs):
            check(obj)
            return _real(obj, *args, **kwargs)

        monkeypatch.setattr(tdist, name, spy)
    return seen


def _gpu_written_checkpoint(tmp_path, monkeypatch):
    """A checkpoint whose trainer.pt was written on cuda:0 (its storages tagged so), as a GPU run writes it."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        ckpt.save_checkpoint(tmp_path, 1, {"a": torch.ones(2)}, opt, sched, {"epoch": 0, "position": 1})
    return opt


def test_checkpoint_written_on_a_gpu_resumes_on_the_cpu_and_crosses_ranks_as_cpu_tensors(tmp_path, monkeypatch,
                                                                                          one_rank_job):
    """trainer.pt of a GPU run loads onto the CPU (map_location), not onto cuda:0 (which a CPU-only machine, or
    another rank, does not have); rank 0 hands it to the others through the object collectives as CPU tensors,
    and the RNG / optimizer states gathered from every rank (here: on a GPU) cross as CPU tensors too."""
    opt = _gpu_written_checkpoint(tmp_path, monkeypatch)
    path, tensors, tstate, state = ckpt.load_latest(tmp_path, warn=lambda m: None)
    assert state["step"] == 1
    got = tstate["optimizer"]["state"][0]["exp_avg"]
    assert got.device.type == "cpu" and torch.equal(got, opt.state_dict()["state"][0]["exp_avg"])

    seen = _spy_object_collectives(monkeypatch)
    _, _, shared, _ = distributed.load_checkpoint(one_rank_job, tmp_path, warn=lambda m: None)
    assert shared["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    on_gpu = {"rng": torch.ones(4, dtype=torch.uint8),
              "optimizer": {"state": {0: {"exp_avg": _FakeCuda(torch.arange(3.0))}}, "param_groups": []}}
    assert on_gpu["optimizer"]["state"][0]["exp_avg"].device.type == "cuda"
    gathered = collectives.gather_object(one_rank_job, on_gpu, "gathering")
    assert torch.equal(gathered[0]["optimizer"]["state"][0]["exp_avg"], torch.arange(3.0))
    back = collectives.broadcast_object(one_rank_job, on_gpu, "sharing")
    assert back["optimizer"]["state"][0]["exp_avg"].device.type == "cpu"
    assert seen and set(seen) == {"cpu"}


# ---- 4. pinned host memory is what the plan says ---------------------------------------------------------------
def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _PinCounter:
    """What would be page-locked on a GPU machine: torch's pinned allocator (per tensor, rounded up to a power of
    two, as CachingHostAllocator does) and cudaHostRegister (exact ranges)."""

    def __init__(self, monkeypatch):
        self.allocator = 0
        self.registered: list[tuple[int, int]] = []
        counter = self

        def pin_memory(t, *args, **kwargs):
            counter.allocator += _power_of_two(t.untyped_storage().nbytes())
            return t

        class Cudart:
            def cudaHostRegister(self, ptr, size, flags):
                counter.registered.append((ptr, size))
                return 0

            def cudaHostUnregister(self, ptr):
                return 0

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())

    @property
    def pinned(self) -> int:
        return self.allocator + sum(size for _, size in self.registered)


@pytest.mark.parametrize("quant", ["nf4", "bf16"])
def test_pinned_host_memory_is_exactly_the_plans_host_figure(quant, tiny_checkpoint, monkeypatch):
    """Offloading every MoE layer's experts pins, per layer, one arena of exactly the plan's host bytes: the sum
    over the layers equals `host_pinned_bytes`, every stored tensor lies inside a pinned range, and the padding is
    at most 16 bytes a tensor per expert and a page a layer (torch's allocator would round each tensor up to a
    power of two)."""
    path = tiny_checkpoint("qwen3_moe", layers=3, hidden=128, experts=8)
    cfg = from_dict({"model": {"path": str(path), "quant": quant}, "routing": {"strategy": "shared"}})
    p = plan(cfg, gpu_gb=0.5)  # offloaded
    config, _ = read_config(path)
    facts = get_family(config.model_type).facts(config)
    E, H, I = facts.num_experts, facts.hidden_size, facts.expert_intermediate_size
    counter = _PinCounter(monkeypatch)
    stores, data = [], 0
    for _ in facts.moe_layers:
        if quant == "nf4":
            store = as_host_store(NF4ExpertStore(E, H, I))
            tensors = list(store.tensors.values())
        else:
            store = as_host_store(DenseHostStore(torch.zeros(E, 2 * I, H, dtype=torch.bfloat16),
                                                 torch.zeros(E, H, I, dtype=torch.bfloat16), pin=None))
            tensors = [t for e in range(E) for t in store.expert_tensors(e).values()]
        stores.append(store)
        data += sum(t.nbytes for t in tensors)
        for t in tensors:  # the tensors the cache copies from are the pinned ones
            lo = t.data_ptr()
            assert any(ptr <= lo and lo + t.nbytes <= ptr + size for ptr, size in counter.registered)
    assert counter.pinned == p.host_pinned_bytes
    layers, per_expert = len(facts.moe_layers), (10 if quant == "nf4" else 2)
    assert data <= counter.pinned <= data + layers * (E * per_expert * 16 + 2 * 4096)
