"""Reading and scoring a sweep's candidates: each run folder's result (held-out loss, accuracy, steps, peak
memory), their mean and spread over seeds, the winner, and the side-by-side table that `moetune sweep` prints and
the app's Sweep tab shows."""

from __future__ import annotations

import statistics
from pathlib import Path

#: the override that sets a candidate's seed (seeds of one candidate are grouped in the results)
SEED_KEY = "train.seed"


def run_result(run_dir: Path | None) -> dict:
    """What a candidate's run folder says: status, held-out loss, accuracy, tokens/s, peak memory (None: a run whose
    folder is not known yet, pending)."""
    from .runs import read_events_counted, skipped_warning

    out: dict = {"status": "pending", "step": 0, "total_steps": 0, "eval_loss": None, "accuracy": {}, "tokens_per_s": None,
                 "memory_gb": None, "final_loss": None, "error": "", "bad_lines": 0, "warning": ""}
    if run_dir is None:
        return out
    got = read_events_counted(run_dir / "events.jsonl")
    bad = got.bad_lines
    speeds, memory = [], []
    for e in got.events:
        kind = e.get("type")
        try:
            if kind == "start":
                speeds, memory, out["status"] = [], [], "running"
                out["total_steps"] = int(e.get("total_steps") or 0)
            elif kind == "step":
                step, speed = int(e["step"]), float(e["tokens_per_s"])
                out["step"], out["final_loss"] = step, e.get("loss")
                if step > 1:  # the first step carries start-up costs
                    speeds.append(speed)
                memory.append(float(e.get("memory_gb") or 0.0))
            elif kind == "eval" and e.get("eval_loss") is not None:
                out["eval_loss"] = float(e["eval_loss"])
            elif kind == "eval" and "accuracy" in e:
                out["accuracy"][str(e["benchmark"])] = float(e["accuracy"])
            elif kind in ("stopped", "done", "error"):
                out["status"] = kind
                out["error"] = str(e.get("message", "")) if kind == "error" else ""
        except (KeyError, TypeError, ValueError):  # an object, but not an event of its type (hand-edited?)
            bad += 1
    out["bad_lines"], out["warning"] = bad, skipped_warning(run_dir / "events.jsonl", bad)
    if speeds:
        out["tokens_per_s"] = round(statistics.median(speeds), 1)
    if memory:
        out["memory_gb"] = max(memory)
    if out["status"] == "done" and not (run_dir / "summary.json").is_file():
        out["status"] = "running"
    return out


def mean_accuracy(accuracy: dict) -> float | None:
    """The unweighted mean of a run's benchmark accuracies (None when none was scored)."""
    return sum(accuracy.values()) / len(accuracy) if accuracy else None


def _stats(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(entries: list[dict]) -> list[dict]:
    """One row per candidate group (its seeds together): mean, std, min and max of each score; its lr (the grid's
    choice, or the config's) and the grid's held-out losses."""
    groups: dict[str, list[dict]] = {}
    grids: dict[str, list[dict]] = {}
    for e in entries:
        (grids if e.get("role") == "grid" else groups).setdefault(e["group"], []).append(e)
    rows = []
    for group, runs in groups.items():
        done = [r for r in runs if r["result"]["status"] == "done"]
        first = runs[0]
        lr = first.get("lr") or (first.get("config") or {}).get("train", {}).get("lr")
        grid = [{"lr": g["lr"], "eval_loss": g["result"]["eval_loss"], "status": g["result"]["status"]}
                for g in grids.get(group, [])]
        rows.append({"candidate": group, "overrides": first["overrides"], "rank": first["rank"],
                     "alpha": first["alpha"], "trainable": first["trainable"], "activated": first.get("activated"),
                     "percent": first["percent"], "lr": lr, "lr_chosen": bool(grid) and first.get("lr") is not None,
                     "grid": grid, "matched": first["matched"], "note": first["note"], "runs": len(runs),
                     "done": len(done),
                     "eval_loss": _stats([r["result"]["eval_loss"] for r in done]),
                     "accuracy": _stats([mean_accuracy(r["result"]["accuracy"]) for r in done]),
                     "tokens_per_s": _stats([r["result"]["tokens_per_s"] for r in done]),
                     "memory_gb": _stats([r["result"]["memory_gb"] for r in done]),
                     "notes": row_notes(first, runs)})
    return rows


def row_notes(first: dict, runs: list[dict]) -> list[str]:
    """What a candidate's row must say besides its scores: a placement the sweep chose for it, a target it
    could not match, a run folder whose events file had unreadable lines."""
    notes = [first["adapted"]] if first.get("adapted") else []
    notes += [] if first["matched"] else [f"not matched: {first['note']}"]
    return notes + [r["result"]["warning"] for r in runs if r["result"].get("warning")]


def notes_of(row: dict) -> list[str]:
    """A table row's notes (`row_notes`); a sweep.json from before notes were kept has only its match note."""
    return row.get("notes", [] if row["matched"] else [f"not matched: {row['note']}"])


def winner(rows: list[dict]) -> dict | None:
    """The best finished group: highest mean accuracy when benchmarks were scored, else lowest held-out loss."""
    scored = [r for r in rows if r["done"] and r["accuracy"]]
    if scored:
        return max(scored, key=lambda r: (r["accuracy"]["mean"], -(r["eval_loss"] or {"mean": 0})["mean"]))
    scored = [r for r in rows if r["done"] and r["eval_loss"]]
    return min(scored, key=lambda r: r["eval_loss"]["mean"]) if scored else None


def winner_overrides(result: dict) -> list[str]:
    """The `section.key=value` items that turn the sweep's base config into its winner (its rank and alpha
    included, its seed not); empty when no candidate has finished."""
    best = result.get("winner")
    if not best:
        return []
    keys = {o.split("=", 1)[0] for o in best["overrides"]}
    extra = [f"adapter.{k}={best[k]}" for k in ("rank", "alpha") if f"adapter.{k}" not in keys]
    return [o for o in best["overrides"] if not o.startswith(SEED_KEY + "=")] + extra


def format_stat(s: dict | None, scale: float = 1.0, digits: int = 4, missing: str = "-") -> str:
    """A score's mean (± std when it has several seeds) scaled and rounded; `missing` when none was scored."""
    if not s:
        return missing
    text = f"{s['mean'] * scale:.{digits}f}"
    return text + (f" ± {s['std'] * scale:.{digits}f}" if s["n"] > 1 else "")


def format_count(n) -> str:
    """A parameter count with thousands separators ('-' when a sweep.json from before it was counted lacks it)."""
    return "-" if n is None else f"{n:,}"


def format_lr(r: dict) -> str:
    """A row's lr: the grid's choice, or the config's; '?' while its grid runs."""
    if r.get("grid") and not r.get("lr_chosen"):
        return "?"
    return "-" if r.get("lr") is None else f"{float(r['lr']):g}"


def grid_line(r: dict) -> str:
    """The lr grid's held-out losses of a row, the chosen one marked: `1e-04: 1.2345 · 3e-04: 1.1111 (chosen)`."""
    chosen = r.get("lr") if r.get("lr_chosen") else None
    return " · ".join(f"{g['lr']}: {'-' if g['eval_loss'] is None else format(g['eval_loss'], '.4f')}"
                      + (" (chosen)" if g["lr"] == chosen else "") for g in r.get("grid") or [])


def table(result: dict) -> str:
    """The sweep as a plain-text table, one line per candidate (mean ± std over its seeds), with its lr grid's
    held-out losses under it."""
    head = (f"{'candidate':<34} {'rank':>4} {'trainable':>10} {'%':>7} {'activated':>10} {'lr':>7} "
            f"{'held-out loss':>17} {'accuracy %':>13} {'tokens/s':>9} {'peak GB':>8}  runs  notes")
    lines = [head, "-" * len(head)]
    for r in result["table"]:
        notes = notes_of(r)
        flag = f"  {'; '.join(notes)}" if notes else ""
        lines.append(f"{r['candidate'][:34]:<34} {r['rank']:>4} {r['trainable']:>10,} {r['percent']:>6.2f}% "
                     f"{format_count(r.get('activated')):>10} {format_lr(r):>7} "
                     f"{format_stat(r['eval_loss']):>17} {format_stat(r['accuracy'], 100, 1):>13} "
                     f"{format_stat(r['tokens_per_s'], 1, 0):>9} {format_stat(r['memory_gb'], 1, 2):>8}  {r['done']}/{r['runs']}{flag}")
        if r.get("grid"):
            lines.append(f"    lr grid, held-out loss: {grid_line(r)}")
    if result.get("target_params"):
        lines.append(f"matched by {result.get('match', 'trainable')} parameters (target {result['target_params']:,}); "
                     "activated = adapter parameters one token's forward uses")
    best = result.get("winner")
    if best:
        lines.append(f"winner: {best['candidate']} (rank {best['rank']}; "
                     f"{'accuracy' if best['accuracy'] else 'held-out loss'})")
    return "\n".join(lines)
