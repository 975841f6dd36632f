"""What to change when a plan does not fit (or streams experts): each lever (expert parallelism, NF4, gradient
checkpointing, a smaller micro-batch, shorter sequences, a smaller rank, fewer adapted layers) tried on a copy of
the config, with the memory it frees and whether it is enough on its own. `engine.plan` calls it with its own
placement function."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

from .config import Config
from .sizes import GB, PCIE_BYTES_PER_S, ModelShape, fmt_gb


def advice(cfg: Config, shape: ModelShape, budget: int, p: dict, place: Callable[[Config, ModelShape, int], dict],
           gpus: int = 1) -> list[str]:
    """What to change: each lever with the memory it frees and whether it is enough on its own (`place`: the
    planner's placement of a config, `p` this config's)."""
    fits, offloaded = p["fits"], sum(v == "offloaded" for v in p["placement"].values())
    if fits and not offloaded:
        return []
    out = []
    if not fits:
        out.append(f"memory.gpu_gb: this config needs at least {fmt_gb(p['need_min'])} (streaming experts) and "
                   f"{fmt_gb(p['need_all'])} to keep every expert on the GPU; the budget is {fmt_gb(budget)}.")
    else:
        out.append(f"{offloaded} of {len(p['placement'])} MoE layers stream over PCIe each step "
                   f"({fmt_gb(p['pcie'])}, ≈ {p['pcie'] / PCIE_BYTES_PER_S:.2f} s at 25 GB/s); keeping every expert "
                   f"on the GPU needs memory.gpu_gb ≥ {math.ceil(p['need_all'] / GB * 10) / 10}. Levers:")
    base_fixed = sum(p["fixed"].values())
    levers: list[dict] = []

    def lever(field: str, value: Any, why: str, extra: dict | None = None) -> None:
        trial = copy.deepcopy(cfg)
        section, name = field.split(".")
        setattr(getattr(trial, section), name, value)
        for f, v in (extra or {}).items():
            sec, nm = f.split(".")
            setattr(getattr(trial, sec), nm, v)
        q = place(trial, shape, budget)
        saved = base_fixed - sum(q["fixed"].values()) + (p["total"] - q["total"])
        if saved <= 0:
            return
        levers.append({field: value, **(extra or {})})
        sets = ", ".join(f"{f}: {v}" for f, v in levers[-1].items())
        if not fits:
            verdict = "enough on its own" if q["fits"] else "not enough alone"
        else:
            gained = sum(v != "offloaded" for v in q["placement"].values()) - sum(
                v != "offloaded" for v in p["placement"].values())
            verdict = f"{gained} more layers on the GPU" if gained > 0 else "no whole layer more"
        out.append(f"{sets}: {why} (frees {fmt_gb(saved)}; {verdict}).")

    E = shape.facts.num_experts
    if gpus > 1 and cfg.train.expert_parallel == 1 and E % gpus == 0:
        lever("train.expert_parallel", gpus, f"split every layer's experts across the {gpus} GPUs")
    if cfg.model.quant == "bf16":
        lever("model.quant", "nf4", "store the experts in NF4")
    if cfg.model.attention_quant == "none":
        lever("model.attention_quant", "nf4", "store attention and the other linear layers in NF4 (QLoRA style)")
    if not cfg.train.gradient_checkpointing:
        lever("train.gradient_checkpointing", True, "recompute activations in the backward")
    mb = cfg.train.micro_batch
    for smaller in sorted({max(1, mb // 2), 1}, reverse=True):
        if smaller < mb:
            accum = cfg.train.grad_accum * math.ceil(mb / smaller)
            lever("train.micro_batch", smaller, "fewer sequences per forward; the larger grad_accum keeps the batch",
                  {"train.grad_accum": accum})
            break
    if cfg.data.max_len > 128:
        lever("data.max_len", max(128, cfg.data.max_len // 2), "shorter sequences (longer rows are cut)")
    if cfg.adapter.rank > 4 and cfg.routing.strategy != "none":
        lever("adapter.rank", max(4, cfg.adapter.rank // 2), "a smaller adapter rank")
    if cfg.routing.layers == "all" and cfg.routing.strategy != "none" and len(shape.facts.moe_layers) > 1:
        lever("routing.layers", "every:2", "adapters in every second MoE layer only")
    if not fits and len(levers) > 1:
        trial = copy.deepcopy(cfg)
        for changes in levers:
            for f, v in changes.items():
                sec, nm = f.split(".")
                setattr(getattr(trial, sec), nm, v)
        q = place(trial, shape, budget)
        out.append(f"all of these together: needs {fmt_gb(q['need_min'])} "
                   f"({'fits' if q['fits'] else 'still too much'} in {fmt_gb(budget)}).")
    return out
