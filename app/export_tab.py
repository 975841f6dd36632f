"""The Export tab: a finished run's adapter as merged HF safetensors, a PEFT-layout LoRA, GGUF, or a llama.cpp
LoRA adapter GGUF (`moetune export`), and the run's base model alone as GGUF (`--format gguf --base`) to load
that adapter onto, with the commands that run the result and the export report: what was merged, how, and the
measured logit difference."""

from __future__ import annotations

import html
import json
import shlex
import time
from pathlib import Path

import gradio as gr

from . import commands, run_list
from .controls import make_widget
from .paths import child_folder
from .runner import Runner

#: formats, and the dtypes each takes, as `moetune export` allows them (engine/export/run.py: DTYPES, less f32)
FORMATS = ("hf", "peft", "gguf", "gguf-lora")
FORMAT_DTYPES = {"hf": ("f16", "bf16"), "peft": ("f16", "bf16"), "gguf": ("f16", "bf16", "q8_0"),
                 "gguf-lora": ("f16", "bf16")}


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
        peft = ("HF PEFT", "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                           f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
                           f"{str(out)!r})")
        if report.get("layout") == "fused":  # convert_lora_to_gguf.py reads per-expert LoRA only
            run = Path(report["run"])
            return [peft, ("llama.cpp: the run's LoRA GGUF (convert_lora_to_gguf.py does not read PEFT's fused "
                           "expert layout)", f"moetune export --run {q(run)} --format gguf-lora --dtype "
                           f"{report['dtype']} --out {q(run / default_folder('gguf-lora', report['dtype']))}")]
        return [peft, ("llama.cpp: to a LoRA GGUF", f"python convert_lora_to_gguf.py {q(out)} --base {q(base)}")]
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


def _size(n: int) -> str:
    return next(f"{n / d:,.1f} {u}" for d, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")) if n >= d or u == "B")


def _merged_line(item) -> str:
    if isinstance(item, dict):
        return ", ".join(f"{k}: {v}" for k, v in item.items() if not isinstance(v, (dict, list)))
    return str(item)


def result_html(dest: Path, text: str, run: str = "", replaced: str = "") -> str:
    """The export as a summary card — the run, where it went, its files and sizes, exact or not, the logit
    difference, the commands that run it (wrapped) — with the report's JSON folded away."""
    try:
        report = commands._json_out(text)
    except (ValueError, json.JSONDecodeError):
        report = None
    esc = html.escape
    parts = [f"<div class='mt-msg mt-ok'>Wrote {esc(str(dest))}" + (f" (exported {esc(run_list.label(run))})" if run
                                                                     else "") + "</div>"]
    if replaced:
        parts.append(f"<div class='mt-msg mt-warn'>{esc(replaced)}</div>")
    wrap = "white-space:pre-wrap;overflow-wrap:anywhere"
    if isinstance(report, dict) and "format" in report:
        report.setdefault("out", str(dest))
        exact = report.get("exact")
        rows = [("run", run_list.label(run) if run else str(report.get("run", ""))),
                ("format", f"{report['format']}{' (base model alone)' if report.get('base_only') else ''}, "
                           f"{report.get('dtype', '')}"),
                ("exact", "yes: the merged model computes what the adapter does" if exact else
                 "no" if exact is False else "–")]
        diff = report.get("max_abs_logit_diff")
        against = ("llama.cpp against transformers on the base model" if report.get("base_only") else
                   "against the unmerged model")
        rows.append(("largest logit difference", f"{diff:.3g} ({against})" if diff is not None else
                     (report.get("check") or {}).get("skipped", "not measured")))
        files = [f for f in report.get("files", []) if isinstance(f, str)]
        sizes = [(f, (dest / f).stat().st_size) for f in files if (dest / f).is_file()]
        rows.append(("files", "; ".join(f"{f} ({_size(n)})" for f, n in sizes) +
                     (f" — {_size(sum(n for _, n in sizes))} in all" if len(sizes) > 1 else "")))
        merged = report.get("merged") or []
        if merged:
            rows.append(("merged", "; ".join(_merged_line(m) for m in merged[:6]) + (" …" if len(merged) > 6 else "")))
        table = "".join(f"<tr><td style='padding:2px 10px 2px 0;vertical-align:top;opacity:.8;white-space:nowrap'>"
                        f"{esc(k)}</td><td style='padding:2px 0;{wrap}'>{esc(str(v))}</td></tr>" for k, v in rows)
        parts.append(f"<div id='export-card' data-exact='{str(exact).lower()}' data-files='{len(files)}' "
                     f"style='border:1px solid rgba(127,127,127,.35);border-radius:8px;padding:8px 12px;margin:6px 0'>"
                     f"<table style='border-collapse:collapse;width:100%'>{table}</table>"
                     "<div id='export-usage' style='margin-top:6px'><b>Run it</b>")
        for what, code in how_to_run(report):
            parts.append(f"<div style='font-size:13px'>{esc(what)}</div><pre class='mt-command' style='padding:6px 8px;"
                         f"border-radius:6px;background:rgba(127,127,127,0.12);{wrap}'>{esc(code)}</pre>")
        parts.append("</div></div>")
    parts.append(f"<details id='export-json'><summary>Export report (JSON)</summary><pre style='{wrap};font-size:12px'>"
                 f"{esc(text)}</pre></details>")
    return "".join(parts)


def earlier_export(dest: Path) -> str:
    """What an export into `dest` would replace ('' when the folder holds no finished export)."""
    try:
        old = json.loads((dest / "export_report.json").read_text())
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime((dest / "export_report.json").stat().st_mtime))
    except (OSError, ValueError):
        return ""
    return (f"{dest.name} holds an earlier export ({old.get('format')} {old.get('dtype')}, {when}): exporting again "
            "replaces it; give another output folder to keep it.")


def format_notes(problems: dict[str, list[str]]) -> str:
    """The formats this run cannot take, each with the reason (the same words `moetune export` refuses with)."""
    bad = {f: p for f, p in problems.items() if p}
    if not bad:
        return ""
    items = "".join(f"<li><b>{html.escape(f)}</b>: {html.escape('; '.join(p))}</li>" for f, p in bad.items())
    return (f"<div id='export-unavailable' class='mt-filled' style='font-size:12px;opacity:.85;overflow-wrap:anywhere'>Not for this run "
            f"(a format that cannot hold it exactly is left out of the list):<ul style='margin:2px 0'>{items}</ul></div>")


_problem_cache: dict[tuple, dict] = {}


def run_format_problems(run_dir: Path) -> dict[str, list[str]]:
    """engine.export's reasons per format for a run (cached per run and adapter time); {} when unreadable."""
    adapter = run_dir / "adapter.safetensors"
    try:
        key = (str(run_dir), adapter.stat().st_mtime)
    except OSError:
        return {}
    if key not in _problem_cache:
        from engine.export.run import format_problems

        try:
            _problem_cache[key] = format_problems(run_dir)
        except (ValueError, OSError) as e:  # ExportError: the export itself will say it
            return {f: [] for f in FORMATS} | {"_error": [str(e)]}
    return _problem_cache[key]


def default_folder(fmt: str, dtype: str) -> str:
    """The export's folder inside the run: one per format and dtype, so an export of another dtype is kept."""
    return f"export-{fmt}-{dtype}"


def build(runner: Runner, focus: gr.State | None = None) -> dict:
    """Lay out the Export tab; returns its on-load and on-select hooks (which offer the focus run first)."""
    focus = focus if focus is not None else gr.State()
    run = gr.Dropdown(choices=run_list.choices(run_list.finished(runner)), label="Run", elem_id="export-run",
                      info="finished runs; sweep candidates are listed after their sweep")
    with gr.Row():
        fmt = make_widget("export.format", elem_id="export-format")
        dtype = make_widget("export.dtype", elem_id="export-dtype", info="f16 or bf16 (q8_0: GGUF only)")
    formats_note = gr.HTML(elem_id="export-formats-note", elem_classes=["mt-slot"])
    out = gr.Textbox(label="Output folder", info="a folder name inside the run (empty: export-FORMAT-DTYPE)",
                     elem_id="export-out")
    replace_note = gr.HTML(elem_id="export-replace-note", elem_classes=["mt-slot"])
    with gr.Row():
        go = gr.Button("Export", variant="primary", elem_id="export-start")
        # the base model alone as GGUF (the dtype above), for the run's gguf-lora adapter: RUN/export-gguf-base
        go_base = gr.Button("Export base GGUF", elem_id="export-base")
    result = gr.HTML(elem_id="export-result")

    def destination(run_dir: Path, f: str, d: str, target: str) -> Path:
        if (target or "").strip():  # one folder name inside the run
            return child_folder(run_dir, target, "Output folder")
        return run_dir / (f"export-{BASE_FORMAT}" if f == BASE_FORMAT else default_folder(f, d))

    def do_export(name, f, d, target):
        if not name:
            return "<div class='mt-msg mt-error'>Pick a finished run first.</div>"
        run_dir = runner.run_path(name)
        try:
            dest = destination(run_dir, f, d, target)
        except ValueError as e:
            return _error_html(str(e))
        replaced = earlier_export(dest)
        f, base = ("gguf", True) if f == BASE_FORMAT else (f, False)
        try:
            text = commands.export(run_dir, f, d, dest, base=base)
        except RuntimeError as e:
            return _error_html(str(e))
        return result_html(dest, text, name, replaced.replace("exporting again replaces it; give another output "
                                                              "folder to keep it.", "it was replaced.") if replaced else "")

    go.click(do_export, [run, fmt, dtype, out], [result])

    def on_choice(name, f, d, target):
        """The formats that work for the run, the dtypes its format takes, and what an export would replace."""
        if not name:
            return gr.update(), gr.update(), "", ""
        run_dir = runner.run_path(name)
        problems = run_format_problems(run_dir)
        working = [x for x in FORMATS if not problems.get(x)] or list(FORMATS)
        f = f if f in working else working[0]
        dtypes = list(FORMAT_DTYPES[f])
        d = d if d in dtypes else dtypes[0]
        try:
            note = earlier_export(destination(run_dir, f, d, target))
        except ValueError:
            note = ""
        return (gr.update(choices=working, value=f), gr.update(choices=dtypes, value=d),
                format_notes({k: v for k, v in problems.items() if k in FORMATS}),
                f"<div class='mt-msg mt-warn mt-filled'>{html.escape(note)}</div>" if note else "")

    choice = (on_choice, [run, fmt, dtype, out], [fmt, dtype, formats_note, replace_note])
    for trigger in (fmt.input, dtype.input, out.blur):
        trigger(*choice, show_progress="hidden")
    def export_base(name, d, target):
        return do_export(name, BASE_FORMAT, d, target)

    go_base.click(export_base, [run, dtype, out], [result])

    def reload_runs(current=None, wanted=None, f=None, d=None, target=""):
        runs = run_list.finished(runner)
        name = run_list.pick(runs, wanted, current)
        return (gr.update(choices=run_list.choices(runs), value=name), *on_choice(name, f, d, target))

    hook = (reload_runs, [run, focus, fmt, dtype, out], [run, fmt, dtype, formats_note, replace_note])
    run.input(lambda name, f, d, t: (*on_choice(name, f, d, t), name), [run, fmt, dtype, out],
              [fmt, dtype, formats_note, replace_note, focus])
    def light(current=None, wanted=None):  # on page load: the list only (the format check loads torch)
        runs = run_list.finished(runner)
        return gr.update(choices=run_list.choices(runs), value=run_list.pick(runs, wanted, current))

    return {"load": (light, [run, focus], [run]), "select": hook, "run": run}
