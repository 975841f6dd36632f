"""Matching a sweep's candidates by parameter count: each candidate's `adapter.rank` is chosen so that its
trainable parameters — or its activated adapter parameters per token (`--match activated`) — are within
`TOLERANCE` of the target. Counts are exact: the strategy attached to the model built on the meta device.

Activated adapter parameters per token (`RoutedPEFT.activated_params`): the trainable parameters one token's
forward uses, summed over the layers. `shared` (one adapter of rank r): all of it; `dense`: all N adapters;
`routed` (top-k of N): k adapters + its router (all N logits are computed); `embedded` parallel: the adapters of
the MoE's top_k experts; `embedded` inside: the LoRA on those top_k experts' gate, up and down; attention LoRA and
a trained MoE router: all of them. With alpha = 2r, how far one step moves a token's output grows with the rank
it activates, so at equal trainable parameters `shared` activates the most rank and `inside` the least.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from . import config as C

#: a candidate is matched when its count is within this fraction of the target
TOLERANCE = 0.10
#: what `--match` matches: the trainable count, or the activated adapter parameters per token
MEASURES = ("trainable", "activated")


def count_trainable(cfg: C.Config) -> dict:
    """The parameter report (trainable count, activated per token, % of the base) of a config, from the model
    built on the meta device with the strategy attached: exact, and no weight is read."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .model import LoadedModel, read_config
    from .adapters import attach

    path = Path(cfg.model.path).expanduser()
    config, family = read_config(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    counting = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quant="bf16", attention_quant="none"))
    return attach(LoadedModel(model, family, path), counting).parameter_report()


def with_overrides(data: dict, overrides: list[str]) -> C.Config:
    """The config `data` with `section.key=value` overrides, validated."""
    return C.from_dict(C.apply_overrides(data, overrides))


def sets(overrides: list[str], key: str) -> bool:
    """Whether the overrides set `key`."""
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise C.ConfigError(f"--match {measure!r}: choose one of {', '.join(MEASURES)}.")
    return measure


@dataclass
class Match:
    """The rank a candidate trains at, its counts, and whether the matched one is within tolerance of the target."""

    rank: int
    alpha: float
    trainable: int
    activated: int
    percent: float
    matched: bool
    note: str = ""


def match_rank(data: dict, overrides: list[str], target: int, tolerance: float = TOLERANCE,
               measure: str = "trainable") -> Match:
    """Pick `adapter.rank` so the candidate's count (`measure`: trainable, or activated per token) is nearest
    `target`; `matched` says whether it is within `tolerance`, `note` why not. A candidate that sets adapter.rank
    itself keeps it."""
    check_measure(measure)
    fixed = sets(overrides, "adapter.rank")
    sets_alpha = sets(overrides, "adapter.alpha")
    base = with_overrides(data, overrides)
    ratio = base.adapter.alpha / base.adapter.rank  # kept: alpha = ratio * rank (the paper's alpha = 2r)

    def cfg_at(r: int) -> C.Config:
        extra = [f"adapter.rank={r}"] + ([] if sets_alpha else [f"adapter.alpha={ratio * r}"])
        return with_overrides(data, overrides + extra)

    if fixed:
        rank = base.adapter.rank
    else:  # either count is a·rank + b (adapters scale with r; routers do not): two counts find a and b
        c1, c2 = count_trainable(cfg_at(1))[measure], count_trainable(cfg_at(2))[measure]
        a, b = c2 - c1, 2 * c1 - c2
        rank = max(1, round((target - b) / a)) if a > 0 else 1
        rank = min(rank, int(next(f for f in dataclasses.fields(C.AdapterConfig) if f.name == "rank").metadata["max"]))
    cfg = cfg_at(rank) if not fixed else base
    report = count_trainable(cfg)
    n = report[measure]
    off = (n - target) / target
    ok = abs(off) <= tolerance
    note, what = "", "trainable" if measure == "trainable" else "activated per token"
    if not ok:
        if fixed:
            note = f"adapter.rank={rank} is set by the candidate; {n:,} {what} is {off:+.0%} from {target:,}"
        elif rank == 1 and n > target:
            note = f"even at rank 1 it has {n:,} {what} ({off:+.0%} from {target:,}); raise --params to at least " \
                   f"{math.ceil(n / (1 + tolerance)):,}"
        else:
            note = f"rank {rank} gives {n:,} {what} ({off:+.0%} from {target:,}): one rank step is too coarse here"
    return Match(rank, cfg.adapter.alpha, report["trainable"], report["activated"], round(report["percent"], 4),
                 ok, note)
