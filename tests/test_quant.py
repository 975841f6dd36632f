"""NF4 expert stores: exact agreement with bitsandbytes, NF4 error bounds, bit-exact files, streaming
quantisation of checkpoints (equal to quantising what transformers loads, with peak memory near the
quantised size), the quantised-expert cache, and QLoRA-style NF4 linear layers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import bitsandbytes.functional as BF
import pytest
import torch

from engine.model import CheckpointError, iter_tensors, load_model
from engine.model import DenseExpertStore, NF4ExpertStore, nf4_expert_nbytes
from engine.model.stores import CODE_TABLE_BYTES
from engine.model import QuantCacheError, cache_folder, quantize_checkpoint_experts, quantize_linear_layers
from engine.model import read_tensors

from .conftest import FAMILY_NAMES
from .tolerance import assert_close


def _fused(E=3, H=128, I=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, 2 * I, H, generator=g).mul(0.02).to(dtype),
            torch.randn(E, H, I, generator=g).mul(0.02).to(dtype))


def _bnb_ref(w: torch.Tensor, dtype: torch.dtype):
    packed, state = BF.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    state.dtype = dtype
    return packed, state, BF.dequantize_4bit(packed, state)


def test_weights_equal_bitsandbytes_dequantise_exactly():
    gate_up, down = _fused()
    store = NF4ExpertStore.from_fused(gate_up, down)
    assert store.num_experts == 3 and store.complete
    assert store.nbytes() == 3 * nf4_expert_nbytes(128, 64) + CODE_TABLE_BYTES
    for e in range(3):
        for dtype in (torch.bfloat16, torch.float32):
            got_gu, got_down = store.weights(e, torch.device("cpu"), dtype)
            for got, w, part in ((got_gu, gate_up[e], "gate_up"), (got_down, down[e], "down")):
                packed, _, ref = _bnb_ref(w, dtype)
                assert torch.equal(store.tensors[f"{part}.weight"][e], packed)
                assert got.dtype == dtype and got.shape == w.shape
                assert torch.equal(got, ref)
    # the offload interface dequantises the same bytes to the same values
    gu, dn = store.weights_from_tensors(store.expert_tensors(1), "cpu", torch.bfloat16)
    ref_gu, ref_dn = store.weights(1, "cpu", torch.bfloat16)
    assert torch.equal(gu, ref_gu) and torch.equal(dn, ref_dn)


def test_nf4_error_within_blockwise_bound():
    gate_up, down = _fused(E=2, H=256, I=128, dtype=torch.float32)
    store = NF4ExpertStore.from_fused(gate_up, down)
    code = store.tensors["quant_map"]
    half_gap = float((code[1:] - code[:-1]).max() / 2)  # farthest a value can be from its NF4 level
    for e in range(2):
        for got, w in zip(store.weights(e, "cpu", torch.float32), (gate_up[e], down[e])):
            _, state, _ = _bnb_ref(w, torch.float32)
            scale = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset  # absmax after double quant
            blocks = w.reshape(-1, 64)
            absmax = blocks.abs().amax(dim=1)
            err = (got - w).reshape(-1, 64).abs().amax(dim=1)
            # |w - c·â| <= |w - c·a| + |a - â|, with |w/a - c| <= half the widest gap of the NF4 levels
            bound = half_gap * absmax + (absmax - scale).abs() + 1e-7
            assert bool((err <= bound).all())
            assert float((got - w).norm() / w.norm()) < 0.11  # NF4 on Gaussian weights: about 9 %


def test_dense_store_returns_the_exact_tensors():
    gate_up, down = _fused(dtype=torch.bfloat16)
    store = DenseExpertStore(gate_up, down)
    gu, dn = store.weights(2, torch.device("cpu"), torch.bfloat16)
    assert gu.data_ptr() == gate_up[2].data_ptr() and dn.data_ptr() == down[2].data_ptr()
    assert torch.equal(gu, gate_up[2]) and torch.equal(dn, down[2])
    assert torch.equal(store.weights(0, "cpu", torch.float32)[0], gate_up[0].float())
    assert store.nbytes() == gate_up.nbytes + down.nbytes


def test_save_load_round_trip_is_bit_exact(tmp_path):
    gate_up, down = _fused(E=4, H=64, I=96)
    nf4 = NF4ExpertStore.from_fused(gate_up, down)
    nf4.save(tmp_path / "nf4")
    back = NF4ExpertStore.load(tmp_path / "nf4")
    assert set(back.tensors) == set(nf4.tensors)
    assert all(torch.equal(back.tensors[k], v) and back.tensors[k].dtype == v.dtype for k, v in nf4.tensors.items())
    for e in range(4):
        pairs = zip(back.weights(e, "cpu", torch.bfloat16), nf4.weights(e, "cpu", torch.bfloat16))
        assert all(torch.equal(a, b) for a, b in pairs)
    meta = json.loads((tmp_path / "nf4" / "experts.json").read_text())
    assert meta["shapes"] == {"gate_up": [192, 64], "down": [64, 96]} and meta["blocksize"] == 64
    files = sorted(p.name for p in (tmp_path / "nf4").iterdir())
    assert files == ["experts.json", "experts.safetensors"]  # no temp files left

    dense = DenseExpertStore(gate_up, down)
    dense.save(tmp_path / "dense")
    again = DenseExpertStore.load(tmp_path / "dense")
    assert torch.equal(again.gate_up, gate_up) and torch.equal(again.down, down)
    assert again.gate_up.dtype == torch.bfloat16

    with open(tmp_path / "nf4" / "experts.safetensors", "ab") as f:  # a damaged file is refused, by name
        f.write(b"x")
    with pytest.raises(QuantCacheError, match="damaged"):
        NF4ExpertStore.load(tmp_path / "nf4")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_streaming_quantisation_equals_quantising_the_loaded_model(family, tiny_checkpoint):
    path = tiny_checkpoint(family, layers=2, hidden=64, experts=4)
    loaded = load_model(path)
    others: list[str] = []
    stores = quantize_checkpoint_experts(path, on_other=lambda name, t: others.append(name))
    blocks = dict(loaded.family.moe_blocks(loaded.model))
    assert sorted(stores) == sorted(blocks)
    for layer, block in blocks.items():
        gate_up, down = loaded.family.canonical_experts(block)  # [E, 2I, H], [E, H, I]
        ref = NF4ExpertStore.from_fused(gate_up.detach(), down.detach())
        assert all(torch.equal(stores[layer].tensors[k], v) for k, v in ref.tensors.items())
    names = [n for n, _ in iter_tensors(path)]
    fam = loaded.family
    assert sorted(others) == sorted(n for n in names if fam.parse_expert_key(n) is None and fam.raw_expert_layer(n) is None)
    # the memory-mapped reader of engine.model.loader and the plain reader give the same tensors
    from_mmap = quantize_checkpoint_experts(path, tensors=iter_tensors(path))
    assert all(torch.equal(from_mmap[l].tensors[k], v) for l in stores for k, v in stores[l].tensors.items())
    # a checkpoint saved with transformers' fused names (experts.gate_up_proj [E, 2I, H]) gives the same
    from_fused = quantize_checkpoint_experts(path, tensors=loaded.model.state_dict().items())
    assert all(torch.equal(from_fused[l].tensors[k], v) for l in stores for k, v in stores[l].tensors.items())
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(sorted(read_tensors(path)), sorted(iter_tensors(path))))


def test_incomplete_checkpoint_names_what_is_missing(tiny_checkpoint):
    path = tiny_checkpoint("mixtral", layers=2, hidden=64, experts=4)
    dropped = [(n, t) for n, t in iter_tensors(path) if n != "model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    with pytest.raises(CheckpointError, match="layer 1 lacks 1 expert matrices"):
        quantize_checkpoint_experts(path, tensors=dropped)


def test_cache_folder_is_reused_and_invalidated(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen3_moe", layers=2, hidden=64, experts=4)
    first = quantize_checkpoint_experts(path, cache_dir=tmp_path)
    folder = cache_folder(path, tmp_path)
    assert (folder / "manifest.json").is_file() and len(list(folder.glob("layer-*"))) == 2

    import engine.model.streaming as Q

    read, plain = [], Q.read_tensors

    def recording(*args, **kwargs):
        for name, t in plain(*args, **kwargs):
            read.append(name)
            yield name, t

    others = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Q, "read_tensors", recording)
        again = quantize_checkpoint_experts(path, cache_dir=tmp_path, on_other=lambda n, t: others.append(n))
    assert read and not [n for n in read if ".experts." in n]  # a cache hit reads no expert tensor
    assert sorted(again) == sorted(first) and others
    assert all(torch.equal(again[l].tensors[k], v) for l in first for k, v in first[l].tensors.items())
    (folder / "layer-001" / "experts.json").write_text("{}")  # damaged cache -> quantised again, same result
    with pytest.warns(UserWarning, match=r"layer-001/experts.json is not a 'moetune-nf4-experts' v1 description"):
        fixed = quantize_checkpoint_experts(path, cache_dir=tmp_path)
    assert all(torch.equal(fixed[l].tensors[k], v) for l in first for k, v in first[l].tensors.items())
    bf16 = quantize_checkpoint_experts(path, quant="bf16")
    assert isinstance(bf16[0], DenseExpertStore) and bf16[0].gate_up.dtype == torch.bfloat16


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from engine.model.hf_checkpoint import read_config
    from engine.model.stores import NF4ExpertStore, quantized_nbytes
    from engine.model.streaming import quantize_checkpoint_experts

    def peak_mb():  # VmHWM: the process's peak resident set (anonymous + file-backed pages)
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024

    NF4ExpertStore.from_fused(torch.randn(1, 128, 64), torch.randn(1, 64, 64))  # load the kernels first
    read_config(sys.argv[1])
    before = peak_mb()
    stores = quantize_checkpoint_experts(sys.argv[1])
    print(json.dumps({"growth_mb": peak_mb() - before, "quantised_mb": quantized_nbytes(stores) / 2**20}))
""")


def test_streaming_quantisation_peak_memory_stays_near_quantised_size(tmp_path):
    from engine.model import make_tiny_model

    path = make_tiny_model("olmoe", tmp_path / "big", layers=8, hidden=512, experts=16, top_k=2)
    file_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20  # fp32 on disk
    bf16_mb = file_mb / 2
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert file_mb > 200 and out["quantised_mb"] < bf16_mb / 4
    # the experts are ~96 % of the checkpoint; peak growth is their NF4 size plus a few tensors in flight
    assert out["growth_mb"] < out["quantised_mb"] + 24, out
    assert out["growth_mb"] < bf16_mb / 2, out


def test_nf4_linear_layers_skip_head_and_routers(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe", layers=2, hidden=64, experts=4)
    model = load_model(path).model
    x = torch.randint(0, 100, (2, 8))
    attn = model.model.layers[0].self_attn
    w_q = attn.q_proj.weight.detach().clone()
    swapped = quantize_linear_layers(model, compute_dtype=torch.float32)
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
    assert swapped == [f"model.layers.{i}.{n}" for i in range(2) for n in per_layer]
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.shared_expert_gate) is torch.nn.Linear
    _, _, ref = _bnb_ref(w_q, torch.float32)
    assert torch.equal(BF.dequantize_4bit(attn.q_proj.weight.data, attn.q_proj.weight.quant_state), ref)
    h = torch.randn(5, 64, requires_grad=True)
    y = attn.q_proj(h)
    assert_close(y, h @ ref.T + attn.q_proj.bias)
    y.sum().backward()
    assert_close(h.grad, ref.sum(0).expand(5, -1))
    assert model(x).logits.isfinite().all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_nf4_expert_bank_equals_dequantised_reference_and_stays_near_bf16(family, tiny_checkpoint):
    """model.quant=nf4: the attached expert bank computes with NF4 experts; its logits equal transformers'
    own model holding the dequantised expert weights, and stay within NF4 error of the unquantised model."""
    from engine.config import from_dict
    from engine.adapters import attach

    path = tiny_checkpoint(family)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    cfg = from_dict({"model": {"quant": "nf4"}, "routing": {"strategy": "embedded"}})
    full = load_model(path)
    with torch.no_grad():
        exact = full.model(ids).logits
    ref = load_model(path)
    ref.model.config._experts_implementation = "eager"
    with torch.no_grad():  # the reference: transformers' own experts holding the dequantised weights
        for _, block in ref.family.moe_blocks(ref.model):
            store = NF4ExpertStore.from_fused(*ref.family.canonical_experts(block))
            for e in range(store.num_experts):
                gu, dn = store.weights(e, "cpu", torch.float32)
                views = ref.family.expert_views(block, e)  # into the module's own layout
                views["gate"].copy_(gu[:gu.shape[0] // 2])
                views["up"].copy_(gu[gu.shape[0] // 2:])
                views["down"].copy_(dn)
        want = ref.model(ids).logits
    lm = load_model(path)
    peft = attach(lm, cfg)
    bank = next(iter(peft.banks.values()))
    assert isinstance(bank.store, NF4ExpertStore)
    with torch.no_grad():
        got = lm.model(ids).logits
    assert_close(got, want)
    rel = (got - exact).norm() / exact.norm()
    # NF4 rounds a Gaussian weight by ~10 % (rms); through two random layers the logits move by about that much
    assert 0 < rel < 0.3, rel


@pytest.mark.parametrize("quant", ["nf4", "bf16"])
def test_streamed_expert_stores_equal_quantising_the_loaded_model(quant, tiny_checkpoint, tmp_path):
    """load_model(expert_quant=...) never puts experts in the module tree; attached, it computes exactly
    what quantising the fully loaded model's experts computes, and a second load comes from the cache."""
    from engine.config import from_dict
    from engine.adapters import attach

    path = tiny_checkpoint("qwen2_moe")
    cfg = from_dict({"model": {"quant": quant}, "routing": {"strategy": "embedded"}})
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    full = load_model(path)
    attach(full, cfg)
    streamed = load_model(path, expert_quant=quant, cache_dir=tmp_path)
    assert all(p.device.type == "meta" for n, p in streamed.model.named_parameters() if ".experts." in n)
    attach(streamed, cfg)
    with torch.no_grad():
        want, got = full.model(ids).logits, streamed.model(ids).logits
    if quant == "nf4":
        assert_close(got, want)
        assert any(tmp_path.iterdir())  # the quantised experts were cached
        again = load_model(path, expert_quant=quant, cache_dir=tmp_path)
        attach(again, cfg)
        with torch.no_grad():
            assert torch.equal(again.model(ids).logits, got)
    else:  # experts stored in bf16: within bf16 rounding of the fp32 model
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def _flip_inside(file, tensor: str) -> None:
    """Flip the bytes of the middle of one tensor's data in a safetensors file (same size, header intact)."""
    import struct as _struct

    data = bytearray(file.read_bytes())
    size = _struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8:8 + size])[tensor]["data_offsets"]
    mid = 8 + size + (begin + end) // 2
    data[mid - 8:mid + 8] = bytes(b ^ 0xFF for b in data[mid - 8:mid + 8])
    file.write_bytes(bytes(data))


def test_damaged_cache_layers_are_checked_by_checksum_and_quantised_again(tiny_checkpoint, tmp_path):
    """Same-size flipped bytes, a truncated file and an old entry without a checksum: each such layer is
    quantised again from the checkpoint, with a warning naming its file, and the result equals a fresh
    quantisation (the damaged bytes are never used); the rewritten cache then loads silently."""
    import hashlib
    import warnings

    from engine.io import sha256_file

    path = tiny_checkpoint("qwen3_moe", layers=3, hidden=64, experts=4)
    fresh = quantize_checkpoint_experts(path)  # no cache: the reference
    quantize_checkpoint_experts(path, cache_dir=tmp_path)
    folder = cache_folder(path, tmp_path)

    def same_as_fresh(stores) -> bool:
        return sorted(stores) == sorted(fresh) and all(
            torch.equal(stores[l].tensors[k], v) for l in fresh for k, v in fresh[l].tensors.items())

    flipped = folder / "layer-002" / "experts.safetensors"
    _flip_inside(flipped, "gate_up.weight")
    damaged = dict(read_tensors(flipped))
    assert not torch.equal(damaged["gate_up.weight"], fresh[2].tensors["gate_up.weight"])  # wrong weights on disk
    truncated = folder / "layer-000" / "experts.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    meta_file = folder / "layer-001" / "experts.json"  # as an older MoETune wrote it: sizes, no checksum
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "sha256"}))

    with pytest.warns(UserWarning) as caught:
        got = quantize_checkpoint_experts(path, cache_dir=tmp_path)
    texts = [str(w.message) for w in caught]
    assert any(str(flipped) in t and "SHA-256" in t and "quantising layer 2 again" in t for t in texts), texts
    assert any(str(truncated) in t and "truncated" in t and "quantising layer 0 again" in t for t in texts), texts
    assert any(str(meta_file) in t and "no checksum" in t and "quantising layer 1 again" in t for t in texts), texts
    assert same_as_fresh(got)
    assert all("sha256" in json.loads((folder / f"layer-{l:03d}" / "experts.json").read_text()) for l in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: no warning any more, and the same experts
        assert same_as_fresh(quantize_checkpoint_experts(path, cache_dir=tmp_path))
    digest = hashlib.sha256()  # the checksum taken while reading is the file's SHA-256, as written
    assert len(dict(read_tensors(flipped, digest=digest))) == 10
    assert digest.hexdigest() == sha256_file(flipped) == json.loads(flipped.with_suffix(".json").read_text())["sha256"]


def test_a_damaged_cache_layer_never_reaches_training(tiny_checkpoint, tmp_path, monkeypatch):
    """The trainer's first loss with a damaged cache layer equals the loss with an intact cache."""
    from engine.config import from_dict
    from engine.runs import read_events
    from engine.data.synthetic import last_digit_rows
    from engine.training import train

    monkeypatch.setenv("MOETUNE_CACHE", str(tmp_path / "cache"))
    path = tiny_checkpoint("qwen3_moe", layers=2, hidden=64, experts=4)
    (tmp_path / "train.json").write_text(json.dumps(last_digit_rows(16, seed=1)))
    cfg = from_dict({"model": {"path": str(path), "quant": "nf4"}, "routing": {"strategy": "embedded"},
                     "adapter": {"kind": "lora", "rank": 4, "alpha": 8.0},
                     "data": {"train": str(tmp_path / "train.json"), "max_len": 128},
                     "train": {"max_steps": 1, "micro_batch": 4, "save_every": 100, "gradient_checkpointing": False}})

    def first_loss(out) -> float:
        train(cfg, tmp_path / out, echo=False)
        return next(e["loss"] for e in read_events(tmp_path / out / "events.jsonl")[0] if e["type"] == "step")

    intact = first_loss("a")  # quantises and fills the cache
    [flipped] = (tmp_path / "cache").glob("experts/*/layer-001/experts.safetensors")
    for tensor in ("gate_up.weight", "down.weight", "gate_up.absmax"):
        _flip_inside(flipped, tensor)
    with pytest.warns(UserWarning, match="quantising layer 1 again"):
        assert first_loss("b") == intact
