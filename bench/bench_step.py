"""One training step, MoETune against transformers 5 + HF PEFT, side by side in one run: same random-weight
model (built from the same config and seed in both), same tokens, same optimizer-step shape.

  moetune    engine.adapters.attach: experts in NF4 (engine.model.stores), expert LoRA inside each expert
             (`embedded` + `inside`, rank r, alpha 2r) + attention LoRA (q/k/v/o), attention in NF4,
             gradient checkpointing, SparseAdamW — the path `moetune train` runs with experts resident.
  baseline   transformers 5 + PEFT LoRA: `target_parameters` on the fused `experts.gate_up_proj` /
             `experts.down_proj` plus `target_modules` q_proj / v_proj (rank r, alpha 2r); attention (every
             nn.Linear but the head and routers) in bitsandbytes NF4 (`Linear4bit`) — the part of the model
             bitsandbytes 4-bit applies to — experts in the model's dtype (bitsandbytes cannot store
             transformers' fused 3-D expert tensors), gradient checkpointing, torch AdamW.
  moetune-loop   optional: MoETune with the per-expert loop (`ExpertBank` backend `loop`), for the
             grouped path's own gain.

Shapes: OLMoE (64 experts, top-8) and Qwen3-MoE (128 experts, top-8) at their full expert counts; width and
depth reduced (`--cpu-small`: 2 layers, hidden 128; default: 4 layers, hidden 512) or the published config
(`--published`, for a GPU). Each variant runs in its own process (clean peak memory), all started before
timing; the parent then runs their steps interleaved (m, b, b, m, ...), so drift on a shared machine hits
both alike. Reported per model and combined: tokens/s (tokens of a step / median step time, warm-up steps
not counted), peak memory during the timed steps (CUDA: `max_memory_allocated`; CPU: peak resident set above
the process's floor after its imports, the peak reset after the warm-up with /proc/self/clear_refs), and each
as a ratio MoETune / baseline.

  python bench/bench_step.py --cpu-small --json          # about a minute on 2 cores; one JSON object
  python bench/bench_step.py --model olmoe --threads 2    # a wider model, a table
  python bench/bench_step.py --published --gpu-gb 24      # on a GPU: the published configs under a 24 GB cap
  python bench/bench_step.py --cpu-small --before ../old   # also MoETune as another checkout builds it, interleaved
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"olmoe": {"experts": 64, "top_k": 8}, "qwen3_moe": {"experts": 128, "top_k": 8}}
VARIANTS = ("moetune", "baseline", "moetune-loop")
BEFORE = "moetune-before"  # `moetune` as another checkout (--before DIR) builds it, interleaved with the rest
GB = 1e9


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


# ---- memory --------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so the resident set is what is live."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        return
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    except OSError:
        pass


def _peak_bytes(device, floor_kb: int) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return max(0, _status_kb("VmHWM") - floor_kb) * 1024


# ---- the model -----------------------------------------------------------------------------------
def model_config(name: str, args):
    """The transformers config of one benchmark shape."""
    from engine.model.arch import get_family
    from engine.model import tiny_config

    if args.published:
        cfg = get_family(name).published_config()
    else:
        spec = MODELS[name]
        cfg = tiny_config(name, layers=args.layers, hidden=args.hidden, experts=spec["experts"],
                          top_k=spec["top_k"], vocab_size=args.vocab)
    cfg.use_cache = False
    return cfg


def _base_model(cfg, device, dtype):
    """The random-weight model both variants start from (same config, same seed: the same weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.use_cache = False
    return model


def build_moetune(cfg, device, dtype, args, backend: str):
    """MoETune on the base model; returns (model, step function, info)."""
    import torch

    from engine.model.arch import get_family
    from engine.config import from_dict
    from engine.training import micro_batch_major_step
    from engine.model import LoadedModel
    from engine.training import SparseAdamW, sparse_params_of
    from engine.model import quantize_linear_layers
    from engine.adapters import attach

    family = get_family(cfg.model_type)
    model = _base_model(cfg, device, dtype)
    quantize_linear_layers(model, compute_dtype=dtype)
    rcfg = from_dict({"model": {"quant": "nf4", "attention_quant": "nf4",
                                "expert_backend": args.expert_backend if backend == "grouped" else "torch"},
                      "adapter": {"kind": "lora", "placement": "inside", "rank": args.rank, "alpha": 2 * args.rank},
                      "routing": {"strategy": "embedded", "attention_lora": True}})
    peft = attach(LoadedModel(model, family, Path("random")), rcfg)
    if backend == "loop":
        for bank in peft.banks.values():
            bank.backend = "loop"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for _, p in peft.trainable_parameters()]
    opt = SparseAdamW(params, lr=1e-4, weight_decay=0.0, sparse_params=sparse_params_of(model))

    def step(batches):
        result = micro_batch_major_step(model, peft, batches)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return result.loss

    bank = next(iter(peft.banks.values()))
    return model, step, {"trainable": peft.parameter_report()["trainable"], "bank": bank}


def peft_lora(model, block: str, rank: int):
    """The baseline's adapters: PEFT LoRA on q/v and on the fused experts (`target_parameters`), alpha 2r,
    gradient checkpointing, in train mode; what every bench compares MoETune with."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      target_parameters=[f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"])
    model = get_peft_model(model, lcfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def build_baseline(cfg, device, dtype, args):
    """transformers + PEFT LoRA on the base model; returns (model, step function, info)."""
    import torch

    from engine.model.arch import get_family
    from engine.model import quantize_linear_layers

    block = get_family(cfg.model_type).block_attr
    model = _base_model(cfg, device, dtype)
    quantize_linear_layers(model, compute_dtype=dtype)  # bitsandbytes NF4 Linear4bit, as a QLoRA setup has
    model = peft_lora(model, block, args.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(batches):
        total = 0.0
        for b in batches:
            loss = model(**b).loss
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    impl = getattr(model.base_model.model.config, "_experts_implementation", None)
    return model, step, {"trainable": sum(p.numel() for p in params), "experts_implementation": impl}


def batches_for(cfg, args, step: int, device):
    """The micro-batches of one step: random token ids from a seed of the step (identical in every variant)."""
    from engine.data.synthetic import random_token_batches

    return random_token_batches(cfg.vocab_size, args.micro_batch, args.seq_len, args.grad_accum, 1000 + step, device)


# ---- one variant, in its own process ---------------------------------------------------------------
def child(args) -> None:
    """Build one variant, then serve `step` / `done` commands on stdin, one JSON line each on stdout."""
    import torch

    import bitsandbytes  # noqa: F401  (the same imports in every variant, before the floor is measured)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import engine.adapters  # noqa: F401

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gb * GB / total), device)
    _trim()
    floor_kb = _status_kb("VmRSS")
    cfg = model_config(args.model, args)
    t0 = time.perf_counter()
    info = {"variant": args.child, "model": args.model, "device": str(device)}
    try:
        if args.child == "baseline":
            model, step, extra = build_baseline(cfg, device, dtype, args)
        else:
            model, step, extra = build_moetune(cfg, device, dtype, args,
                                               "loop" if args.child == "moetune-loop" else "grouped")
        bank = extra.pop("bank", None)
        info.update(extra, status="ok", build_s=round(time.perf_counter() - t0, 2))
    except torch.OutOfMemoryError as e:
        info.update(status=f"out of memory: {str(e).splitlines()[0][:160]}")
        print(json.dumps(info), flush=True)
        return
    _reset_peak(device)
    print(json.dumps(info), flush=True)
    n = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            batches = batches_for(cfg, args, n, device)
            n += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                loss = step(batches)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                print(json.dumps({"seconds": time.perf_counter() - t, "loss": loss}), flush=True)
            except torch.OutOfMemoryError as e:
                print(json.dumps({"error": f"out of memory: {str(e).splitlines()[0][:160]}"}), flush=True)
        elif cmd == "reset":  # after the warm-up: the peak of steady-state steps, not of first-use set-up
            _reset_peak(device)
            print(json.dumps({"reset": True}), flush=True)
        elif cmd == "done":
            out = {"peak_gb": round(_peak_bytes(device, floor_kb) / GB, 4)}
            if bank is not None:
                out["expert_backend"] = bank.last_backend or bank.backend
            print(json.dumps(out), flush=True)
            return


class Child:
    """A variant's process: send a command, read its JSON line. `root`: the checkout whose bench and engine it
    runs (`moetune-before` runs `moetune` from the `--before` checkout)."""

    def __init__(self, variant: str, model: str, argv: list[str], root: Path = ROOT):
        served = "moetune" if variant == BEFORE else variant
        cmd = [sys.executable, str(root / "bench" / "bench_step.py"), "--child", served, "--model", model, *argv]
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.variant} exited (code {self.proc.returncode}) without an answer")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _child_argv(args) -> list[str]:
    argv = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
            "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
            "--grad-accum", str(args.grad_accum), "--rank", str(args.rank), "--threads", str(args.threads),
            "--gpu-gb", str(args.gpu_gb), "--expert-backend", args.expert_backend]
    return argv + (["--published"] if args.published else []) + (["--cpu"] if args.cpu else [])


def run_model(model: str, variants: list[str], args, children: dict[str, Child] | None = None) -> dict:
    """All variants of one model shape, their steps interleaved; per-variant medians and the ratios."""
    children = children or {v: Child(v, model, _child_argv(args)) for v in variants}
    try:
        built = {v: c.read() for v, c in children.items()}
        for v, b in built.items():
            log(f"[{model}] built {v}: {b}")
        live = [v for v in variants if built[v]["status"] == "ok"]
        times = {v: [] for v in live}
        losses = {v: [] for v in live}
        errors: dict[str, str] = {}
        for r in range(args.warmup + args.repeats):
            order = live if r % 2 == 0 else list(reversed(live))
            if r == args.warmup:
                for v in live:
                    if v not in errors:
                        children[v].ask("reset")
            for v in order:
                if v in errors:
                    continue
                res = children[v].ask("step")
                if "error" in res:
                    errors[v] = res["error"]
                    continue
                losses[v].append(res["loss"])
                if r >= args.warmup:
                    times[v].append(res["seconds"])
            log(f"[{model}] step {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.3f} s" if r >= args.warmup and times[v]
                                                           else f"{v} warm-up" for v in order))
        tokens = args.micro_batch * args.seq_len * args.grad_accum
        out = {"model": model, "tokens_per_step": tokens, "variants": {}}
        for v in variants:
            row = dict(built[v])
            if v in live and v not in errors:
                row.update(children[v].ask("done"))
                median = statistics.median(times[v])
                row.update(step_s=round(median, 4), tokens_per_s=round(tokens / median, 1),
                           step_times=[round(t, 4) for t in times[v]], losses=[round(x, 5) for x in losses[v]])
            elif v in errors:
                row["status"] = errors[v]
            out["variants"][v] = row
        m, b = out["variants"].get("moetune", {}), out["variants"].get("baseline", {})
        if "tokens_per_s" in m and "tokens_per_s" in b:
            out["tokens_per_s_ratio"] = round(m["tokens_per_s"] / b["tokens_per_s"], 3)
            out["peak_ratio"] = round(m["peak_gb"] / b["peak_gb"], 3) if b["peak_gb"] else None
        return out
    finally:
        for c in children.values():
            c.close()


def summary(results: list[dict], args) -> dict:
    """One JSON object: the combined figures (tokens of all shapes / their median step times; the largest
    peak), their ratios, and each model's detail."""
    import torch

    def total(variant: str, key: str):
        rows = [r["variants"].get(variant, {}) for r in results]
        if not all("tokens_per_s" in row for row in rows):
            return None
        if key == "tokens_per_s":
            return round(sum(r["tokens_per_step"] for r in results) / sum(row["step_s"] for row in rows), 1)
        return max(row["peak_gb"] for row in rows)

    out = {"date": datetime.date.today().isoformat(), "device": "cuda" if torch.cuda.is_available() and not args.cpu
           else "cpu", "threads": args.threads, "models": [r["model"] for r in results],
           "moetune_tokens_per_s": total("moetune", "tokens_per_s"),
           "baseline_tokens_per_s": total("baseline", "tokens_per_s"),
           "moetune_peak_gb": total("moetune", "peak_gb"), "baseline_peak_gb": total("baseline", "peak_gb")}
    if out["moetune_tokens_per_s"] and out["baseline_tokens_per_s"]:
        out["tokens_per_s_ratio"] = round(out["moetune_tokens_per_s"] / out["baseline_tokens_per_s"], 3)
    if out["moetune_peak_gb"] is not None and out["baseline_peak_gb"]:
        out["peak_ratio"] = round(out["moetune_peak_gb"] / out["baseline_peak_gb"], 3)
    before = total(BEFORE, "tokens_per_s")
    if before and out["baseline_tokens_per_s"]:
        out["before_tokens_per_s_ratio"] = round(before / out["baseline_tokens_per_s"], 3)
        out["before_peak_ratio"] = round(total(BEFORE, "peak_gb") / out["baseline_peak_gb"], 3) \
            if out["baseline_peak_gb"] else None
    loop = total("moetune-loop", "tokens_per_s")
    if loop:
        out["moetune_loop_tokens_per_s"] = loop
        out["grouped_over_loop"] = round(out["moetune_tokens_per_s"] / loop, 3) if out["moetune_tokens_per_s"] else None
    out["per_model"] = results
    return out


def table(summ: dict) -> str:
    """The results side by side, one line per model and variant."""
    head = f"{'model':10} {'variant':14} {'tokens/s':>10} {'x base':>7} {'peak GB':>9} {'x base':>7}  backend / status"
    lines = [head, "-" * len(head)]
    for r in summ["per_model"]:
        base = r["variants"].get("baseline", {})
        for v, row in r["variants"].items():
            if "tokens_per_s" not in row:
                lines.append(f"{r['model']:10} {v:14} {'-':>10} {'-':>7} {'-':>9} {'-':>7}  {row.get('status')}")
                continue
            xt = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if "tokens_per_s" in base else "-"
            xm = f"{row['peak_gb'] / base['peak_gb']:.2f}" if base.get("peak_gb") else "-"
            how = row.get("expert_backend") or row.get("experts_implementation") or ""
            lines.append(f"{r['model']:10} {v:14} {row['tokens_per_s']:>10} {xt:>7} {row['peak_gb']:>9} {xm:>7}  {how}")
    lines.append(f"combined: tokens/s x{summ.get('tokens_per_s_ratio')}, peak x{summ.get('peak_ratio')}"
                 + (f"   (before: tokens/s x{summ['before_tokens_per_s_ratio']}, peak x{summ['before_peak_ratio']})"
                    if "before_tokens_per_s_ratio" in summ else ""))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="olmoe,qwen3_moe", help="comma-separated shapes: " + ", ".join(MODELS))
    p.add_argument("--variants", default="moetune,baseline", help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--cpu-small", action="store_true",
                   help="2 layers, hidden 128, 2 x 64 tokens a step, 1 warm-up + 3 timed steps (about a minute)")
    p.add_argument("--published", action="store_true", help="the families' published configs (a GPU)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512, help="hidden size (experts: hidden / 2)")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=5, help="timed steps of each variant, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant (CPU)")
    p.add_argument("--gpu-gb", type=float, default=24.0, help="GPU memory cap (set_per_process_memory_fraction)")
    p.add_argument("--expert-backend", default="auto", choices=("auto", "torch", "grouped-nf4-gemm"),
                   help="MoETune's model.expert_backend (moetune-loop always runs the per-expert loop)")
    p.add_argument("--before", type=Path, default=None, metavar="DIR",
                   help="also run MoETune as the checkout DIR builds it (variant moetune-before), interleaved")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: serve one variant
    args = p.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.cpu_small:
        small = {"--layers": ("layers", 2), "--hidden": ("hidden", 128), "--vocab": ("vocab", 512),
                 "--micro-batch": ("micro_batch", 2), "--seq-len": ("seq_len", 64), "--grad-accum": ("grad_accum", 1),
                 "--repeats": ("repeats", 3)}
        for flag, (name, value) in small.items():
            if flag not in given:
                setattr(args, name, value)
        args.cpu = True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--model {m!r}: choose from {', '.join(MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants {v!r}: choose from {', '.join(VARIANTS)}")
    if args.before is not None:
        if not (args.before / "bench" / "bench_step.py").is_file():
            raise SystemExit(f"--before {args.before}: no bench/bench_step.py there; give a MoETune checkout")
        variants.append(BEFORE)
    roots = {BEFORE: args.before.resolve()} if args.before is not None else {}
    # every variant of every shape starts at once (their imports and builds overlap); steps run shape by shape
    children = {m: {v: Child(v, m, _child_argv(args), roots.get(v, ROOT)) for v in variants} for m in models}
    try:
        results = [run_model(m, variants, args, children[m]) for m in models]
    finally:
        for group in children.values():
            for c in group.values():
                c.close()
    summ = summary(results, args)
    if args.out is not None:
        args.out.write_text(json.dumps(summ, indent=1))
    if args.json:
        print(json.dumps(summ))
    else:
        print(table(summ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
