"""The Export tab: a finished run's adapter as merged HF safetensors, a PEFT-layout LoRA, or GGUF
(`moetune export`), with the export report: what was merged, how, and the measured logit difference."""

from __future__ import annotations

import html

import gradio as gr

from . import commands
from .controls import make_widget
from .runner import Runner


def build(runner: Runner) -> dict:
    """Lay out the Export tab; returns its on-load hook."""
    run = gr.Dropdown(choices=runner.finished_runs(), label="Run", elem_id="export-run")
    with gr.Row():
        fmt = make_widget("export.format", elem_id="export-format")
        dtype = make_widget("export.dtype", elem_id="export-dtype")
    out = gr.Textbox(label="Output folder", info="empty: RUN/export-FORMAT", elem_id="export-out")
    go = gr.Button("Export", variant="primary", elem_id="export-start")
    result = gr.HTML(elem_id="export-result")

    def do_export(name, f, d, target):
        if not name:
            return "<div class='mt-msg mt-error'>Pick a finished run first.</div>"
        run_dir = runner.run_path(name)
        dest = runner.run_path(target) if target else run_dir / f"export-{f}"
        try:
            text = commands.export(run_dir, f, d, dest)
        except RuntimeError as e:
            return f"<div class='mt-msg mt-error' style='color:#ef4444'>{html.escape(str(e))}</div>"
        return f"<div class='mt-msg mt-ok'>Wrote {html.escape(str(dest))}</div><pre>{html.escape(text)}</pre>"

    go.click(do_export, [run, fmt, dtype, out], [result])

    def reload_runs(current=None):
        runs = runner.finished_runs()
        return gr.update(choices=runs, value=current if current in runs else (runs[0] if runs else None))

    return {"load": (reload_runs, [], [run]), "select": (reload_runs, [run], [run])}
