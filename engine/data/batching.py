"""Batches: seeded, length-bucketed orders of examples; packing several examples into one sequence;
and collation into padded tensors."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .encode import IGNORE_INDEX, Example


@dataclass
class Packed:
    """Several examples in one sequence; `position_ids` restart at 0 for each, which is how
    transformers keeps them from attending to each other (no attention_mask is passed)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def make_batches(examples: Sequence, micro_batch: int, seed: int = 0, *, bucket: int = 50,
                 shuffle: bool = True, drop_last: bool = False) -> list[list[int]]:
    """Micro-batches of example indices, the same for the same seed.

    Indices are shuffled; each window of `bucket` batches is sorted by length and cut into batches,
    so a batch holds similar lengths (little padding); then the batch order is shuffled. `bucket=1`
    is a plain shuffle; `shuffle=False` keeps file order. Every index appears once (the last, short
    batch is kept unless `drop_last`).
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}.")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if not shuffle:
        batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    else:
        rng.shuffle(order)
        window = max(1, bucket) * micro_batch
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            if bucket > 1:
                chunk.sort(key=lambda i: len(examples[i]), reverse=True)
            batches += [chunk[i:i + micro_batch] for i in range(0, len(chunk), micro_batch)]
        rng.shuffle(batches)
    if drop_last:
        batches = [b for b in batches if len(b) == micro_batch]
    return batches


def pack_examples(examples: Sequence[Example], max_len: int) -> list[Packed]:
    """Pack examples into sequences of at most `max_len` tokens (best fit, longest first; deterministic).
    Each packed example keeps its own labels, and position ids restart per example."""
    if any(len(e) > max_len for e in examples):
        worst = max(examples, key=len)
        raise ValueError(f"an example of {len(worst)} tokens (row {worst.row}) is longer than max_len={max_len}; "
                         "encode with the same max_len you pack with.")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = len(examples[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_len - n, len(bins) - 1))
    packed = []
    for members in bins:
        members.sort()
        ids, labels, pos, rows = [], [], [], []
        for i in members:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + list(e.labels[1:])  # never predict across the seam
            pos += list(range(len(e)))
            rows.append(e.row)
        packed.append(Packed(ids, labels, pos, rows))
    return packed


def collate(examples: Sequence, pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a micro-batch: input_ids, attention_mask and labels (-100 on padding).
    Packed examples give input_ids, labels and position_ids instead of attention_mask."""
    if not examples:
        raise ValueError("collate needs at least one example.")
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; load it with engine.model.loader.load_tokenizer.")
    longest = max(len(e) for e in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    packed = isinstance(examples[0], Packed)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e)
        ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(e.labels, dtype=torch.long)
        if packed:
            extra[r, :n] = torch.tensor(e.position_ids, dtype=torch.long)
            extra[r, n:] = torch.arange(width - n)  # padding is a sequence of its own
        else:
            extra[r, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": extra}
    return {"input_ids": ids, "attention_mask": extra, "labels": labels}
