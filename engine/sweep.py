"""`moetune sweep`: short trainings of several routing configurations at matched parameters, each at its own best
learning rate, scored on held-out loss (`data.eval`) and on `eval.benchmarks`, side by side.

Candidates are the cross product of `--try KEY=V1,V2,...` (times each listed `--candidate`, times `--seeds`:
`engine.sweep_candidates`). Each candidate's `adapter.rank` is chosen so that its trainable count — or, with
`--match activated`, its activated adapter parameters per token — is within 10 % of the target (`--params N`,
default the base config's count; `engine.sweep_match`); `adapter.alpha` keeps the base config's alpha / rank.

With an lr grid (`--lr-grid 1e-4,3e-4,1e-3`, or `--try train.lr=...`) each candidate first trains once per lr (at
its first seed), the lr with the lowest held-out loss is chosen, and only then are its seeds trained at that lr: one
lr for all would measure the lr, not the strategy. The grid's runs are ordinary run folders (`NAME_lr-X[_seed-S]`);
the chosen lr's grid run is also that seed's run.

Every run is an ordinary run folder `OUT/<name>/` trained by a `moetune train` subprocess (resumable, exportable,
its own peak memory). `OUT/sweep.json` is rewritten after every run; a rerun skips finished runs and resumes a
stopped one. SIGINT/SIGTERM are passed on to the running training (it saves a checkpoint) and the sweep stops
after it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from . import config as C
from .config import ConfigError
from .io import atomic_write_json, atomic_write_text
from .runs import StopFlag, child_env, moetune_command
from .sweep_candidates import (  # noqa: F401  (the sweep's public names, as before the split)
    LR_KEY, Candidate, adapt_placement, expand, folder_name, lr_grid, parse_candidate, parse_try, split_values,
    _placement_error,
)
from .sweep_match import (  # noqa: F401
    MEASURES, TOLERANCE, Match, check_measure, count_trainable, match_rank, sets as _sets, with_overrides as _with,
)
from .sweep_results import run_result, summarize, winner

SWEEP_FILE = "sweep.json"


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


def plan_sweep(base: dict, candidates: list[Candidate], params: int | None = None, match: str = "trainable",
               grid: list[str] | None = None) -> tuple[int, list[dict]]:
    """The target count (of `match`: trainable, or activated per token) and the runs: for each candidate its
    config dict and matched rank; with an lr `grid`, one `role: grid` run per lr before each group's seed runs
    (whose lr, and so name, is chosen once the grid has run: `name` None until then). Nothing is trained."""
    check_measure(match)
    base_cfg = C.from_dict(base)
    if grid and not base_cfg.data.eval:
        raise ConfigError("--lr-grid: each candidate's lr is chosen on the held-out loss, and the config has no "
                          "data.eval; set data.eval to a held-out file (or --set data.eval=FILE).")
    target = params if params is not None else count_trainable(base_cfg)[match]
    if target < 1:
        raise ConfigError(f"--params {target}: give a positive number of {match} parameters.")
    matches: dict[tuple, Match] = {}
    entries, grid_done = [], set()
    for c in candidates:
        overrides, adapted = adapt_placement(base, c.overrides)
        c = dataclasses.replace(c, overrides=overrides)
        key = tuple(c.overrides)
        if key not in matches:
            try:
                matches[key] = match_rank(base, c.overrides, target, measure=match)
            except ConfigError as e:
                if str(e).startswith("adapter.placement:") and _sets(c.overrides, "adapter.placement"):
                    raise _placement_error(c, e) from None
                raise ConfigError(f"candidate {c.group} ({' '.join(c.overrides) or 'the base config'}): {e}") from None
        m = matches[key]
        extra = [] if _sets(c.overrides, "adapter.rank") else [f"adapter.rank={m.rank}"]
        extra += [] if _sets(c.overrides, "adapter.alpha") else [f"adapter.alpha={m.alpha}"]

        def entry(cand: Candidate, role: str) -> dict:
            return {"name": cand.name, "group": cand.group, "seed": cand.seed, "role": role, "lr": cand.lr,
                    "overrides": cand.overrides + ([f"{LR_KEY}={cand.lr}"] if cand.lr is not None else []),
                    "rank": m.rank, "alpha": m.alpha, "trainable": m.trainable, "activated": m.activated,
                    "percent": m.percent, "matched": m.matched, "note": m.note, "adapted": adapted,
                    "extra": extra, "config": _with(base, cand.all_overrides() + extra).to_dict()}

        if grid and c.group not in grid_done:  # the group's grid, at its first seed
            grid_done.add(c.group)
            entries += [entry(dataclasses.replace(c, lr=lr), "grid") for lr in grid]
        e = entry(c, "seed")
        if grid:
            e["name"] = None  # its lr is the grid's choice
        entries.append(e)
    if not any(e["matched"] for e in entries):
        notes = "; ".join(sorted({f"{e['group']}: {e['note']}" for e in entries}))
        raise ConfigError(f"--params {target:,}: no candidate can be matched within {TOLERANCE:.0%} ({notes}); "
                          "choose another --params.")
    return target, entries


def choose_lr(entries: list[dict], group: str) -> str | None:
    """The grid's lr of a group with the lowest held-out loss among its finished grid runs (None: none finished)."""
    done = [e for e in entries if e["group"] == group and e["role"] == "grid" and e.get("result")
            and e["result"]["status"] == "done" and e["result"]["eval_loss"] is not None]
    return min(done, key=lambda e: e["result"]["eval_loss"])["lr"] if done else None


def set_lr(e: dict, base: dict, lr: str) -> None:
    """A seed run's lr, chosen by its group's grid: its overrides, config and run-folder name."""
    e["lr"], e["name"] = lr, folder_name(e["group"], lr, e["seed"])
    e["overrides"] = [o for o in e["overrides"] if not o.startswith(LR_KEY + "=")] + [f"{LR_KEY}={lr}"]
    seed = [f"train.seed={e['seed']}"] if e["seed"] is not None else []
    e["config"] = _with(base, e["overrides"] + seed + e["extra"]).to_dict()


def run_sweep(config: str | Path, tries: list[str], out: str | Path, *, listed: list[str] | None = None,
              seeds: list[int] | None = None, params: int | None = None, max_steps: int | None = None,
              sets: list[str] | None = None, echo: bool = True, grid: list[str] | str | None = None,
              match: str = "trainable") -> dict:
    """Plan and train every candidate (each group's lr grid first, when one is given; finished runs skipped),
    write OUT/sweep.json; returns it."""
    sets = list(sets or [])
    if max_steps is not None:
        sets += [f"train.max_steps={max_steps}", "train.epochs=null"]
    base = C.load(config, sets).to_dict()
    candidates = expand(tries, listed, seeds)
    grid = lr_grid(tries, grid)
    if not candidates:
        raise ConfigError("no candidates: give --try KEY=V1,V2 or --candidate.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, entries = plan_sweep(base, candidates, params, match, grid)
    result = {"config": str(config), "base": base, "target_params": target, "match": match, "lr_grid": grid,
              "tolerance": TOLERANCE, "status": "running", "started": time.time(), "entries": entries}

    live: list[str] = []  # the run whose training runs now

    def write(status: str | None = None) -> None:
        for e in entries:
            e["result"] = run_result(out / e["name"]) if e["name"] else run_result(None)
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
        if e["adapted"] and e["role"] == "seed":
            say(f"sweep: {e['group']}: {e['adapted']}")
        if not e["matched"] and e["role"] == "seed":
            say(f"sweep: {e['group']}: not matched: {e['note']}")
    sig = _Signals()
    write()
    with sig:
        for i, e in enumerate(entries):
            if sig.stop:
                break
            if e["name"] is None:  # a seed run after its group's grid
                lr = choose_lr(entries, e["group"])
                if lr is None:
                    say(f"sweep: {e['group']}: no run of the lr grid finished; its seed runs are left out")
                    continue
                set_lr(e, base, lr)
                losses = ", ".join(f"{g['lr']}: {g['result']['eval_loss']:.4f}" for g in entries
                                   if g["group"] == e["group"] and g["role"] == "grid" and g["result"]["eval_loss"]
                                   is not None)
                say(f"sweep: {e['group']}: lr {lr} chosen (held-out loss {losses})")
                write()
            run_dir = out / e["name"]
            state = run_result(run_dir)
            what = f"[{i + 1}/{len(entries)}] {e['name']}" + (" (lr grid)" if e["role"] == "grid" else "")
            if state["status"] == "done":
                say(f"sweep: {what}: finished before, skipped")
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            launch = run_dir / "launch.yaml"
            atomic_write_text(launch, yaml.safe_dump(e["config"], sort_keys=False))
            from .training import latest_checkpoint

            resume = ["--resume"] if latest_checkpoint(run_dir) is not None else []
            say(f"sweep: {what}: rank {e['rank']}, {e['trainable']:,} trainable ({e['percent']:.2f} %), "
                f"{e['activated']:,} activated per token{' (resuming)' if resume else ''}")
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
