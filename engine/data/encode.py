"""Records -> token ids and labels: loss on the response only (labels are -100 on the prompt), or on every
token with `train_on_prompt` (the PERFT paper's `train_on_inputs=True`); the cut-off applied with a count of what was cut, and `load_examples`, the data layer's entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .formats import Record, read_records
from .registry import DatasetSpec, resolve_dataset
from .templates import Rendered, check_template, render

IGNORE_INDEX = -100
TOO_LONG = ("truncate", "drop")
LONG_PROMPT = ("error", "drop")
_CHUNK = 1024  # texts per tokenizer call


@dataclass
class Example:
    """One tokenized training example; `labels` is -100 wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    row: int  # the source row number (1-based)

    def __len__(self) -> int:
        return len(self.input_ids)


def _tokenize(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), _CHUNK):
        out.extend(tokenizer(texts[i:i + _CHUNK], add_special_tokens=add_special_tokens)["input_ids"])
    return out


def _prompt_field(record: Record) -> str:
    if record.is_chat:
        return "'messages'"
    return "'instruction'/'input'" if record.input.strip() else "'instruction'"


def template_tokens(template: str, tokenizer) -> int:
    """How many tokens the template itself takes with this tokenizer (its prompt around empty fields)."""
    if template == "chat":
        record = Record("the template", 0, messages=[{"role": "user", "content": ""},
                                                     {"role": "assistant", "content": "x"}])
    else:
        record = Record("the template", 0)
    first = render(record, template, tokenizer).segments[0].text
    return len(_tokenize(tokenizer, [first], True)[0])


def encode_records(records: list[Record], tokenizer, template: str, max_len: int, *,
                   too_long: str = "truncate", long_prompt: str = "drop", min_examples: int = 1,
                   source: str = "", train_on_prompt: bool = False) -> tuple[list[Example], dict]:
    """Tokenize records under a template and apply the cut-off `max_len`.

    A row longer than `max_len` is truncated (`too_long='truncate'`, the response end is cut) or
    dropped (`'drop'`); a row whose prompt alone fills `max_len` leaves nothing to learn and is dropped
    and counted (`long_prompt='drop'`, the default, as LLaMA-Factory's cut-off does) or an error
    (`'error'`) — also with `train_on_prompt`, which labels every token (prompt, template and response) as the
    PERFT paper's code does. Fewer than `min_examples` rows left (0: no floor) is an error with the counts and the
    fix. Returns the
    examples and stats: rows, examples, truncated, truncated_tokens, dropped_too_long, dropped_long_prompt, …
    """
    check_template(template)
    if too_long not in TOO_LONG:
        raise DataError(f"too_long {too_long!r} is not allowed; choose one of {', '.join(TOO_LONG)}.")
    if long_prompt not in LONG_PROMPT:
        raise DataError(f"long_prompt {long_prompt!r} is not allowed; choose one of {', '.join(LONG_PROMPT)}.")
    if max_len < 2:
        raise DataError(f"max_len {max_len} is too small; the cut-off must leave room for a prompt and a reply.")
    eos = tokenizer.eos_token_id
    rendered: list[Rendered] = [render(r, template, tokenizer) for r in records]
    # Tokenize in two flat batches: first segments of plain templates get the tokenizer's BOS.
    special, plain, where = [], [], []
    for i, rd in enumerate(rendered):
        for j, seg in enumerate(rd.segments):
            first = j == 0 and rd.add_special_tokens
            (special if first else plain).append(seg.text)
            where.append((first, i, j))
    ids_special = iter(_tokenize(tokenizer, special, True))
    ids_plain = iter(_tokenize(tokenizer, plain, False))
    seg_ids: list[list[list[int]]] = [[None] * len(rd.segments) for rd in rendered]  # type: ignore[list-item]
    for first, i, j in where:
        seg_ids[i][j] = next(ids_special) if first else next(ids_plain)

    stats = {"source": source, "template": template, "max_len": max_len, "train_on_prompt": train_on_prompt,
             "rows": len(records), "examples": 0,
             "truncated": 0, "truncated_tokens": 0, "dropped_too_long": 0, "dropped_long_prompt": 0,
             "tokens": 0, "trained_tokens": 0, "longest": 0}
    if template == "chat":
        stats["last_turn_only"] = 0
    examples: list[Example] = []
    long_prompts: list[tuple[Record, int]] = []
    for record, rd, pieces in zip(records, rendered, seg_ids):
        input_ids: list[int] = []
        labels: list[int] = []
        prompt_len = None  # tokens before the first trained token
        for seg, ids in zip(rd.segments, pieces):
            if seg.train and prompt_len is None:
                prompt_len = len(input_ids)
            input_ids += ids
            labels += ids if seg.train or train_on_prompt else [IGNORE_INDEX] * len(ids)
        if rd.append_eos and eos is not None:
            input_ids.append(eos)
            labels.append(eos)
        prompt_len = len(input_ids) if prompt_len is None else prompt_len
        stats["longest"] = max(stats["longest"], len(input_ids))
        if prompt_len >= max_len:
            long_prompts.append((record, prompt_len))
            continue
        if len(input_ids) > max_len:
            if too_long == "drop":
                stats["dropped_too_long"] += 1
                continue
            stats["truncated"] += 1
            stats["truncated_tokens"] += len(input_ids) - max_len
            input_ids, labels = input_ids[:max_len], labels[:max_len]
        if all(t == IGNORE_INDEX for t in labels):
            long_prompts.append((record, prompt_len))
            continue
        if rd.last_turn_only:
            stats["last_turn_only"] += 1
        examples.append(Example(input_ids, labels, record.number))
        stats["tokens"] += len(input_ids)
        stats["trained_tokens"] += sum(t != IGNORE_INDEX for t in labels)
    if long_prompts and long_prompt == "error":
        record, n = long_prompts[0]
        others = "" if len(long_prompts) == 1 else (
            f" ({len(long_prompts)} of {len(records)} rows are like this: rows "
            + ", ".join(str(r.number) for r, _ in long_prompts[:5]) + (" …" if len(long_prompts) > 5 else "") + ")")
        raise DataError(f"{record.where}: field {_prompt_field(record)}: the prompt is {n} tokens, not shorter than "
                        f"the cut-off max_len={max_len}, so no response token would be learned{others}. Fix: raise "
                        "data.max_len, shorten the row, or skip such rows with long_prompt='drop' "
                        "(\"long_prompt\": \"drop\" in the dataset registry entry).")
    stats["dropped_long_prompt"] = len(long_prompts)
    stats["examples"] = len(examples)
    if min_examples > 0 and len(examples) < min_examples:  # 0: no floor (the dataset preview counts only)
        raise DataError(_too_few(stats, template, tokenizer, min_examples, source))
    return examples, stats


def _too_few(stats: dict, template: str, tokenizer, needed: int, source: str) -> str:
    """Why too few rows are left to train, with the numbers and the fix."""
    max_len, rows, left = stats["max_len"], stats["rows"], stats["examples"]
    own = template_tokens(template, tokenizer)
    head = (f"{source or 'the dataset'}: {left} of {rows} rows left to train, and one optimizer step needs "
            f"{needed} (train.micro_batch × train.grad_accum)" if needed > 1 else
            f"{source or 'the dataset'}: no rows left to train out of {rows}")
    why = (f" ({stats['dropped_long_prompt']} rows' prompts fill the cut-off data.max_len={max_len}, "
           f"{stats['dropped_too_long']} rows longer than it were dropped by too_long='drop')")
    if own >= max_len - 1:
        fix = (f" The {template!r} template alone is {own} tokens with this model's tokenizer, so no row fits "
               f"under data.max_len={max_len}. Fix: raise data.max_len well above {own} (the paper's recipe "
               "uses 256).")
    else:
        fix = (f" Fix: raise data.max_len (the longest row is {stats['longest']} tokens), or use shorter rows"
               + (", or lower train.micro_batch × train.grad_accum." if needed > 1 else "."))
    return head + why + "." + fix


def load_examples(spec: str | Path | DatasetSpec, tokenizer, template: str = "alpaca", max_len: int = 512, *,
                  too_long: str | None = None, long_prompt: str | None = None, format: str | None = None,
                  registry: str | Path | None = None, limit: int | None = None,
                  min_examples: int = 1, train_on_prompt: bool = False) -> tuple[list[Example], dict]:
    """Read a dataset (file, folder, or registry name), check every row, and tokenize it for training.

    Rows longer than `max_len` are truncated (default) or dropped; a row whose prompt fills `max_len` is
    dropped and counted (default) or, with `long_prompt='error'`, a DataError. Options left None come from
    the registry entry. `train_on_prompt` labels the prompt too. Returns (examples, stats); stats counts what was
    truncated and dropped.
    """
    ds = resolve_dataset(spec, registry)
    records, fmt = read_records(ds.file, format or ds.format, split=ds.split, columns=ds.columns,
                                ignore_columns=ds.ignore_columns, limit=limit)
    examples, stats = encode_records(records, tokenizer, template, max_len,
                                     too_long=too_long or ds.too_long, long_prompt=long_prompt or ds.long_prompt,
                                     min_examples=min_examples, source=str(ds.file), train_on_prompt=train_on_prompt)
    stats = {"dataset": ds.name, "format": fmt, **stats}
    return examples, stats
