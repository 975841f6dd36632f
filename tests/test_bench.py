"""The offload benchmark's CPU smoke mode runs end to end (so the GPU benchmark does not rot while no GPU
is lent), and its byte counts say what the layer-major step is for: each offloaded expert crosses once
per sweep, where the per-micro-batch loop moves it again for every micro-batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.arch import get_family
from engine.quant import nf4_expert_nbytes
from engine.tiny import tiny_config

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
