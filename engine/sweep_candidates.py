"""A sweep's candidates: `--try KEY=V1,V2,...` crossed with each `--candidate '[NAME:] k=v ...'` and the seeds;
`--try train.seed=...` is the seeds and `--try train.lr=...` the learning-rate grid (`lr_grid`), never candidates
of their own. Each candidate's run-folder name, and the placement a candidate gets where the base config's
`inside` cannot apply to it."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from . import config as C
from .config import ConfigError
from .sweep_match import sets as _sets
from .sweep_results import SEED_KEY

#: the override of a candidate's learning rate (the lr grid's key)
LR_KEY = "train.lr"


def folder_name(group: str, lr: str | None = None, seed: int | None = None) -> str:
    """A run folder's name: the group, then `_lr-X` when an lr grid set its lr, then `_seed-S` when seeds are swept."""
    base = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", group).replace("=", "-").strip("-") or "base"
    if lr is not None:
        base += "_lr-" + re.sub(r"[^A-Za-z0-9_.+-]+", "-", lr)
    return base if seed is None else f"{base}_seed-{seed}"


@dataclass
class Candidate:
    """One configuration to train: its overrides of the base config, and a seed when seeds are swept."""

    group: str  # the name shared by a candidate's seeds
    overrides: list[str]
    seed: int | None = None
    lr: str | None = None  # set by the lr grid

    @property
    def name(self) -> str:
        """The run-folder name (the group, plus the lr when a grid set it, plus the seed when seeds are swept)."""
        return folder_name(self.group, self.lr, self.seed)

    def all_overrides(self) -> list[str]:
        """The overrides including the lr and the seed."""
        return self.overrides + ([f"{LR_KEY}={self.lr}"] if self.lr is not None else []) + \
            ([f"{SEED_KEY}={self.seed}"] if self.seed is not None else [])


# ---- candidates ------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """Split `a,b,[0, 2]` at the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def _check_key(key: str, where: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in C.SECTIONS:
        raise ConfigError(f"{where}: {key!r} is not section.key (e.g. routing.strategy); sections: "
                          f"{', '.join(C.SECTIONS)}.")


def parse_try(spec: str) -> tuple[str, list[str]]:
    """`routing.strategy=shared,routed` -> ("routing.strategy", ["shared", "routed"])."""
    key, sep, raw = spec.partition("=")
    key = key.strip()
    if not sep or not raw.strip():
        raise ConfigError(f"--try {spec!r}: write it as section.key=V1,V2,..., e.g. routing.strategy=shared,routed.")
    _check_key(key, f"--try {spec!r}")
    return key, split_values(raw)


def parse_candidate(spec: str) -> tuple[str | None, list[str]]:
    """`[NAME:] k=v k2=v2` (space- or semicolon-separated overrides) -> (NAME or None, ["k=v", "k2=v2"])."""
    name, items = None, spec
    head, sep, rest = spec.partition(":")
    if sep and "=" not in head:
        name, items = head.strip() or None, rest
    overrides = [s for s in re.split(r"[;\s]+", items.strip()) if s]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--candidate {spec!r}: {item!r} is not section.key=value.")
        _check_key(item.split("=", 1)[0], f"--candidate {spec!r}")
    return name, overrides


def _short(overrides: list[str]) -> str:
    return ",".join(f"{o.split('=', 1)[0].split('.')[-1]}={o.split('=', 1)[1]}" for o in overrides)


def expand(tries: list[str], listed: list[str] | None = None, seeds: list[int] | None = None) -> list[Candidate]:
    """The candidates: each listed candidate (or the base config) x the cross product of `tries` x `seeds` (a `--try
    train.lr=...` is the lr grid: `lr_grid`)."""
    parsed = [parse_try(t) for t in tries]
    if any(k == SEED_KEY for k, _ in parsed) and seeds:
        raise ConfigError("give the seeds once: with --seeds or with --try train.seed=..., not both.")
    if any(k == SEED_KEY for k, _ in parsed):  # seeds are grouped, whichever way they were given
        seeds = [int(v) for k, vs in parsed if k == SEED_KEY for v in vs]
        parsed = [(k, vs) for k, vs in parsed if k != SEED_KEY]
    parsed = [(k, vs) for k, vs in parsed if k != LR_KEY]  # the lr grid (lr_grid), not candidates
    bases = [parse_candidate(c) for c in (listed or [])] or [(None, [])]
    out: list[Candidate] = []
    for name, base in bases:
        for combo in itertools.product(*[[f"{k}={v}" for v in vs] for k, vs in parsed]):
            overrides = base + list(combo)
            group = "+".join(x for x in (name, _short(list(combo)) if name else _short(overrides)) if x) or "base"
            for seed in (seeds or [None]):
                out.append(Candidate(group, overrides, seed))
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"candidates {dup} are listed twice; give each --candidate a different NAME: prefix.")
    return out


def adapt_placement(data: dict, overrides: list[str]) -> tuple[list[str], str]:
    """A candidate's overrides with `adapter.placement=parallel` added when the base config's `inside` cannot
    apply to it (inside needs lora + embedded), and the note saying so ('' when nothing was changed). A
    placement the candidate sets itself is kept (and checked as given)."""
    if _sets(overrides, "adapter.placement"):
        return overrides, ""
    merged = C.apply_overrides(data, overrides)
    adapter, routing = merged.get("adapter") or {}, merged.get("routing") or {}
    if adapter.get("placement") != "inside":
        return overrides, ""
    needs = [w for w, ok in (("lora", adapter.get("kind", "lora") == "lora"),
                             ("embedded", routing.get("strategy") == "embedded")) if not ok]
    if not needs:
        return overrides, ""
    return overrides + ["adapter.placement=parallel"], f"placement parallel (inside needs {' + '.join(needs)})"


def _placement_error(c: "Candidate", e: ConfigError) -> ConfigError:
    """The error of a candidate that sets adapter.placement=inside where it cannot apply, with the flag to use."""
    fixed = [o if o.split("=", 1)[0].strip() != "adapter.placement" else "adapter.placement=parallel"
             for o in c.overrides]
    name = c.group if not set("=:") & set(c.group) else Candidate(_short(fixed), []).name
    return ConfigError(f"candidate {c.group}: {e} Within a sweep: list it as --candidate '{name}: {' '.join(fixed)}' "
                       "instead of the --try/--candidate that gives it adapter.placement=inside, or give no "
                       "adapter.placement and the sweep uses parallel wherever inside cannot apply.")


def lr_grid(tries: list[str], grid: list[str] | str | None = None) -> list[str]:
    """The learning rates to try for every candidate: `--lr-grid 1e-4,3e-4` or `--try train.lr=1e-4,3e-4` (not
    both); each must be a valid `train.lr`. Empty: no grid, every candidate trains at the config's lr."""
    from_try = [v for k, vs in (parse_try(t) for t in tries) if k == LR_KEY for v in vs]
    values = split_values(grid) if isinstance(grid, str) else list(grid or [])
    if from_try and values:
        raise ConfigError("give the learning rates once: with --lr-grid or with --try train.lr=..., not both.")
    values = values or from_try
    for v in values:
        C.from_dict({"train": {"lr": v}})  # a bad value is named: train.lr: ...
    if len(set(values)) != len(values):
        raise ConfigError(f"--lr-grid {','.join(values)}: a learning rate is listed twice.")
    return values
