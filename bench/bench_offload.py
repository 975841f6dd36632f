"""Offloaded NF4 experts + layer-major step, against per-micro-batch staging and transformers + PEFT.

Builds a full-size random-weight model of a published MoE config layer by layer: non-expert weights
in bf16 straight on the device, experts quantised to NF4 one expert at a time (never a bf16 copy of
a layer, let alone the model) into pinned host memory, served through an ExpertCache that gets what
the GPU budget leaves. Then trains a few steps with expert LoRA (`embedded`, `inside`) and prints
tokens/s, peak GPU memory, PCIe bytes per step and GB/s for each variant, side by side:

  moetune-layer-major   engine.training.steps.layer_major_step + OffloadSchedule prefetch; one dequantisation per
                        group of experts (their NF4 cache slots stacked on the device)
  moetune-layer-major-per-expert   the same, dequantising expert by expert (the earlier offloaded path)
  moetune-microbatch    the plain loop ((loss/accum).backward() per micro-batch), same cache
  peft-baseline         transformers + PEFT LoRA (`target_parameters` on the fused experts), bf16,
                        gradient checkpointing — only where its bf16 weights fit the budget

Each variant runs in its own subprocess (clean peak-memory numbers; an OOM does not end the run).

  python bench/bench_offload.py --model mixtral --gpu-gb 24          # on a GPU
  python bench/bench_offload.py --small                               # CPU smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODELS = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")
VARIANTS = ("moetune-layer-major", "moetune-layer-major-per-expert", "moetune-microbatch", "peft-baseline")
GB = 1e9


# ---- model building -----------------------------------------------------------------------------
def model_config(name: str, small: bool):
    """The published config of a family's flagship (full size), or a tiny one (--small)."""
    from engine.model.arch import get_family
    from engine.model import tiny_config

    if small:
        return tiny_config(name, layers=4, hidden=128, experts=8, top_k=2, vocab_size=512)
    cfg = get_family(name).published_config()
    cfg.use_cache = False
    return cfg


def _random_(p: torch.Tensor, name: str, hidden: int) -> torch.Tensor:
    if "norm" in name:
        return p.fill_(1.0)
    if name.endswith("mlp.gate.weight"):
        return p.normal_(0.0, hidden ** -0.5)  # decisive routing, as engine.model.tiny does
    return p.normal_(0.0, 0.02)


def build_moetune(cfg, device: torch.device, dtype: torch.dtype, args, log, batched: bool = True) -> tuple:
    """Random model with NF4 experts in host memory behind an ExpertCache; returns (model, peft, cache, info).
    `batched`: one dequantisation per group of experts (else expert by expert: the earlier offloaded path)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    from engine.model.arch import get_family
    from engine.config import from_dict
    from engine.model import ExpertCache, LoadedModel
    from engine.model.offload import OffloadedExpertStore
    from engine.model import NF4ExpertStore
    from engine.adapters import attach

    family = get_family(cfg.model_type)
    facts = family.facts(cfg)
    H, I, E = facts.hidden_size, facts.expert_intermediate_size, facts.num_experts
    torch.manual_seed(0)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    t0 = time.perf_counter()
    for name, p in list(model.named_parameters()):
        if ".experts." in name:
            continue  # experts are built below, in NF4, one at a time
        value = _random_(torch.empty(p.shape, dtype=dtype, device=device), name, H)
        set_module_tensor_to_device(model, name, device, value=value)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    model.config._experts_implementation = "eager"
    # quant bf16: attach only wraps the (still empty) expert tensors; the NF4 stores built below replace them
    rcfg = from_dict({"model": {"quant": "bf16"},
                      "adapter": {"kind": "lora", "placement": "inside", "rank": args.rank, "alpha": 2 * args.rank},
                      "routing": {"strategy": "embedded"}})
    peft = attach(LoadedModel(model, family, Path("random")), rcfg)
    model.to(device)
    model.config.use_cache = False
    non_expert = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    # experts: random bf16 of ONE expert at a time on the device, quantised there into the layer's host store
    hosts = {}
    g = torch.Generator(device=device).manual_seed(1)
    for layer in facts.moe_layers:
        host = NF4ExpertStore(E, H, I, dtype)
        for e in range(E):
            gu = torch.empty(2 * I, H, device=device, dtype=dtype).normal_(0, 0.02, generator=g)
            dn = torch.empty(H, I, device=device, dtype=dtype).normal_(0, 0.02, generator=g)
            host.set_expert(e, gu, dn)
            del gu, dn
        hosts[layer] = host.pin_memory()  # page-locked (on a GPU machine): asynchronous copies
    expert_bytes = sum(t.nbytes for t in hosts[facts.moe_layers[0]].expert_tensors(0).values())
    total_experts = E * len(facts.moe_layers)
    if args.slots is not None:
        slots = args.slots
    elif device.type == "cuda":
        budget = args.gpu_gb * GB - torch.cuda.memory_allocated(device) - args.reserve_gb * GB
        slots = int(max(0, budget) // expert_bytes)
    else:
        slots = total_experts // 2
    slots = min(slots, total_experts)
    if slots < E:
        raise SystemExit(f"the GPU budget leaves room for {slots} experts, fewer than one layer ({E}); "
                         "lower --reserve-gb or raise --gpu-gb")
    cache = ExpertCache(slots, device, num_layers=facts.num_layers)
    for layer, host in hosts.items():
        peft.banks[layer].store = OffloadedExpertStore(host, layer, cache, batched=batched)
    info = {"build_s": round(time.perf_counter() - t0, 1), "expert_mb": round(expert_bytes / 1e6, 3),
            "experts_total": total_experts, "cache_slots": slots,
            "cache_gb": round(slots * expert_bytes / GB, 2),
            "host_experts_gb": round(sum(h.nbytes() for h in hosts.values()) / GB, 2),
            "non_expert_gpu_gb": round(non_expert / GB, 2),
            "trainable": peft.parameter_report()["trainable"]}
    log(f"built: {info}")
    return model, peft, cache, info


def build_peft_baseline(cfg, device: torch.device, dtype: torch.dtype, args, log):
    """transformers model with bf16 experts + PEFT LoRA on the fused expert parameters; None when it cannot fit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.model.arch import get_family

    family = get_family(cfg.model_type)
    n_params = _param_count(cfg)
    need = n_params * dtype.itemsize
    if device.type == "cuda" and need > args.gpu_gb * GB:
        return None, f"does not fit: its {dtype} weights alone are {need / GB:.1f} GB > {args.gpu_gb} GB"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.use_cache = False
    block = family.block_attr
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=[],
                      target_parameters=[f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"])
    model = get_peft_model(model, lcfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model, "ok"


def _param_count(cfg) -> int:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        m = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in m.parameters())


# ---- one variant ----------------------------------------------------------------------------------
def _batches(cfg, args, device, step):
    from engine.data.synthetic import random_token_batches

    return random_token_batches(cfg.vocab_size, args.micro_batch, args.seq_len, args.grad_accum, 1000 + step, device)


def link_bandwidth(device: torch.device, nbytes: int = 256 * 2 ** 20) -> float | None:
    """Pinned host -> device copy bandwidth in GB/s (None on CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return round(5 * nbytes / (start.elapsed_time(end) / 1e3) / GB, 2)


def run_variant(variant: str, args) -> dict:
    """Build, train `args.steps` steps, measure the steps after the first."""
    from engine.training import layer_major_step, micro_batch_major_step
    from engine.model import OffloadSchedule
    from engine.training import SparseAdamW, sparse_params_of

    def log(msg):
        print(f"[{variant}] {msg}", file=sys.stderr, flush=True)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gb * GB / total), device)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    cfg = model_config(args.model, args.small)
    result = {"variant": variant, "model": args.model + (" (small)" if args.small else ""), "device": str(device),
              "tokens_per_step": args.micro_batch * args.seq_len * args.grad_accum}
    cache = None
    try:
        if variant == "peft-baseline":
            model, status = build_peft_baseline(cfg, device, dtype, args, log)
            if model is None:
                return {**result, "status": status}
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

            def step(batches):
                for b in batches:
                    (model(**b).loss / len(batches)).backward()
        else:
            model, peft, cache, info = build_moetune(cfg, device, dtype, args, log,
                                                     batched=variant != "moetune-layer-major-per-expert")
            result.update(info)
            params = [p for _, p in peft.trainable_parameters()]
            opt = SparseAdamW(params, lr=1e-4, weight_decay=0.0, sparse_params=sparse_params_of(model))
            if variant == "moetune-microbatch":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            schedule = OffloadSchedule(cache)

            def step(batches):
                if variant.startswith("moetune-layer-major"):
                    layer_major_step(model, peft, batches, hooks=schedule)
                else:
                    micro_batch_major_step(model, peft, batches)
        model.train()
        times, moved = [], []
        for s in range(args.steps):
            batches = _batches(cfg, args, device, s)
            if device.type == "cuda":
                torch.cuda.synchronize()
                if s == 1:
                    torch.cuda.reset_peak_memory_stats(device)
            if cache is not None:
                cache.reset_stats()
            t0 = time.perf_counter()
            step(batches)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            times.append(dt)
            moved.append(cache.stats.bytes_moved if cache is not None else 0)
            log(f"step {s + 1}: {dt:.2f} s, {moved[-1] / 1e6:.1f} MB moved")
        timed = times[1:] or times  # the first step warms up (allocations, first cache fill)
        bytes_step = sum(moved[1:] or moved) / len(timed)
        sec = sorted(timed)[len(timed) // 2]  # median step time
        result.update(status="ok", step_s=round(sec, 3), tokens_per_s=round(result["tokens_per_step"] / sec, 1),
                      pcie_bytes_per_step=int(bytes_step), pcie_mb_per_step=round(bytes_step / 1e6, 2),
                      pcie_gb_s=round(bytes_step / sec / GB, 3),
                      first_step_s=round(times[0], 3))
        if cache is not None:
            result["cache_last_step"] = {k: v for k, v in cache.stats.as_dict().items() if k != "per_layer"}
        if device.type == "cuda":
            result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / GB, 2)
            result["link_gb_s"] = link_bandwidth(device)
        else:
            import resource

            result["peak_host_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    except torch.OutOfMemoryError as e:
        result.update(status=f"out of memory at {args.gpu_gb} GB: {str(e).splitlines()[0][:160]}")
    return result


# ---- the run ----------------------------------------------------------------------------------------
def _table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "peft-baseline" and r.get("status") == "ok"), None)
    mb = next((r for r in rows if r["variant"] == "moetune-microbatch" and r.get("status") == "ok"), None)
    mem_key = "peak_gpu_gb" if any("peak_gpu_gb" in r for r in rows) else "peak_host_rss_gb"
    head = (f"{'variant':31} {'tokens/s':>10} {'x peft':>7} {'x mb':>6} {mem_key:>16} {'PCIe MB/step':>13} "
            f"{'PCIe GB/s':>10}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['variant']:31} {'-':>10} {'-':>7} {'-':>6} {'-':>16} {'-':>13} {'-':>10}  {r['status']}")
            continue
        xp = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        xm = f"{r['tokens_per_s'] / mb['tokens_per_s']:.2f}" if mb else "-"
        lines.append(f"{r['variant']:31} {r['tokens_per_s']:>10} {xp:>7} {xm:>6} {r.get(mem_key, '-'):>16} "
                     f"{r['pcie_mb_per_step']:>13} {r['pcie_gb_s']:>10}  ok")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="olmoe", help="published config to build at full size")
    p.add_argument("--small", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.add_argument("--gpu-gb", type=float, default=24.0, help="GPU memory cap (set_per_process_memory_fraction)")
    p.add_argument("--reserve-gb", type=float, default=6.0, help="GPU memory kept for activations, outside the cache")
    p.add_argument("--slots", type=int, default=None, help="expert cache slots (default: what the budget leaves)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is not timed; median of the rest)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = p.parse_args(argv)
    if args.small:
        args.cpu = args.cpu or not torch.cuda.is_available()
        if "--seq-len" not in (argv or sys.argv):
            args.seq_len = 32
        if "--micro-batch" not in (argv or sys.argv):
            args.micro_batch = 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args)), flush=True)
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--one", variant],
                              capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:])
        found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        rows.append(json.loads(found[-1][7:]) if found else
                    {"variant": variant, "status": f"failed (exit {proc.returncode}): "
                                                    f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"})
    print(_table(rows))
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
