"""Device check of the offload path (side-stream copies, events, pinned memory): a small model trained
three steps with its experts resident and again offloaded behind a cache too small for them, layer-major
with prefetch and SparseAdamW. The adapters must come out bit-identical, and the layer-major step
must match the plain micro-batch loop. Runs on CUDA when there is one, else on CPU.

  python bench/check_offload_device.py            # exit 0 and "PASS" when everything matches
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _setup(path, device):
    from engine.config import from_dict
    from engine.model import load_model
    from engine.adapters import attach

    lm = load_model(path, dtype=torch.float32, device=device)
    cfg = from_dict({"adapter": {"kind": "lora", "placement": "inside", "rank": 8, "alpha": 16},
                     "routing": {"strategy": "embedded", "base_balance_loss": 0.01}})
    peft = attach(lm, cfg)
    lm.model.to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in peft.trainable_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(device))
    lm.model.train()
    return lm, peft


def _batches(vocab, device, step, n=3):
    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (4, 64), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -7:] = 0
        out.append({k: v.to(device) for k, v in
                    {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}.items()})
    return out


def _train(lm, peft, device, steps, hooks=None, layer_major=True):
    from engine.training import SparseAdamW, layer_major_step, micro_batch_major_step, sparse_params_of

    opt = SparseAdamW([p for _, p in peft.trainable_parameters()], lr=1e-3,
                      sparse_params=sparse_params_of(lm.model))
    losses = []
    for s in range(steps):
        batches = _batches(lm.config.vocab_size, device, s)
        if layer_major:
            r = layer_major_step(lm.model, peft, batches, hooks=hooks)
        else:
            r = micro_batch_major_step(lm.model, peft, batches)
        losses.append(r.loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, {n: p.detach().clone() for n, p in peft.trainable_parameters()}


def main() -> int:
    from engine.model import OffloadSchedule, make_tiny_model, offload_banks

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # "bit-identical" compares two runs: both must add in the same order (one CPU thread; CUDA's deterministic
    # index_add_ / cuBLAS workspaces instead of atomics) — with 2 CPU threads the two runs differed in the last bits
    if device.type == "cpu":
        torch.set_num_threads(1)
    else:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("olmoe", Path(tmp) / "m", layers=4, hidden=256, experts=16, top_k=4)
        lm, peft = _setup(path, device)
        want_losses, want = _train(lm, peft, device, 3)
        lm2, peft2 = _setup(path, device)
        cache = offload_banks(peft2.banks, num_slots=24, device=device, num_layers=4)  # 1.5 of 4 layers
        got_losses, got = _train(lm2, peft2, device, 3, hooks=OffloadSchedule(cache))
        same = want_losses == got_losses and all(torch.equal(want[n], got[n]) for n in want)
        print(f"offloaded == resident (3 steps, bit-exact): {same}; cache: "
              f"{ {k: v for k, v in cache.stats.as_dict().items() if k != 'per_layer'} }")
        ok &= same
        lm3, peft3 = _setup(path, device)
        ref_losses, ref = _train(lm3, peft3, device, 3, layer_major=False)
        close = all(torch.allclose(ref[n], want[n], rtol=1e-4, atol=1e-6) for n in ref)
        print(f"layer-major == micro-batch-major (allclose): {close}; losses {ref_losses} vs {want_losses}")
        ok &= close
    print("PASS" if ok else "FAIL", f"on {device}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
