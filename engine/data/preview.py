"""The dataset preview (as LLaMA-Factory's "Preview dataset"): the first rows with the template applied and
their token counts, and how many rows the cut-off will drop and truncate — counted by the very encoding
training uses (`encode_records`, with the dataset's own options), so the numbers are training's. A dataset of more
than `SAMPLE_ROWS` rows is counted on a fixed random sample of that many and the counts scaled (marked
`estimated`): tokenising commonsense_170k whole takes ~40 s on two CPU cores, too long for a preview button;
training still counts every row."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .encode import IGNORE_INDEX, encode_records
from .formats import read_records
from .registry import DatasetSpec, resolve_dataset
from .templates import render

#: long enough that nothing is cut: the rows' own lengths
_NO_CUT = 1 << 30
#: rows counted at most; more are sampled (seeded: the same dataset gives the same estimate)
SAMPLE_ROWS = 20_000


@dataclass
class PreviewRow:
    """One row as training sees it: the prompt the model reads, the response it learns, and token counts."""

    row: int  # the source row number (1-based)
    prompt: str  # the template applied (no loss on it)
    response: str  # what the loss is on (the EOS token follows it for plain templates)
    prompt_tokens: int
    response_tokens: int  # trained tokens of the whole row, the EOS included
    tokens: int  # the whole row, before the cut-off
    kept_tokens: int  # after the cut-off (0 when the row is dropped)
    status: str  # kept | truncated | dropped


def preview_dataset(spec: str | Path | DatasetSpec, tokenizer, template: str = "alpaca", max_len: int = 512,
                    rows: int = 5, registry: str | Path | None = None, sample: int = SAMPLE_ROWS) -> dict:
    """The first `rows` rows under `template` with their token counts, and the whole dataset's counts under the
    cut-off `max_len`: rows, examples (kept), dropped, truncated (as `load_examples` counts them for training),
    counted on `counted` rows (all of them, or a seeded sample of `sample` scaled to the whole: `estimated`).
    Raises DataError for a dataset training would refuse (a missing file, a broken row)."""
    ds = resolve_dataset(spec, registry)
    records, fmt = read_records(ds.file, ds.format, split=ds.split, columns=ds.columns,
                                ignore_columns=ds.ignore_columns)
    opts = dict(too_long=ds.too_long, long_prompt=ds.long_prompt, min_examples=0, source=str(ds.file))
    counted = records if len(records) <= sample else \
        [records[i] for i in sorted(random.Random(0).sample(range(len(records)), sample))]
    _, stats = encode_records(counted, tokenizer, template, max_len, **opts)
    scale = len(records) / max(1, len(counted))
    for key in ("examples", "dropped_long_prompt", "dropped_too_long", "truncated", "tokens", "trained_tokens"):
        stats[key] = round(stats[key] * scale)
    head = records[:max(0, rows)]
    full, _ = encode_records(head, tokenizer, template, _NO_CUT, **{**opts, "long_prompt": "drop"})
    cut, _ = encode_records(head, tokenizer, template, max_len, **{**opts, "long_prompt": "drop"})
    full_by, cut_by = {e.row: e for e in full}, {e.row: e for e in cut}
    first = []
    for record in head:
        segments = render(record, template, tokenizer).segments
        whole, kept = full_by.get(record.number), cut_by.get(record.number)
        trained = sum(t != IGNORE_INDEX for t in whole.labels) if whole else 0
        n = len(whole) if whole else 0
        status = "dropped" if kept is None else ("truncated" if len(kept) < n else "kept")
        first.append(PreviewRow(row=record.number, prompt="".join(s.text for s in segments if not s.train),
                                response="".join(s.text for s in segments if s.train), prompt_tokens=n - trained,
                                response_tokens=trained, tokens=n, kept_tokens=len(kept) if kept else 0,
                                status=status))
    return {"dataset": ds.name, "file": str(ds.file), "format": fmt, "template": template, "max_len": max_len,
            "rows": len(records), "counted": len(counted), "estimated": len(counted) < len(records),
            "examples": stats["examples"],
            "dropped": stats["dropped_long_prompt"] + stats["dropped_too_long"],
            "dropped_long_prompt": stats["dropped_long_prompt"], "dropped_too_long": stats["dropped_too_long"],
            "truncated": stats["truncated"], "longest": stats["longest"], "tokens": stats["tokens"],
            "trained_tokens": stats["trained_tokens"], "first": [asdict(r) for r in first]}
