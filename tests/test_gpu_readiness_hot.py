"""What a first run on a real GPU would hit, checked on the CPU (issue 26, `pytest -m gpu_readiness`), part 2:
`torch._grouped_mm` only where torch runs its CUTLASS kernel (compute capability 9.x / 10.x) and never disabled by
an out-of-memory error; a budget of host syncs for the expert bank's forward + backward and for the layer-major
step's layer loop (counted by patching every Tensor method that reads a value back to the host); a layer's
experts copied into the cache and gathered for dequantisation in a few launches, not 8 per expert; the device
check's wheels resolved offline, failing where one is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from engine.adapters import attach
from engine.config import from_dict
from engine.model import load_model
from engine.model.grouped import _UNSUPPORTED, group_offsets, grouped_mm_frozen, grouped_mm_supported
from engine.model.offload import ExpertCache, OffloadedExpertStore, as_host_store
from engine.model.stores import NF4ExpertStore
from engine.training import layer_major_step

pytestmark = [pytest.mark.gpu_readiness, pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[1]


# ---- 5. grouped GEMM by compute capability; an OOM is not "unsupported" -------------------------------------
@pytest.mark.parametrize("capability, grouped", [((8, 0), False), ((8, 6), False), ((8, 9), False),
                                                 ((12, 0), False), ((9, 0), True), ((10, 0), True)])
def test_grouped_mm_only_on_the_gpus_torch_builds_its_kernel_for(capability, grouped, monkeypatch):
    """A 3090 (8.6), 4090 (8.9) or 5090 (12.0) would run torch's fallback (offsets copied to the host: a sync per
    call, then one mm per group): they take our segment matmuls. Hopper and Blackwell data-centre GPUs (9.x,
    10.x) take `torch._grouped_mm`. MOETUNE_GROUPED_MM=segment forces the consumer path anywhere."""
    monkeypatch.delenv("MOETUNE_GROUPED_MM", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert grouped_mm_supported(cuda, torch.bfloat16) is grouped
    assert not grouped_mm_supported(cuda, torch.float32)
    monkeypatch.setenv("MOETUNE_GROUPED_MM", "segment")
    assert not grouped_mm_supported(cuda, torch.bfloat16)
    assert not grouped_mm_supported(torch.device("cpu"), torch.float32)


def test_out_of_memory_in_grouped_mm_is_raised_and_does_not_disable_it(monkeypatch):
    """An OutOfMemoryError is a RuntimeError, but not a sign that grouped GEMM is unsupported: it reaches the caller
    (which may free memory and retry), and the next call still takes `torch._grouped_mm`."""
    monkeypatch.delenv("MOETUNE_GROUPED_MM", raising=False)
    cpu = torch.device("cpu")
    if not grouped_mm_supported(cpu, torch.float32):
        pytest.skip("this torch has no CPU _grouped_mm")
    a, b, counts = torch.randn(6, 8), torch.randn(2, 8, 4), [2, 4]
    offs = group_offsets(counts, cpu)
    want = torch.cat([a[:2] @ b[0], a[2:] @ b[1]])
    real = torch._grouped_mm
    calls = []

    def out_of_memory(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    try:
        monkeypatch.setattr(torch, "_grouped_mm", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            grouped_mm_frozen(a, b, offs, counts)
        assert calls and grouped_mm_supported(cpu, torch.float32)
        monkeypatch.setattr(torch, "_grouped_mm", lambda *args, **kwargs: calls.append(2) or real(*args, **kwargs))
        torch.testing.assert_close(grouped_mm_frozen(a, b, offs, counts), want)
        assert calls[-1] == 2  # grouped GEMM again, not the segment fallback
    finally:
        _UNSUPPORTED.discard(("cpu", torch.float32))


# ---- 6. host syncs and launches in the hot loop ------------------------------------------------------------
#: the Tensor methods that read a value back to the host (on a GPU: wait for every kernel queued before)
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


class _SyncCounter:
    """Counts calls of the SYNCING methods (each one a host sync on a GPU), and tensors built from Python data
    straight onto a device (`torch.tensor(data, device=...)`: a blocking host-to-device copy, which waits for the
    stream), by phase."""

    def __init__(self, monkeypatch):
        self.phase, self.counts = "outside", {}
        for name in SYNCING:
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, **kwargs):
                self._count()
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        real_tensor = torch.tensor

        def tensor(data, *args, **kwargs):
            if kwargs.get("device") is not None:
                self._count()
            return real_tensor(data, *args, **kwargs)

        monkeypatch.setattr(torch, "tensor", tensor)

    def _count(self) -> None:
        self.counts[self.phase] = self.counts.get(self.phase, 0) + 1

    def begin(self, phase: str, layer: int) -> None:
        self.phase = f"{phase} layer"

    def end(self, phase: str, layer: int) -> None:
        self.phase = f"after {phase}" if (phase == "backward" and layer == 0) else "between layers"

    def __getitem__(self, phase: str) -> int:
        return self.counts.get(phase, 0)


def _tiny(tiny_checkpoint, family="olmoe", **routing):
    path = tiny_checkpoint(family, layers=3, hidden=64, experts=8)
    cfg = from_dict({"model": {"quant": "bf16"}, "adapter": {"kind": "lora", "placement": "parallel", "rank": 4,
                                                             "alpha": 8},
                     "routing": {"strategy": "embedded", "base_balance_loss": 0.01, **routing}})
    lm = load_model(path)
    return lm, attach(lm, cfg)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss"])
def test_moe_block_forward_and_backward_sync_the_host_once(family, tiny_checkpoint, monkeypatch):
    """One MoE block (router with its tap and balance loss, the expert bank with embedded adapters; Qwen2-MoE's
    shared expert, gpt-oss's expert biases), forward and backward: one host sync in all — the bank reading its
    routing counts once (it needs them to group the rows); the tap keeps its counts on the device, offsets, adapter
    indices and bias rows go to the device without waiting."""
    lm, peft = _tiny(tiny_checkpoint, family)
    _, block = next(iter(lm.family.moe_blocks(lm.model)))
    h = torch.randn(2, 16, lm.config.hidden_size, requires_grad=True)
    counter = _SyncCounter(monkeypatch)
    out = block(h)
    out = out[0] if isinstance(out, tuple) else out
    loss = out.square().sum() + peft.aux_loss()
    counter.phase = "backward"
    loss.backward()
    counter.phase = "outside"
    monkeypatch.undo()
    assert counter["outside"] <= 1 and counter["backward"] == 0, counter.counts
    assert h.grad is not None and any(p.grad is not None for _, p in peft.trainable_parameters())


def test_layer_major_step_host_syncs_within_budget(tiny_checkpoint, monkeypatch):
    """A layer-major step of 3 micro-batches over 3 layers: each layer syncs once per micro-batch in the forward and
    once in the backward recompute (the routing counts), the losses and balance losses are summed on the device
    (no .item() per layer and micro-batch), and after the backward sweep the step reads its losses and its
    expert usage back once each."""
    lm, peft = _tiny(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(3):
        ids = torch.randint(3, lm.config.vocab_size, (2, 12), generator=g)
        micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    counter = _SyncCounter(monkeypatch)
    result = layer_major_step(lm.model, peft, micro, hooks=counter)
    monkeypatch.undo()
    layers, accum = lm.config.num_hidden_layers, len(micro)
    assert counter["forward layer"] <= layers * accum, counter.counts
    assert counter["backward layer"] <= layers * accum, counter.counts
    assert counter["between layers"] == 0 and counter["after backward"] <= 2, counter.counts
    assert result.aux > 0 and len(result.usage) == layers
    assert all(sum(row) == accum * 2 * 12 * lm.config.num_experts_per_tok for row in result.usage)


class _CopyCounter:
    """Counts the copies issued into device memory (Tensor.copy_ and gathers), each one a launch on a GPU."""

    def __init__(self, monkeypatch):
        self.copies = 0
        for name in ("copy_", "index_select"):
            real = getattr(torch.Tensor, name)

            def counted(t, *args, _real=real, **kwargs):
                self.copies += 1
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_a_layers_experts_move_in_a_few_copies_not_eight_per_expert(monkeypatch):
    """NF4 experts (8 tensors each) of a layer prefetched into a fresh cache: one copy for the run of 8 experts
    into 8 consecutive slots, not 64; gathering them for the group's dequantisation: no copy (consecutive slots are
    one view), not 64 — and the gathered tensors are the host's, bit for bit."""
    store = NF4ExpertStore(8, 64, 32)
    g = torch.Generator().manual_seed(0)
    for t in store.tensors.values():
        t.copy_(torch.randint(0, 255, t.shape, generator=g).to(t.dtype))
    host = as_host_store(store, pin=False)
    cache = ExpertCache(16, device="cpu", num_layers=2)
    offloaded = OffloadedExpertStore(host, 0, cache)
    counter = _CopyCounter(monkeypatch)
    cache.enter("forward", 0)
    assert cache.prefetch(0, range(8)) == 8
    assert counter.copies <= 2, counter.copies
    seen = []
    monkeypatch.setattr(host, "weights_from_stacked", lambda tensors, device, dtype: seen.append(tensors) or (1, 2))
    counter.copies = 0
    assert offloaded.weights_batched(list(range(8)), torch.device("cpu"), torch.float32) == (1, 2)
    assert counter.copies <= 1, counter.copies
    monkeypatch.undo()
    for name, t in seen[0].items():
        assert torch.equal(t, store.tensors[name]), name
    assert cache.stats.bytes_moved == 8 * sum(v.nbytes for v in host.expert_tensors(0).values())


# ---- 7. the device check on a bare image ---------------------------------------------------------------------
def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A pure-Python wheel with only its metadata: enough for pip to resolve it."""
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as z:
        meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


def _dry_run(wheels: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WHEELS": str(wheels), "PYTHON": sys.executable}
    return subprocess.run(["bash", "bench/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_device_check_dry_run_resolves_every_wheel_offline_and_names_a_missing_one(tmp_path):
    """`bench/device_check.sh --dry-run` with every wheel of bench/device_wheels.txt in the wheel folder: passes,
    and plans the consumer path (segment GEMMs forced, a bf16 offload check). Without pygments (which pytest
    imports): fails naming it. With a wheel whose dependency is neither carried nor in the image: fails naming
    that dependency."""
    reqs = [line.split("==") for line in (ROOT / "bench" / "device_wheels.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert {"pytest", "pygments", "packaging", "iniconfig", "pluggy", "bitsandbytes", "gguf"} <= {n for n, _ in reqs}
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name, version in reqs:
        _fake_wheel(wheels, name, version, ["numpy>=1.17"] if name == "gguf" else [])
    ok = _dry_run(wheels)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "MOETUNE_GROUPED_MM=segment" in ok.stdout and "--dtype bf16" in ok.stdout
    missing = tmp_path / "missing"
    shutil.copytree(wheels, missing)
    for w in missing.glob("pygments-*.whl"):
        w.unlink()
    bad = _dry_run(missing)
    assert bad.returncode != 0 and "pygments" in (bad.stdout + bad.stderr)
    for w in wheels.glob("gguf-*.whl"):
        w.unlink()
    _fake_wheel(wheels, "gguf", dict(reqs)["gguf"], ["numpy>=1.17", "sentencepiece-nowhere>=1"])
    dep = _dry_run(wheels)
    assert dep.returncode != 0 and "sentencepiece-nowhere (needed by gguf)" in dep.stdout, dep.stdout + dep.stderr
