"""The Export tab: a finished run's adapter as merged HF safetensors, a PEFT-layout LoRA, GGUF, or a llama.cpp
LoRA adapter GGUF (`moetune export`), with the commands that run the result and the export report: what was
merged, how, and the measured logit difference."""

from __future__ import annotations

import html
import json
import shlex
from pathlib import Path

import gradio as gr

from . import commands
from .controls import make_widget
from .runner import Runner


def how_to_run(report: dict) -> list[tuple[str, str]]:
    """(what, command or code) pairs that load or run an export, from its export_report.json."""
    out, base, fmt = Path(report["out"]), report["base"], report["format"]
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    if fmt == "hf":
        return [("transformers", "from transformers import AutoModelForCausalLM\n"
                                 f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})"),
                ("llama.cpp: to GGUF", f"python convert_hf_to_gguf.py {q(out)} --outfile model.gguf")]
    if fmt == "peft":
        return [("HF PEFT", "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
                            f"{str(out)!r})"),
                ("llama.cpp: to a LoRA GGUF", f"python convert_lora_to_gguf.py {q(out)} --base {q(base)}")]
    if fmt == "gguf":
        model = out / report["gguf"]["path"]
        return [("llama.cpp", f"llama-cli -m {q(model)}"),
                ("llama-cpp-python", f"from llama_cpp import Llama\nllm = Llama(model_path={str(model)!r})")]
    if fmt == "gguf-lora":
        lora = out / report["gguf_lora"]["path"]
        return [("a GGUF of the base model, once (or one you have of the same weights)",
                 f"python convert_hf_to_gguf.py {q(base)} --outfile base.gguf"),
                ("llama.cpp", f"llama-cli -m base.gguf --lora {q(lora)}"),
                ("llama-cpp-python", "from llama_cpp import Llama\n"
                                     f"llm = Llama(model_path='base.gguf', lora_path={str(lora)!r})")]
    return []


def result_html(dest: Path, text: str) -> str:
    """What the tab shows after an export: where it went, how to run it, and the report."""
    try:
        report = commands._json_out(text)
    except (ValueError, json.JSONDecodeError):
        report = None
    parts = [f"<div class='mt-msg mt-ok'>Wrote {html.escape(str(dest))}</div>"]
    if isinstance(report, dict) and "format" in report:
        report.setdefault("out", str(dest))
        parts.append("<div id='export-usage'><b>Run it</b>")
        for what, code in how_to_run(report):
            parts.append(f"<div>{html.escape(what)}</div><pre class='mt-command' style='padding:6px 8px;"
                         f"border-radius:6px;background:rgba(127,127,127,0.12)'>{html.escape(code)}</pre>")
        parts.append("</div>")
        diff = report.get("max_abs_logit_diff")
        if diff is not None:
            parts.append(f"<div>Largest logit difference against the unmerged model: {diff:.3g}</div>")
    parts.append(f"<details open><summary>Export report</summary><pre>{html.escape(text)}</pre></details>")
    return "".join(parts)


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
        return result_html(dest, text)

    go.click(do_export, [run, fmt, dtype, out], [result])

    def reload_runs(current=None):
        runs = runner.finished_runs()
        return gr.update(choices=runs, value=current if current in runs else (runs[0] if runs else None))

    return {"load": (reload_runs, [], [run]), "select": (reload_runs, [run], [run])}
