"""Full size: a random-weight checkpoint of a family's published config written to disk layer by layer (hub
layout: per-expert tensor names, one safetensors shard per decoder layer), then `moetune train` and
transformers + PEFT on it, each in its own child process under a memory cap this bench enforces itself.

  moetune      `moetune train`: NF4 experts (quantised while streaming the checkpoint, cached for the next run),
               expert LoRA inside every expert (`embedded` + `inside`, rank 8) + attention LoRA, attention NF4
  peft-bf16    transformers 5 `from_pretrained` in bf16 + PEFT LoRA (q/v, `target_parameters` on the fused experts)
  peft-4bit    the same with bitsandbytes 4-bit (`BitsAndBytesConfig`: the linear layers; the fused 3-D experts stay bf16)

The cap (`--cap-gb`, default 22 for a 24 GB machine) is the resident set of the child and all its descendants,
read from /proc/PID/status (VmRSS) every `--poll-s`; at the cap the child's process group is killed and the row
says "did not fit (killed at N GB)". Reported per variant: peak resident set (the polled maximum, or the child's
own high-water mark when larger), load time (start to the first step beginning), median step time after the
first step, tokens/s.

  python bench/bench_full.py --model olmoe                 # OLMoE-1B-7B as published: ~14 GB of disk, ~30 min on 2 cores
  python bench/bench_full.py --model olmoe --layers 1 --set num_experts=8 --set hidden_size=512 --cap-gb 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("moetune", "peft-bf16", "peft-4bit")
GB = 1e9
MARKER = "bench_checkpoint.json"  # written last: the checkpoint folder is complete and of this shape


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(msg, file=sys.stderr, flush=True)


# ---- the memory cap --------------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of a process and all its descendants (VmRSS from /proc; shared pages count in each)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss_kb(p)
        todo += _children(p)
    return total * 1024


def run_capped(cmd: list[str], cap_gb: float, timeout_s: float, log_file: Path, env: dict | None = None,
               poll_s: float = 0.2, on_poll=None) -> dict:
    """Run `cmd` in its own process group, its output to `log_file`, killed when the resident set of its tree
    passes `cap_gb` or it runs past `timeout_s`; returns its exit code, peak bytes, seconds and whether it was
    killed (`killed`: "cap" or "timeout"). `on_poll()` is called at every poll (e.g. to read its events)."""
    cap = cap_gb * GB
    t0 = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        peak, killed = 0, None
        while proc.poll() is None:
            rss = tree_rss_bytes(proc.pid)
            peak = max(peak, rss)
            if on_poll is not None:
                on_poll()
            if rss > cap or time.perf_counter() - t0 > timeout_s:
                killed = "cap" if rss > cap else "timeout"
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child and what it started: its own group
                except ProcessLookupError:
                    pass
                proc.wait()
                break
            time.sleep(poll_s)
    if on_poll is not None:
        on_poll()
    return {"returncode": proc.returncode, "peak_bytes": peak, "seconds": time.perf_counter() - t0, "killed": killed}


# ---- the checkpoint ----------------------------------------------------------------------------------------
def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def bench_config(model: str, layers: int | None, sets: list[str]):
    """The family's published transformers config, with `--layers` and `--set key=value` applied."""
    from engine.model.arch import get_family

    cfg = get_family(model).published_config()
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not hasattr(cfg, key):
            raise SystemExit(f"--set {item!r}: give key=value with a key of the {model} config "
                             f"(e.g. num_experts=8, hidden_size=512)")
        setattr(cfg, key, _value(value))
    if layers is not None:
        cfg.num_hidden_layers = layers
    for key in ("num_experts_per_tok",):  # top-k cannot exceed the experts left
        experts = get_family(model).num_experts(cfg)
        if getattr(cfg, key, 0) > experts:
            setattr(cfg, key, experts)
    cfg.use_cache = False
    return cfg


def _hub_name(family, name: str) -> str:
    """A transformers 5 parameter name under the hub checkpoint's name (inverse of the family's renames)."""
    for old, new in family.renames.items():
        name = name.replace(new, old)
    return name


def _random(shape, name: str, hidden: int, gen):
    import torch

    t = torch.empty(shape, dtype=torch.bfloat16)
    if "norm" in name:
        return t.fill_(1.0)
    return t.normal_(0.0, hidden ** -0.5 if re.search(r"mlp\.gate\.weight$|router", name) else 0.02, generator=gen)


def write_checkpoint(cfg, out: Path, seed: int = 0) -> dict:
    """Write a random bf16 checkpoint of `cfg` to `out` one decoder layer at a time (one shard each, hub names,
    per-expert tensors), plus index, config and a small tokenizer; reused when `out` already holds this shape."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from engine.model.arch import get_family
    from engine.model.arch.base import ExpertKey
    from engine.io import atomic_path, atomic_write_json
    from engine.model import build_tokenizer

    family = get_family(cfg.model_type)
    key = {"config": json.loads(cfg.to_json_string()), "seed": seed}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return json.loads(marker.read_text())
    out.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    groups: dict[int, list[tuple[str, tuple]]] = {}
    for name, p in meta.named_parameters():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        groups.setdefault(int(m[1]) if m else -1, []).append((name, tuple(p.shape)))
    del meta
    order = sorted(groups, key=lambda l: (l < 0, l))  # decoder layers, then embeddings / norm / head
    shards = len(order)
    hidden = cfg.hidden_size
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for n, layer in enumerate(order):
        tensors = {}
        for name, shape in groups[layer]:
            if ".experts." in name and name.endswith(("gate_up_proj", "down_proj")):
                inter = shape[1] // 2 if name.endswith("gate_up_proj") else shape[2]
                for e in range(shape[0]):
                    if name.endswith("gate_up_proj"):
                        for proj in ("gate", "up"):
                            tensors[family.expert_key_name(ExpertKey(layer, e, proj))] = \
                                _random((inter, shape[2]), name, hidden, gen)
                    else:
                        tensors[family.expert_key_name(ExpertKey(layer, e, "down"))] = \
                            _random(shape[1:], name, hidden, gen)
            else:
                tensors[_hub_name(family, name)] = _random(shape, name, hidden, gen)
        file = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        with atomic_path(out / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: file for k in tensors})
        del tensors
        log(f"checkpoint: shard {n + 1}/{shards} written ({total / GB:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                            "weight_map": weight_map})
    cfg.save_pretrained(out)
    build_tokenizer(512).save_pretrained(out)
    info = {"key": key, "bytes": total, "parameters": total // 2, "build_s": round(time.perf_counter() - t0, 1)}
    atomic_write_json(marker, info)
    return info


# ---- the children ------------------------------------------------------------------------------------------
def _training_rows(n: int) -> list[dict]:
    """Alpaca rows long enough that every example is cut at data.max_len (each step the same token count)."""
    words = (ROOT / "assets" / "tokenizer_corpus.txt").read_text(encoding="utf-8").split()
    rows = []
    for i in range(n):
        text = " ".join(words[(i * 97 + j) % len(words)] for j in range(400))
        rows.append({"instruction": f"Continue the text {i}.", "input": "", "output": text})
    return rows


def moetune_config(ckpt: Path, work: Path, args) -> Path:
    """The config `moetune train` runs: NF4 experts, LoRA inside the experts + attention LoRA, resident (CPU)."""
    import yaml

    from engine.io import atomic_write_text

    data = work / "train.jsonl"
    atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in _training_rows(4 * args.steps * args.micro_batch)))
    cfg = {"model": {"path": str(ckpt), "quant": "nf4", "attention_quant": "nf4"},
           "adapter": {"kind": "lora", "placement": "inside", "rank": args.rank, "alpha": 2 * args.rank},
           "routing": {"strategy": "embedded", "attention_lora": True},
           "data": {"train": str(data), "template": "alpaca", "max_len": args.seq_len},
           "train": {"max_steps": args.steps, "micro_batch": args.micro_batch, "grad_accum": 1, "lr": 1e-4,
                     "save_every": 10 ** 6},
           "memory": {"offload": "off"}}
    path = work / "moetune.yaml"
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
    return path


def peft_child(args) -> int:
    """transformers + PEFT on the checkpoint: one JSON line when loaded, one per step (stdout)."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    from bench.bench_step import peft_lora

    from engine.model.arch import get_family
    from engine.model import read_config
    from engine.data.synthetic import random_token_batches

    torch.set_num_threads(args.threads)
    config, family = read_config(args.ckpt)
    t0 = time.perf_counter()
    kwargs = {"dtype": torch.bfloat16}
    if args.peft_child == "peft-4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, **kwargs)
    model.config.use_cache = False
    model = peft_lora(model, family.block_attr, args.rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    print(json.dumps({"type": "start", "time": time.time(), "load_s": round(time.perf_counter() - t0, 2)}), flush=True)
    for step in range(args.steps):
        t = time.perf_counter()
        batch = random_token_batches(min(512, config.vocab_size), args.micro_batch, args.seq_len, 1, 1000 + step)[0]
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        print(json.dumps({"type": "step", "time": time.time(), "step": step + 1, "loss": loss.item(),
                          "tokens_per_s": round(args.micro_batch * args.seq_len / dt, 2),
                          "memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)}),
              flush=True)
    return 0


def _events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def run_variant(variant: str, ckpt: Path, work: Path, args) -> dict:
    """One variant in its own capped child; its row of the table."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MOETUNE_CACHE": str(work / "cache"),
           "PYTHONPATH": str(ROOT)}
    run_dir = work / f"run-{variant}"
    if variant == "moetune":
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        cmd = [sys.executable, "-m", "engine.cli", "train", str(moetune_config(ckpt, work, args)), "--out", str(run_dir)]
        events_file = run_dir / "events.jsonl"
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--peft-child", variant, "--ckpt", str(ckpt),
               "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len),
               "--rank", str(args.rank), "--threads", str(args.threads)]
        events_file = run_dir / "child.log"
    log_file = run_dir.parent / f"{variant}.log" if variant == "moetune" else events_file
    seen: dict[str, float] = {}

    def watch():  # wall time at which each event first appeared (the step events' own times say the same)
        for ev in _events(events_file):
            if ev.get("type") == "step":
                seen.setdefault(f"step{ev['step']}", time.time())

    t_start = time.time()
    res = run_capped(cmd, args.cap_gb, args.timeout_s, log_file, env=env, poll_s=args.poll_s, on_poll=watch)
    events = _events(events_file)
    starts = [e for e in events if e.get("type") == "start"]
    steps = [e for e in events if e.get("type") == "step"]
    reported = max([e.get("memory_gb", 0) for e in steps] or [0]) * GB  # the child's own ru_maxrss
    row = {"variant": variant, "peak_gb": round(max(res["peak_bytes"], reported) / GB, 2),
           "wall_s": round(res["seconds"], 1), "steps": len(steps)}
    if starts:
        row["load_s"] = round(starts[0]["time"] - t_start, 1)
    if steps:
        tokens = args.micro_batch * args.seq_len
        times = [tokens / s["tokens_per_s"] for s in steps if s.get("tokens_per_s")]
        timed = times[1:] or times
        row.update(step_s=round(statistics.median(timed), 2), tokens_per_s=round(tokens / statistics.median(timed), 2),
                   first_step_s=round(times[0], 2), losses=[round(s["loss"], 4) for s in steps])
    if res["killed"] == "cap":
        where = "loading" if not starts else f"in step {len(steps) + 1}"
        row["status"] = f"did not fit (killed at {args.cap_gb:g} GB, {where})"
    elif res["killed"] == "timeout":
        row["status"] = f"stopped at the {args.timeout_s:g} s limit after {len(steps)} steps"
    elif res["returncode"] != 0:
        tail = [l for l in log_file.read_text(errors="replace").splitlines() if l.strip()][-1:] or ["?"]
        row["status"] = f"failed (exit {res['returncode']}): {tail[0][:200]}"
    else:
        row["status"] = "ok"
    return row


def table(rows: list[dict]) -> str:
    """The variants side by side."""
    head = f"{'variant':10} {'peak GB':>8} {'load s':>8} {'step s':>8} {'tokens/s':>9}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:10} {r['peak_gb']:>8} {r.get('load_s', '-'):>8} {r.get('step_s', '-'):>8} "
                     f"{r.get('tokens_per_s', '-'):>9}  {r['status']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="olmoe", help="family whose published config is built (olmoe, mixtral, ...)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the published number)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. num_experts=8 or hidden_size=512 (repeatable)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-full", help="checkpoint, runs and logs")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--cap-gb", type=float, default=22.0, help="resident-set cap of each child (killed above it)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="wall-clock limit of each child")
    p.add_argument("--poll-s", type=float, default=0.2, help="how often the cap is checked")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (the first is not in the median)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--peft-child", choices=VARIANTS[1:], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peft_child:
        return peft_child(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants {v!r}: choose from {', '.join(VARIANTS)}")
    cfg = bench_config(args.model, args.layers, args.set)
    shape = "-".join(f"{k}{getattr(cfg, k)}" for k in ("num_hidden_layers", "hidden_size") if hasattr(cfg, k))
    digest = hashlib.sha256(cfg.to_json_string().encode()).hexdigest()[:10]
    ckpt = args.work / f"{args.model}-{shape}-{digest}" / "checkpoint"
    info = write_checkpoint(cfg, ckpt)
    log(f"checkpoint {ckpt}: {info['parameters'] / 1e9:.2f} B parameters, {info['bytes'] / GB:.2f} GB")
    rows = [run_variant(v, ckpt, ckpt.parent, args) for v in variants]
    result = {"model": args.model, "overrides": args.set, "layers": cfg.num_hidden_layers,
              "parameters": info["parameters"], "checkpoint_gb": round(info["bytes"] / GB, 2), "cap_gb": args.cap_gb,
              "tokens_per_step": args.micro_batch * args.seq_len, "rows": rows}
    print(table(rows))
    if args.json:
        from engine.io import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
