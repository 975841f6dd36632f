"""`moetune sweep`: short trainings of several routing configurations at matched trainable parameters,
scored on held-out loss (`data.eval`) and on `eval.benchmarks`, side by side.

Candidates are the cross product of `--try KEY=V1,V2,...` (times each listed `--candidate`, times
`--seeds`). Each candidate's `adapter.rank` is chosen so that its trainable count is within 10 % of the
target (`--params N`, default the base config's count); `adapter.alpha` keeps the base config's
alpha / rank. Counting attaches the strategy to the model built on the meta device (exact, no weights).

Every candidate is an ordinary run folder `OUT/<candidate>/` trained by a `moetune train` subprocess
(resumable, exportable, its own peak memory). `OUT/sweep.json` is rewritten after every candidate; a
rerun skips finished candidates and resumes a stopped one. SIGINT/SIGTERM are passed on to the running
training (it saves a checkpoint) and the sweep stops after it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import config as C
from .config import ConfigError
from .io import atomic_write_json, atomic_write_text
from .runs import StopFlag, child_env, moetune_command
from .sweep_results import SEED_KEY, run_result, summarize, winner

SWEEP_FILE = "sweep.json"
#: a candidate is matched when its trainable count is within this fraction of the target
TOLERANCE = 0.10


@dataclass
class Candidate:
    """One configuration to train: its overrides of the base config, and a seed when seeds are swept."""

    group: str  # the name shared by a candidate's seeds
    overrides: list[str]
    seed: int | None = None

    @property
    def name(self) -> str:
        """The run-folder name (the group, plus the seed when seeds are swept)."""
        base = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", self.group).replace("=", "-").strip("-") or "base"
        return base if self.seed is None else f"{base}_seed-{self.seed}"

    def all_overrides(self) -> list[str]:
        """The overrides including the seed."""
        return self.overrides + ([f"{SEED_KEY}={self.seed}"] if self.seed is not None else [])


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
    """The candidates: each listed candidate (or the base config) x the cross product of `tries` x `seeds`."""
    parsed = [parse_try(t) for t in tries]
    if any(k == SEED_KEY for k, _ in parsed) and seeds:
        raise ConfigError("give the seeds once: with --seeds or with --try train.seed=..., not both.")
    if any(k == SEED_KEY for k, _ in parsed):  # seeds are grouped, whichever way they were given
        seeds = [int(v) for k, vs in parsed if k == SEED_KEY for v in vs]
        parsed = [(k, vs) for k, vs in parsed if k != SEED_KEY]
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


# ---- matched trainable parameters ------------------------------------------------------------

def count_trainable(cfg: C.Config) -> dict:
    """The parameter report (trainable count, % of the base) of a config, from the model built on the
    meta device with the strategy attached: exact, and no weight is read."""
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


def _with(data: dict, overrides: list[str]) -> C.Config:
    return C.from_dict(C.apply_overrides(data, overrides))


def _sets(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


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


@dataclass
class Match:
    """The rank a candidate trains at and its trainable count against the target."""

    rank: int
    alpha: float
    trainable: int
    percent: float
    matched: bool
    note: str = ""


def match_rank(data: dict, overrides: list[str], target: int, tolerance: float = TOLERANCE) -> Match:
    """Pick `adapter.rank` so the candidate's trainable count is nearest `target`; `matched` says whether it
    is within `tolerance`, `note` why not. A candidate that sets adapter.rank itself keeps it."""
    fixed = any(o.split("=", 1)[0].strip() == "adapter.rank" for o in overrides)
    sets_alpha = any(o.split("=", 1)[0].strip() == "adapter.alpha" for o in overrides)
    base = _with(data, overrides)
    ratio = base.adapter.alpha / base.adapter.rank  # kept: alpha = ratio * rank (the paper's alpha = 2r)

    def cfg_at(r: int) -> C.Config:
        extra = [f"adapter.rank={r}"] + ([] if sets_alpha else [f"adapter.alpha={ratio * r}"])
        return _with(data, overrides + extra)

    if fixed:
        rank = base.adapter.rank
    else:  # the count is a·rank + b (adapters scale with r; routers do not): two counts find a and b
        c1, c2 = count_trainable(cfg_at(1))["trainable"], count_trainable(cfg_at(2))["trainable"]
        a, b = c2 - c1, 2 * c1 - c2
        rank = max(1, round((target - b) / a)) if a > 0 else 1
        rank = min(rank, int(next(f for f in dataclasses.fields(C.AdapterConfig) if f.name == "rank").metadata["max"]))
    cfg = cfg_at(rank) if not fixed else base
    report = count_trainable(cfg)
    n = report["trainable"]
    off = (n - target) / target
    ok = abs(off) <= tolerance
    note = ""
    if not ok:
        if fixed:
            note = f"adapter.rank={rank} is set by the candidate; {n:,} trainable is {off:+.0%} from {target:,}"
        elif rank == 1 and n > target:
            note = f"even at rank 1 it has {n:,} trainable ({off:+.0%} from {target:,}); raise --params to at least " \
                   f"{math.ceil(n / (1 + tolerance)):,}"
        else:
            note = f"rank {rank} gives {n:,} trainable ({off:+.0%} from {target:,}): one rank step is too coarse here"
    return Match(rank, cfg.adapter.alpha, n, round(report["percent"], 4), ok, note)


# ---- reading a finished candidate ------------------------------------------------------------


# ---- running ---------------------------------------------------------------------------------

class _Signals(StopFlag):
    """SIGINT/SIGTERM: the stop flag, also passed on to the running training (which saves a checkpoint)."""

    def __init__(self):
        super().__init__()
        self.child = None

    def _handle(self, signum, frame):
        super()._handle(signum, frame)
        if self.child is not None and self.child.poll() is None:
            try:
                os.kill(self.child.pid, signum)
            except ProcessLookupError:
                pass


def plan_sweep(base: dict, candidates: list[Candidate], params: int | None = None) -> tuple[int, list[dict]]:
    """The target count and, for each candidate, its config dict and matched rank (nothing is trained)."""
    base_cfg = C.from_dict(base)
    target = params if params is not None else count_trainable(base_cfg)["trainable"]
    if target < 1:
        raise ConfigError(f"--params {target}: give a positive number of trainable parameters.")
    matches: dict[tuple, Match] = {}
    entries = []
    for c in candidates:
        overrides, adapted = adapt_placement(base, c.overrides)
        c = dataclasses.replace(c, overrides=overrides)
        key = tuple(c.overrides)
        if key not in matches:
            try:
                matches[key] = match_rank(base, c.overrides, target)
            except ConfigError as e:
                if str(e).startswith("adapter.placement:") and _sets(c.overrides, "adapter.placement"):
                    raise _placement_error(c, e) from None
                raise ConfigError(f"candidate {c.group} ({' '.join(c.overrides) or 'the base config'}): {e}") from None
        m = matches[key]
        extra = [] if _sets(c.overrides, "adapter.rank") else [f"adapter.rank={m.rank}"]
        extra += [] if _sets(c.overrides, "adapter.alpha") else [f"adapter.alpha={m.alpha}"]
        cfg = _with(base, c.all_overrides() + extra)
        entries.append({"name": c.name, "group": c.group, "seed": c.seed, "overrides": c.overrides,
                        "rank": m.rank, "alpha": m.alpha, "trainable": m.trainable, "percent": m.percent,
                        "matched": m.matched, "note": m.note, "adapted": adapted, "config": cfg.to_dict()})
    if not any(e["matched"] for e in entries):
        notes = "; ".join(sorted({f"{e['group']}: {e['note']}" for e in entries}))
        raise ConfigError(f"--params {target:,}: no candidate can be matched within {TOLERANCE:.0%} ({notes}); "
                          "choose another --params.")
    return target, entries


def run_sweep(config: str | Path, tries: list[str], out: str | Path, *, listed: list[str] | None = None,
              seeds: list[int] | None = None, params: int | None = None, max_steps: int | None = None,
              sets: list[str] | None = None, echo: bool = True) -> dict:
    """Plan and train every candidate (skipping finished ones), write OUT/sweep.json; returns it."""
    sets = list(sets or [])
    if max_steps is not None:
        sets += [f"train.max_steps={max_steps}", "train.epochs=null"]
    base = C.load(config, sets).to_dict()
    candidates = expand(tries, listed, seeds)
    if not candidates:
        raise ConfigError("no candidates: give --try KEY=V1,V2 or --candidate.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, entries = plan_sweep(base, candidates, params)
    result = {"config": str(config), "base": base, "target_params": target, "tolerance": TOLERANCE,
              "status": "running", "started": time.time(), "entries": entries}

    live: list[str] = []  # the candidate whose training runs now

    def write(status: str | None = None) -> None:
        for e in entries:
            e["result"] = run_result(out / e["name"])
            if e["result"]["status"] == "running" and e["name"] not in live:  # its process ended unfinished
                e["result"]["status"] = "stopped" if sig.stop else "interrupted"
        if status:
            result["status"] = status
        result["table"] = summarize(entries)
        result["winner"] = winner(result["table"])
        atomic_write_json(out / SWEEP_FILE, result)

    def say(text: str) -> None:
        if echo:
            print(text, file=sys.stderr, flush=True)

    for e in entries:
        if e["adapted"]:
            say(f"sweep: {e['name']}: {e['adapted']}")
        if not e["matched"]:
            say(f"sweep: {e['group']}: not matched: {e['note']}")
    sig = _Signals()
    write()
    with sig:
        for i, e in enumerate(entries):
            if sig.stop:
                break
            run_dir = out / e["name"]
            state = run_result(run_dir)
            if state["status"] == "done":
                say(f"sweep: [{i + 1}/{len(entries)}] {e['name']}: finished before, skipped")
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            launch = run_dir / "launch.yaml"
            atomic_write_text(launch, yaml.safe_dump(e["config"], sort_keys=False))
            from .training import latest_checkpoint

            resume = ["--resume"] if latest_checkpoint(run_dir) is not None else []
            say(f"sweep: [{i + 1}/{len(entries)}] {e['name']}: rank {e['rank']}, {e['trainable']:,} trainable "
                f"({e['percent']:.2f} %){' (resuming)' if resume else ''}")
            live.append(e["name"])
            with open(run_dir / "train.log", "ab") as log:
                sig.child = subprocess.Popen(moetune_command() + ["train", str(launch), "--out", str(run_dir), *resume],
                                             env=child_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                sig.child.wait()
            code, sig.child = sig.child.returncode, None
            live.clear()
            write()
            state = e["result"]
            if state["warning"]:
                say(f"sweep: {e['name']}: warning: {state['warning']}")
            if state["status"] != "done" and not sig.stop:
                reason = state["error"] or f"exit status {code}; see {run_dir / 'train.log'}"
                say(f"sweep: {e['name']}: failed: {reason}")
    finished = all(e["result"]["status"] == "done" for e in entries)
    write("done" if finished else ("stopped" if sig.stop else "incomplete"))
    return result
