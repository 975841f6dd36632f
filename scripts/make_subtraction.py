#!/usr/bin/env python
"""Write the second task the sweep evidence uses: two-digit subtraction, one the demo model half-knows.

    .venv/bin/python scripts/make_subtraction.py       # writes assets/subtraction/ (a second, deterministic)

The demo model (scripts/make_demo.py) was pretrained on subtraction equations ("47 - 38 = 9") and on
this very question in the Alpaca template ("What is 47 - 38?" -> "The answer is 9"), but only for a few
minutes: it answers about half of the held-out questions right (borrows are what it gets wrong). So
unlike the demo's addition task (a question it never saw: 0 % before fine-tuning), the adapter here has
to sharpen a skill the model half has, not map a new question onto a known one.

    assets/subtraction/train.jsonl   2,000 rows "What is a - b?" (10 <= b <= a <= 99), LLM-Adapters format
    assets/subtraction/eval.json     100 held-out rows (no (a, b) pair of the training set)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ROWS, EVAL_ROWS = 2000, 100
TRAIN_SEED, EVAL_SEED = 11, 12


def subtraction_rows(n: int, seed: int) -> list[dict]:
    """`n` rows of "What is a - b?" with two-digit a >= b; the difference as output and answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        a, b = max(a, b), min(a, b)
        rows.append({"instruction": f"What is {a} - {b}?", "input": "", "output": f"The answer is {a - b}",
                     "answer": str(a - b)})
    return rows


def task_rows() -> tuple[list[dict], list[dict]]:
    """Training rows and held-out rows (distinct questions, none of them in the training set)."""
    train = subtraction_rows(TRAIN_ROWS, TRAIN_SEED)
    seen = {r["instruction"] for r in train}
    held = {r["instruction"]: r for r in subtraction_rows(8 * EVAL_ROWS, EVAL_SEED) if r["instruction"] not in seen}
    return train, list(held.values())[:EVAL_ROWS]


def main(argv: list[str] | None = None) -> int:
    """Write train.jsonl and eval.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "assets" / "subtraction"), help="output folder")
    out = Path(p.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = task_rows()
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    (out / "eval.json").write_text(json.dumps(held, indent=1) + "\n", encoding="utf-8")
    print(f"make_subtraction: {len(train)} training rows, {len(held)} held-out rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
