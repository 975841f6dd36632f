"""The offload benchmark's CPU smoke mode runs end to end (so the GPU benchmark does not rot while no GPU
is lent), and its byte counts say what the layer-major step is for: each offloaded expert crosses once
per sweep, where the per-micro-batch loop moves it again for every micro-batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.model.arch import get_family
from engine.model import nf4_expert_nbytes, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_bench_small_layer_major_moves_each_expert_once_per_sweep(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/bench_offload.py", "--small", "--variants",
                           "moetune-layer-major,moetune-microbatch", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    layer, micro = rows["moetune-layer-major"], rows["moetune-microbatch"]
    assert layer["status"] == micro["status"] == "ok"
    # the small model: 4 layers x 8 experts behind 16 slots (half): the forward sweep brings the two layers
    # that are not cached, the backward sweep the other two -> every expert exactly once per step
    small = tiny_config("olmoe", layers=4, hidden=128, experts=8, top_k=2, vocab_size=512)
    facts = get_family("olmoe").facts(small)
    per_expert = nf4_expert_nbytes(facts.hidden_size, facts.expert_intermediate_size)
    assert layer["experts_total"] == 32
    assert layer["pcie_bytes_per_step"] == 32 * per_expert
    assert micro["pcie_bytes_per_step"] == micro["cache_last_step"]["misses"] * per_expert
    assert micro["pcie_bytes_per_step"] > 2 * layer["pcie_bytes_per_step"]


def test_bench_step_cpu_small_runs_both_sides_on_the_same_model():
    """bench_step's CPU mode: MoETune and transformers + PEFT train the same random-weight model on the same
    tokens (their first, fresh-adapter losses agree up to NF4 rounding of the experts); the JSON carries the
    figures and ratios. Correctness only: no timing is asserted."""
    proc = subprocess.run([sys.executable, "bench/bench_step.py", "--cpu-small", "--json", "--repeats", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    for key in ("moetune_tokens_per_s", "baseline_tokens_per_s", "moetune_peak_gb", "baseline_peak_gb"):
        assert out[key] is not None and out[key] > 0, key
    assert out["tokens_per_s_ratio"] == round(out["moetune_tokens_per_s"] / out["baseline_tokens_per_s"], 3)
    assert [r["model"] for r in out["per_model"]] == ["olmoe", "qwen3_moe"]
    for r in out["per_model"]:
        ours, base = r["variants"]["moetune"], r["variants"]["baseline"]
        assert ours["status"] == base["status"] == "ok"
        assert ours["expert_backend"] == "torch" and ours["trainable"] > 0 and base["trainable"] > 0
        assert len(ours["losses"]) == len(base["losses"]) == 2  # one warm-up and one timed step each
        first_ours, first_base = ours["losses"][0], base["losses"][0]
        assert abs(first_ours - first_base) < 0.02 * first_base, (first_ours, first_base)


def test_bench_full_cap_kills_a_child_above_it_and_measures_one_below(tmp_path):
    """The full-size bench's own memory cap: the resident set of a child's process tree, polled from /proc; a
    child that grows past the cap is killed (with what it started), one that stays under it runs to the end."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_full import run_capped

    grow = ("import subprocess, sys, time\n"  # a grandchild holds the memory: the cap counts the whole tree
            "p = subprocess.Popen([sys.executable, '-c', 'b = bytearray(600 * 2**20); import time; time.sleep(60)'])\n"
            "time.sleep(60)\n")
    res = run_capped([sys.executable, "-c", grow], cap_gb=0.3, timeout_s=60, log_file=tmp_path / "grow.log")
    assert res["killed"] == "cap" and res["peak_bytes"] > 0.3e9 and res["seconds"] < 30
    small = run_capped([sys.executable, "-c", "b = bytearray(50 * 2**20); import time; time.sleep(1)"],
                       cap_gb=0.3, timeout_s=60, log_file=tmp_path / "small.log", poll_s=0.05)
    assert small["killed"] is None and small["returncode"] == 0 and 50 * 2 ** 20 < small["peak_bytes"] < 0.3e9


def test_bench_full_checkpoint_is_complete_in_the_hub_layout(tmp_path):
    """The checkpoint the full-size bench writes layer by layer (one shard per decoder layer, per-expert names):
    transformers loads it with no missing or unexpected tensor, and MoETune's streaming quantiser finds every
    expert of every layer."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_full import bench_config, write_checkpoint
    from engine.model import quantize_checkpoint_experts

    cfg = bench_config("olmoe", 2, ["num_experts=4", "hidden_size=64", "intermediate_size=32", "vocab_size=512",
                                    "num_attention_heads=4", "num_key_value_heads=4"])
    info = write_checkpoint(cfg, tmp_path / "ckpt")
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) == 3  # 2 layers + embeddings/norm/head
    assert write_checkpoint(cfg, tmp_path / "ckpt") == info  # the same shape again: reused, not rewritten
    model, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16,
                                                          output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    stores = quantize_checkpoint_experts(tmp_path / "ckpt", "bf16")
    assert sorted(stores) == [0, 1] and all(s.complete for s in stores.values())
    torch.testing.assert_close(stores[1].gate_up[3].float(), model.model.layers[1].mlp.experts.gate_up_proj[3].float())
