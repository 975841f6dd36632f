"""Device check of the offload path (side-stream copies, events, pinned memory): a small model trained
three steps with its experts resident and again offloaded behind a cache too small for them, layer-major
with prefetch and SparseAdamW. The adapters must come out bit-identical, and the layer-major step
must match the plain micro-batch loop. Runs on CUDA when there is one, else on CPU. It also counts the host
syncs of one offloaded layer-major step on CUDA (torch's sync debug mode), the figure the CPU budget in
tests/test_gpu_readiness_hot.py stands for.

  python bench/check_offload_device.py              # fp32; exit 0 and "PASS" when everything matches
  python bench/check_offload_device.py --dtype bf16  # the model in bf16, as a consumer GPU trains it
  MOETUNE_GROUPED_MM=segment python bench/check_offload_device.py --dtype bf16  # the sm_86/89/120 path
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _setup(path, device, dtype=torch.float32):
    from engine.config import from_dict
    from engine.model import load_model
    from engine.adapters import attach

    lm = load_model(path, dtype=dtype, device=device)
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


def _count_syncs(lm, peft, device, hooks) -> int | None:
    """Host syncs of one layer-major step (CUDA's sync debug mode warns at each); None on the CPU."""
    import warnings

    from engine.training import layer_major_step

    if device.type != "cuda":
        return None
    batches = _batches(lm.config.vocab_size, device, 99)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            layer_major_step(lm.model, peft, batches, hooks=hooks)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lm.model.zero_grad(set_to_none=True)
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> int:
    import argparse

    from engine.model import OffloadSchedule, make_tiny_model, offload_banks

    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's dtype")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.parse_args().dtype]
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
        lm, peft = _setup(path, device, dtype)
        want_losses, want = _train(lm, peft, device, 3)
        lm2, peft2 = _setup(path, device, dtype)
        cache = offload_banks(peft2.banks, num_slots=24, device=device, num_layers=4)  # 1.5 of 4 layers
        got_losses, got = _train(lm2, peft2, device, 3, hooks=OffloadSchedule(cache))
        syncs = _count_syncs(lm2, peft2, device, OffloadSchedule(cache))
        same = want_losses == got_losses and all(torch.equal(want[n], got[n]) for n in want)
        print(f"offloaded == resident (3 steps, bit-exact): {same}; cache: "
              f"{ {k: v for k, v in cache.stats.as_dict().items() if k != 'per_layer'} }")
        ok &= same
        if syncs is not None:  # budget: one per MoE layer and micro-batch in the forward and in the recompute
            print(f"host syncs in one offloaded layer-major step: {syncs} (the bank's budget: {2 * 4 * 3} for 4 layers "
                  "x 3 micro-batches, plus the model's own mask checks and the step's final read-back)")
        lm3, peft3 = _setup(path, device, dtype)
        ref_losses, ref = _train(lm3, peft3, device, 3, layer_major=False)
        # fp32: the same sums in another order; bf16: AdamW moves an element by at most about lr a step, so two
        # runs whose bf16 gradients round differently end within 2 * steps * lr of each other
        tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0.0, "atol": 2 * 3 * 1e-3}
        close = all(torch.allclose(ref[n], want[n], **tol) for n in ref)
        print(f"layer-major == micro-batch-major (allclose): {close}; losses {ref_losses} vs {want_losses}")
        ok &= close
    print("PASS" if ok else "FAIL", f"on {device}, {dtype}, grouped GEMM: "
          f"{os.environ.get('MOETUNE_GROUPED_MM', 'auto')}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
