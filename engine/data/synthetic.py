"""Small generated tasks for tests, the demo and quick checks: rows in the LLM-Adapters format
(Alpaca fields plus `answer`), so the math answer extraction scores them."""

from __future__ import annotations

import random


def addition_rows(n: int, seed: int = 0, digits: int = 2) -> list[dict]:
    """`n` rows of "What is a + b?" with the sum as output and answer; distinct seeds give distinct rows."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    rows = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        rows.append({"instruction": f"What is {a} + {b}?", "input": "", "output": f"The answer is {a + b}",
                     "answer": str(a + b)})
    return rows


def last_digit_rows(n: int, seed: int = 0, digits: int = 4) -> list[dict]:
    """`n` rows of "What is the last digit of N?": a copying task a tiny random-weight model learns in a
    few hundred adapter steps (the trainer's tests use it)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = rng.randint(10 ** (digits - 1), 10 ** digits - 1)
        rows.append({"instruction": f"What is the last digit of {x}?", "input": "",
                     "output": f"The answer is {x % 10}", "answer": str(x % 10)})
    return rows


def random_token_batches(vocab_size: int, micro_batch: int, seq_len: int, grad_accum: int, seed: int,
                         device="cpu") -> list[dict]:
    """One optimizer step of random-token micro-batches (labels = inputs), the same for a seed on any device."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(grad_accum):
        ids = torch.randint(3, vocab_size, (micro_batch, seq_len), generator=g)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": ids.to(device)})
    return out
