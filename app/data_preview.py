"""The Train tab's "Preview dataset": the engine's preview (engine/data/preview.py: the first rows with the
template applied, token counts, what the cut-off drops) drawn as a summary line and a table. The model's
tokenizer is loaded in the app's process (the first preview imports transformers; nothing trains here)."""

from __future__ import annotations

import html
import threading

_tokenizers: dict[str, object] = {}
_lock = threading.Lock()


def _tokenizer(model_path: str):
    from engine.model.loader import load_tokenizer

    with _lock:
        if model_path not in _tokenizers:
            _tokenizers.clear()  # one at a time: a large vocabulary is not small
            _tokenizers[model_path] = load_tokenizer(model_path)
        return _tokenizers[model_path]


def preview(config: dict, rows: int = 5) -> dict:
    """The engine's preview of a (path-resolved) config's data.train; raises ValueError (DataError,
    CheckpointError) with the field's name."""
    from engine.data.preview import preview_dataset

    model, data = config["model"]["path"], config["data"]
    if not str(data.get("train") or "").strip():
        raise ValueError("data.train: empty; give a dataset file or a registry name.")
    try:
        tok = _tokenizer(model)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith("model.path") else f"model.path: {e}") from None
    try:
        return preview_dataset(data["train"], tok, data["template"], int(data["max_len"]), rows=rows)
    except ValueError as e:
        raise ValueError(f"data.train: {e}") from None


def _cell(text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " …"
    return f"<pre style='margin:0;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px'>{html.escape(text)}</pre>"


def preview_html(p: dict) -> str:
    """A summary line (rows, kept, dropped and truncated by the cut-off, tokens) and the first rows as a table."""
    about = "≈ " if p.get("estimated") else ""
    note = (f"<b>{p['rows']:,}</b> rows ({html.escape(p['format'])}) · template <b>{html.escape(p['template'])}</b> · "
            f"cut-off {p['max_len']} tokens: <b>{about}{p['dropped']:,}</b> rows dropped (their prompt fills it), "
            f"<b>{about}{p['truncated']:,}</b> truncated, <b>{about}{p['examples']:,}</b> to train · longest row "
            f"{'seen ' if about else ''}{p['longest']:,} tokens · {about}{p['trained_tokens']:,} of {p['tokens']:,} "
            "tokens trained"
            + (f" · <i>estimated from a sample of {p['counted']:,} rows; training counts every row</i>" if about else ""))
    head = "".join(f"<th style='text-align:left;padding:3px 6px'>{h}</th>" for h in
                   ("row", "prompt (template applied, no loss)", "response (trained)", "tokens", ""))
    body = []
    for r in p["first"]:
        tokens = (f"{r['prompt_tokens']} + {r['response_tokens']} = {r['tokens']}"
                  + (f" → {r['kept_tokens']}" if r["status"] == "truncated" else ""))
        color = {"dropped": "#ef4444", "truncated": "#f59e0b"}.get(r["status"], "inherit")
        body.append(f"<tr class='preview-row' data-row='{r['row']}' data-tokens='{r['tokens']}' "
                    f"data-prompt-tokens='{r['prompt_tokens']}' data-status='{r['status']}' "
                    f"style='border-top:1px solid rgba(127,127,127,.25);vertical-align:top'>"
                    f"<td style='padding:3px 6px'>{r['row']}</td><td style='padding:3px 6px'>{_cell(r['prompt'])}</td>"
                    f"<td style='padding:3px 6px'>{_cell(r['response'])}</td>"
                    f"<td style='padding:3px 6px;white-space:nowrap'>{tokens}</td>"
                    f"<td style='padding:3px 6px;color:{color}'>{r['status']}</td></tr>")
    return (f"<div id='preview' class='mt-preview mt-filled' data-rows='{p['rows']}' data-dropped='{p['dropped']}' "
            f"data-truncated='{p['truncated']}' style='font-size:13px'>"
            f"<div style='margin-bottom:4px'>{note}</div><div style='overflow-x:auto'>"
            f"<table style='border-collapse:collapse;width:100%'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>"
            f"<div style='font-size:11px;opacity:.7'>tokens: prompt + response (with the end-of-text token) = whole row, "
            f"→ what the cut-off keeps</div></div>")
