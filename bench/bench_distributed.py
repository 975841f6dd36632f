"""Data-parallel (and expert-parallel) training over torch.distributed: tokens/s and peak memory per rank for 1
and 2 ranks, and the bytes each step hands to collectives (all-reduce; all-to-all under expert parallelism),
next to the estimate the README gives.

Each configuration is a real job: N processes of this script with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), each running `engine.training.loop.train` on the same random-weight model (gloo on the CPU,
NCCL on GPUs). Every rank takes `--micro-batch` sequences a step, so N ranks train N times the tokens of one
(weak scaling: tokens/s is the job's). Bytes are counted where they leave the engine (engine.training.collectives.TRAFFIC:
every all-reduce payload of engine.training.distributed, every all-to-all input of engine.training.expert_parallel), divided by
the steps; the estimate is computed from the model's parameter counts (see `estimate`).

  python bench/bench_distributed.py --json              # CPU, gloo: 1 rank, 2 ranks, 2 ranks expert parallel
  python bench/bench_distributed.py --device cuda --json  # the same script on 2 GPUs, NCCL
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = {"layers": 4, "hidden": 128, "experts": 8, "top_k": 2}


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


def _config(model: Path, data: Path, args, expert_parallel: int) -> dict:
    return {"model": {"path": str(model), "quant": "bf16", "expert_backend": "torch"},
            "adapter": {"kind": "lora", "placement": "parallel", "rank": 8, "alpha": 16.0},
            "routing": {"strategy": "embedded", "attention_lora": True},
            "data": {"train": str(data), "template": "alpaca", "max_len": 128},
            "train": {"max_steps": args.steps, "lr": 1e-3, "micro_batch": args.micro_batch, "grad_accum": 1,
                      "save_every": 10 ** 6, "gradient_checkpointing": False, "expert_parallel": expert_parallel}}


# ---- one rank ----------------------------------------------------------------------------------------
def worker(job: Path) -> None:
    """Train the job's config as this rank; write tokens/s, peak memory and the collective bytes of the rank."""
    import resource

    import torch

    from engine.training import collectives, distributed
    from engine.config import from_dict
    from engine.runs import read_events
    from engine.training import train

    spec = json.loads(job.read_text())
    torch.set_num_threads(spec["threads"])
    cfg = from_dict(spec["config"])
    out = Path(spec["out"])
    train(cfg, out, echo=False, device=spec["device"])
    rank = int(os.environ.get("RANK", 0))
    cuda = spec["device"] == "cuda"
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    result = {"rank": rank, "peak_memory_gb": round(peak, 3), "memory_kind": "cuda allocated" if cuda else "host RSS",
              "all_reduce_bytes_per_step": collectives.TRAFFIC["all_reduce"] / cfg.train.max_steps,
              "all_to_all_bytes_per_step": collectives.TRAFFIC.get("all_to_all", 0) / cfg.train.max_steps}
    if rank == 0:
        steps = [e for e in read_events(out / "events.jsonl")[0] if e["type"] == "step"]
        result["tokens_per_s"] = statistics.median(e["tokens_per_s"] for e in steps[1:])
    (out / f"rank{rank}.json").write_text(json.dumps(result))


# ---- the estimate ------------------------------------------------------------------------------------
def estimate(model: Path, cfg: dict, world: int) -> dict:
    """Bytes a step hands to collectives, from the model's shapes (no run needed).

    all-reduce (fp32): every replicated trainable parameter's gradient + one presence flag per parameter + one
    0/1 used-row flag per row of every replicated per-expert bank; fp64: the token count per micro-batch, and
    the step report (loss, balance loss, tokens, stop, tokens per expert per MoE layer).
    all-to-all (expert parallel, per MoE layer and micro-batch): the (token, expert) rows there and back in the
    forward, and again in the backward: 4 · T · k · H · 4 bytes for T tokens, top-k, hidden H (fp32 on the CPU).
    A ring all-reduce then moves 2 (N-1)/N of its payload over each rank's link.
    """
    from types import SimpleNamespace

    from engine.config import from_dict
    from engine.data import load_examples
    from engine.training.distributed import RankBatches
    from engine.model import load_model, load_tokenizer
    from engine.training import sparse_params_of
    from engine.adapters import attach
    from engine.training import Batches

    c = from_dict({**cfg, "train": {**cfg["train"], "expert_parallel": 1}})
    peft = attach(load_model(c.model.path), c)
    tok = load_tokenizer(c.model.path)
    examples, _ = load_examples(c.data.train, tok, c.data.template, c.data.max_len)
    rank0 = RankBatches(Batches(examples, c.train.micro_batch, c.train.seed, tok.pad_token_id),
                        SimpleNamespace(rank=0, world_size=world))
    steps = rank0.epoch(0)[:c.train.max_steps]  # the run's steps (one epoch is longer than the bench)
    tokens = sum(rank0.tensors(idx, "cpu")["input_ids"].numel() for idx in steps) / len(steps)  # pads too
    ep = cfg["train"]["expert_parallel"] > 1
    f = peft.facts
    expert_params = {id(p) for b in peft.banks.values() for p in b.parameters()} if ep else set()
    replicated = [p for _, p in peft.trainable_parameters() if id(p) not in expert_params]
    rows = sum(b.num for b in {id(b): b for b in sparse_params_of(peft.model).values()}.values()
               if not any(id(p) in expert_params for p in b.parameters(recurse=False)))
    usage = len(f.moe_layers) * f.num_experts
    payload = 4 * (sum(p.numel() for p in replicated) + len(replicated) + rows) + 8 * 1 + 8 * (4 + usage)
    a2a = 4 * tokens * f.top_k * f.hidden_size * 4 * len(f.moe_layers) if ep else 0
    return {"all_reduce_bytes_per_step": payload, "all_reduce_wire_bytes_per_rank": payload * 2 * (world - 1) / world,
            "all_to_all_bytes_per_step": a2a}


# ---- the parent --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(root: Path, name: str, cfg: dict, world: int, args) -> list[dict]:
    """Start `world` ranks of this script on `cfg`; their per-rank results."""
    out = root / name
    job = root / f"{name}.json"
    job.write_text(json.dumps({"config": cfg, "out": str(out), "device": args.device, "threads": args.threads}))
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(job)], env=env, cwd=str(ROOT),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        text, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{name}: a rank failed:\n{text[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> int:
    """Run 1 rank, 2 ranks and 2 ranks with expert parallelism; print the rows (JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return 0
    from engine.data.synthetic import last_digit_rows
    from engine.model import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    model = make_tiny_model("qwen3_moe", root / "model", **SHAPE, seed=0)
    data = root / "train.json"
    data.write_text(json.dumps(last_digit_rows(512, seed=1)))
    rows = []
    for name, world, ep in (("1-rank", 1, 1), ("2-ranks", 2, 1), ("2-ranks-expert-parallel", 2, 2)):
        log(f"{name} ...")
        cfg = _config(model, data, args, ep)
        ranks = run_job(root, name, cfg, world, args)
        rows.append({"run": name, "world_size": world, "expert_parallel": ep, "device": args.device,
                     "tokens_per_s": ranks[0]["tokens_per_s"],
                     "peak_memory_gb_per_rank": [r["peak_memory_gb"] for r in ranks],
                     "memory_kind": ranks[0]["memory_kind"],
                     "measured": {k: ranks[0][k] for k in ("all_reduce_bytes_per_step", "all_to_all_bytes_per_step")},
                     "estimate": estimate(model, cfg, world) if world > 1 else {}})
    result = {"shape": SHAPE, "micro_batch_per_rank": args.micro_batch, "steps": args.steps, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in rows:
            print(f"{r['run']:<26} {r['tokens_per_s']:>9.1f} tok/s  peak {r['peak_memory_gb_per_rank']} GB  "
                  f"all-reduce {r['measured']['all_reduce_bytes_per_step'] / 1e6:.3f} MB/step "
                  f"(est. {r['estimate'].get('all_reduce_bytes_per_step', 0) / 1e6:.3f})  all-to-all "
                  f"{r['measured']['all_to_all_bytes_per_step'] / 1e6:.3f} MB/step "
                  f"(est. {r['estimate'].get('all_to_all_bytes_per_step', 0) / 1e6:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
