#!/usr/bin/env python
"""The routing evidence as one Markdown table (bench/README.md) from the sweep folders of scripts/sweep_evidence.sh:
one row per sweep and candidate (the best mean accuracy of each sweep in bold) — rank, trainable and activated parameters, the lr the grid chose (with the grid's
held-out losses), held-out loss and accuracy as mean ± std over the seeds, and each seed's accuracy.

    .venv/bin/python scripts/evidence_table.py runs/evidence-facts-trainable-kaiming/ ...   (rows in that order)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.sweep_results import mean_accuracy  # noqa: E402


def _seeds(result: dict, group: str) -> list[str]:
    runs = [e for e in result["entries"] if e["group"] == group and e.get("role") != "grid"]
    out = []
    for e in sorted(runs, key=lambda e: e.get("seed") or 0):
        acc = mean_accuracy(e["result"]["accuracy"]) if e["result"]["status"] == "done" else None
        out.append("-" if acc is None else f"{100 * acc:.0f}")
    return out


def _stat(s: dict | None, scale: float, digits: int) -> str:
    if not s:
        return "-"
    mean = f"{s['mean'] * scale:.{digits}f}"
    return f"{mean} ± {s['std'] * scale:.{digits}f}" if s["n"] > 1 else mean


def rows(folder: Path) -> list[str]:
    result = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    name = folder.name.removeprefix("evidence-")
    best = max((r["accuracy"]["mean"] for r in result["table"] if r.get("accuracy")), default=None)
    out = []
    for r in result["table"]:
        grid = " / ".join("-" if g["eval_loss"] is None else f"{g['eval_loss']:.3f}" for g in r.get("grid") or [])
        acc = _stat(r.get("accuracy"), 100, 1)
        if best is not None and r.get("accuracy") and r["accuracy"]["mean"] == best:
            acc = f"**{acc}**"
        lr = f"{float(r['lr']):g}" if r.get("lr_chosen") or not r.get("grid") else "?"
        out.append(f"| {name} | `{r['candidate']}` | {r['rank']} | {r['trainable']:,} | {r.get('activated') or 0:,} | "
                   f"{lr} ({grid}) | {_stat(r.get('eval_loss'), 1, 3)} | {acc} "
                   f"({' / '.join(_seeds(result, r['candidate']))}) | {r['done']}/{r['runs']} |")
    return out


def main(argv: list[str]) -> int:
    print("| sweep | candidate | rank | trainable | activated | lr (grid's held-out losses) | held-out loss "
          "| accuracy % (seeds 0 / 1 / 2) | runs |")
    print("|---|---|---:|---:|---:|---|---:|---|---:|")
    for folder in (Path(a) for a in argv):  # in the order given
        if (folder / "sweep.json").is_file():
            print("\n".join(rows(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
