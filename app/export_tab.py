"""The Export tab: a finished run's adapter as merged HF safetensors, a PEFT-layout LoRA, GGUF, or a llama.cpp
LoRA adapter GGUF (`moetune export`), and the run's base model alone as GGUF (`--format gguf --base`) to load
that adapter onto, with the commands that run the result and the export report: what was merged, how, and the
measured logit difference."""

from __future__ import annotations

import html
import json
import shlex
from pathlib import Path

import gradio as gr

from . import commands
from .controls import make_widget
from .paths import child_folder
from .runner import Runner


#: the Export tab's pseudo-format of the base model alone (`moetune export --format gguf --base`), and its folder
BASE_FORMAT = "gguf-base"


def _pair_dtype(dtype: str) -> str:
    """The dtype of the other half of a base GGUF + LoRA GGUF pair (f16 or bf16, as the half at hand)."""
    return dtype if dtype in ("f16", "bf16") else "f16"


def _q(path) -> str:
    return shlex.quote(str(path))


def base_gguf_command(run: str | Path, dtype: str) -> tuple[str, Path]:
    """The command that writes a run's base model alone as GGUF into RUN/export-gguf-base, and the file it writes."""
    folder, dtype = Path(run) / f"export-{BASE_FORMAT}", _pair_dtype(dtype)
    return (f"moetune export --run {_q(run)} --format gguf --base --dtype {dtype} --out {_q(folder)}",
            folder / f"base-{dtype}.gguf")


def _error_html(text: str) -> str:
    return f"<div class='mt-msg mt-error' style='color:#ef4444'>{html.escape(text)}</div>"


def how_to_run(report: dict) -> list[tuple[str, str]]:
    """(what, command or code) pairs that load or run an export, from its export_report.json."""
    out, base, fmt = Path(report["out"]), report["base"], report["format"]
    q = _q
    if fmt == "hf":
        return [("transformers", "from transformers import AutoModelForCausalLM\n"
                                 f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})"),
                ("llama.cpp: to GGUF", f"python convert_hf_to_gguf.py {q(out)} --outfile model.gguf")]
    if fmt == "peft":
        return [("HF PEFT", "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
                            f"{str(out)!r})"),
                ("llama.cpp: to a LoRA GGUF", f"python convert_lora_to_gguf.py {q(out)} --base {q(base)}")]
    if fmt == "gguf" and report.get("base_only"):
        model, run = out / report["gguf"]["path"], Path(report["run"])
        dtype = _pair_dtype(report["dtype"])
        lora = run / "export-gguf-lora" / f"adapter-{dtype}.gguf"
        return [("the run's LoRA as a llama.cpp adapter (or any gguf-lora adapter of this base)",
                 f"moetune export --run {q(run)} --format gguf-lora --dtype {dtype} --out {q(lora.parent)}"),
                ("llama.cpp", f"llama-cli -m {q(model)} --lora {q(lora)}"),
                ("llama-cpp-python", "from llama_cpp import Llama\n"
                                     f"llm = Llama(model_path={str(model)!r}, lora_path={str(lora)!r})")]
    if fmt == "gguf":
        model = out / report["gguf"]["path"]
        return [("llama.cpp", f"llama-cli -m {q(model)}"),
                ("llama-cpp-python", f"from llama_cpp import Llama\nllm = Llama(model_path={str(model)!r})")]
    if fmt == "gguf-lora":
        lora = out / report["gguf_lora"]["path"]
        command, base_gguf = base_gguf_command(report["run"], report["dtype"])
        return [("the base model as GGUF, once (the Export base GGUF button; or one you have of the same weights)",
                 command),
                ("llama.cpp", f"llama-cli -m {q(base_gguf)} --lora {q(lora)}"),
                ("llama-cpp-python", "from llama_cpp import Llama\n"
                                     f"llm = Llama(model_path={str(base_gguf)!r}, lora_path={str(lora)!r})")]
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
            against = ("llama.cpp against transformers on the base model" if report.get("base_only") else
                       "against the unmerged model")
            parts.append(f"<div>Largest logit difference, {against}: {diff:.3g}</div>")
    parts.append(f"<details open><summary>Export report</summary><pre>{html.escape(text)}</pre></details>")
    return "".join(parts)


def build(runner: Runner) -> dict:
    """Lay out the Export tab; returns its on-load hook."""
    run = gr.Dropdown(choices=runner.finished_runs(), label="Run", elem_id="export-run")
    with gr.Row():
        fmt = make_widget("export.format", elem_id="export-format")
        dtype = make_widget("export.dtype", elem_id="export-dtype")
    out = gr.Textbox(label="Output folder", info="a folder name inside the run (empty: export-FORMAT)",
                     elem_id="export-out")
    with gr.Row():
        go = gr.Button("Export", variant="primary", elem_id="export-start")
        # the base model alone as GGUF (the dtype above), for the run's gguf-lora adapter: RUN/export-gguf-base
        go_base = gr.Button("Export base GGUF", elem_id="export-base")
    result = gr.HTML(elem_id="export-result")

    def do_export(name, f, d, target):
        if not name:
            return "<div class='mt-msg mt-error'>Pick a finished run first.</div>"
        run_dir = runner.run_path(name)
        try:  # the output folder is one folder name inside the run
            dest = child_folder(run_dir, target, "Output folder") if (target or "").strip() else run_dir / f"export-{f}"
        except ValueError as e:
            return _error_html(str(e))
        f, base = ("gguf", True) if f == BASE_FORMAT else (f, False)
        try:
            text = commands.export(run_dir, f, d, dest, base=base)
        except RuntimeError as e:
            return _error_html(str(e))
        return result_html(dest, text)

    go.click(do_export, [run, fmt, dtype, out], [result])
    def export_base(name, d, target):
        return do_export(name, BASE_FORMAT, d, target)

    go_base.click(export_base, [run, dtype, out], [result])

    def reload_runs(current=None):
        runs = runner.finished_runs()
        return gr.update(choices=runs, value=current if current in runs else (runs[0] if runs else None))

    return {"load": (reload_runs, [], [run]), "select": (reload_runs, [run], [run])}
