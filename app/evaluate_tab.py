"""The Evaluate tab: pick a finished run and benchmarks; `moetune eval` scores the adapter and the
base model; a results table and a bar chart compare them. Results are kept in the run folder
(`RUN/eval/app-results.json`), so they are shown again later."""

from __future__ import annotations

import html
import os
import json
import time
from pathlib import Path

import gradio as gr
import yaml

from engine.io import atomic_write_json

from . import commands, plots, run_list
from .controls import make_widget
from .paths import DATA_ROOT_ENV, DEMO_EVAL, ROOT, display_path, resolve_data, resolve_path
from .runner import Runner

RESULTS_FILE = Path("eval") / "app-results.json"
SUITES = ["commonsense", "math"]


def run_benchmarks(run_dir: Path) -> list[str]:
    """The benchmarks a run's config names (eval.benchmarks), shown relative to the project root."""
    for name in ("config.yaml", "launch.yaml"):
        try:
            cfg = yaml.safe_load((run_dir / name).read_text()) or {}
            return [display_path(b) for b in (cfg.get("eval") or {}).get("benchmarks") or []]
        except (OSError, yaml.YAMLError):
            continue
    return []


def results_html(rows: list[dict], note: str = "", run: str = "") -> str:
    """The results table (benchmark, rows, base, fine-tuned, change) and the bar chart, headed by the run's name."""
    if not rows:
        return ""
    head = "".join(f"<th style='text-align:{a};padding:4px 10px'>{h}</th>" for h, a in
                   (("benchmark", "left"), ("rows", "right"), ("base model", "right"), ("fine-tuned", "right"),
                    ("change", "right")))
    body = []
    for r in rows:
        base, tuned = r.get("base"), r["tuned"]
        delta = "" if base is None else f"{100 * (tuned - base):+.1f} pts"
        cells = [html.escape(str(r["benchmark"])), str(r.get("n") or ""),
                 "–" if base is None else f"{100 * base:.1f}%", f"<b>{100 * tuned:.1f}%</b>", delta]
        attrs = f'data-benchmark="{html.escape(str(r["benchmark"]))}" data-tuned="{tuned:.6f}"' + \
            ("" if base is None else f' data-base="{base:.6f}"')
        body.append(f"<tr class='eval-row' {attrs}>" + "".join(
            f"<td style='text-align:{'left' if i == 0 else 'right'};padding:4px 10px'>{c}</td>"
            for i, c in enumerate(cells)) + "</tr>")
    table = (f"<table id='eval-table' style='border-collapse:collapse;margin-bottom:10px'><thead><tr>{head}</tr>"
             f"</thead><tbody>{''.join(body)}</tbody></table>")
    foot = f"<div style='font-size:12px;opacity:.7'>{html.escape(note)}</div>" if note else ""
    title = (f"<div id='eval-results-run' style='font-weight:600;margin-bottom:4px'>Results of "
             f"{html.escape(run_list.label(run))}</div>") if run else ""
    return f"<div id='eval-results' data-run='{html.escape(run)}'>{title}{table}{plots.eval_chart(rows)}{foot}</div>"


def saved_results(run_dir: Path) -> tuple[list[dict], str]:
    """The last results the app computed for a run, and a note saying when and how."""
    try:
        saved = json.loads((run_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return [], ""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(saved.get("time", 0)))
    limit = saved.get("limit")
    return saved.get("rows", []), f"evaluated {when}" + (f", first {limit} rows of each" if limit else "")


def data_root_info(root: Path) -> str:
    """What the benchmark folder field says: where benchmark names are looked up, and whether that folder exists."""
    where = ("LLM-Adapters' dataset/ folder (boolq/test.json, gsm8k/test.json, …): where benchmark names are looked "
             "up; files are read from their own path")
    if root.is_dir():
        return where
    return (f"{where}. {display_path(str(root))} does not exist yet: put LLM-Adapters' dataset/ folder there (or give "
            f"another folder) to score benchmarks by name; test files such as {DEMO_EVAL} work without it")


def build(runner: Runner, focus: gr.State | None = None) -> dict:
    """Lay out the Evaluate tab; returns its on-load and on-select hooks (which offer the focus run first)."""
    focus = focus if focus is not None else gr.State()
    with gr.Row(equal_height=True):
        run = gr.Dropdown(choices=run_list.choices(run_list.finished(runner)), label="Run", elem_id="eval-run",
                          scale=2, info="finished runs (with an adapter); sweep candidates are listed after their sweep")
        refresh = gr.Button("↻", elem_id="eval-refresh", scale=0, min_width=40)
    with gr.Row(equal_height=True):
        benches = gr.Dropdown(choices=[DEMO_EVAL] + SUITES, value=[], multiselect=True, allow_custom_value=True,
                              label="Benchmarks", elem_id="eval-benches", scale=3,
                              info="benchmark names (boolq, gsm8k, …), suites (commonsense, math) or test files")
        limit = make_widget("eval.limit", label="Rows per benchmark", info="empty: every row", elem_id="eval-limit",
                            scale=1)
        with_base = gr.Checkbox(value=True, label="compare with the base model", elem_id="eval-with-base", scale=1)
    root0 = os.environ.get(DATA_ROOT_ENV, str(ROOT / "dataset"))
    data_root = gr.Textbox(value=root0, label="Benchmark data folder", elem_id="eval-data-root",
                           info=data_root_info(Path(resolve_path(root0))))
    go = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
    status = gr.HTML(elem_id="eval-status")
    results = gr.HTML(elem_id="eval-results-box")

    def choose(name):
        if not name:
            return gr.update(), ""
        run_dir = runner.run_path(name)
        named = run_benchmarks(run_dir)
        rows, note = saved_results(run_dir)
        return gr.update(value=named, choices=list(dict.fromkeys(named + [DEMO_EVAL] + SUITES))), \
            results_html(rows, note, name)

    run.input(lambda name: (*choose(name), name), [run], [benches, results, focus])

    def reload_runs(current=None, wanted=None):
        """The finished runs; the focus run first, else the chosen one, else the newest; its benchmarks and results."""
        runs = run_list.finished(runner)
        name = run_list.pick(runs, wanted, current)
        return (gr.update(choices=run_list.choices(runs), value=name), *choose(name))

    refresh.click(reload_runs, [run, focus], [run, benches, results])

    def evaluate(name, specs, lim, base, root):
        if not name:
            yield "<div class='mt-msg mt-error'>Pick a finished run first.</div>", gr.update()
            return
        if not specs:
            yield "<div class='mt-msg mt-error'>Pick at least one benchmark.</div>", gr.update()
            return
        run_dir = runner.run_path(name)
        try:
            lim = int(lim) if str(lim or "").strip() else None
        except ValueError:
            yield "<div class='mt-msg mt-error'>Rows per benchmark must be a whole number (or empty).</div>", \
                gr.update()
            return
        yield (f"<div class='mt-msg mt-info'>Evaluating {html.escape(run_list.label(name))} on {len(specs)} benchmark(s)"
               f"{' with the base model beside it' if base else ''}…</div>"), gr.update()
        t0 = time.time()
        try:
            rows = commands.evaluate_both(run_dir, [resolve_data(s) for s in specs], lim, bool(base),
                                          resolve_path(root) if (root or "").strip() else None)
        except RuntimeError as e:
            yield f"<div class='mt-msg mt-error' style='color:#ef4444;white-space:pre-wrap'>{html.escape(str(e))}</div>", \
                gr.update()
            return
        atomic_write_json(run_dir / RESULTS_FILE, {"time": time.time(), "limit": lim, "rows": rows,
                                                   "benchmarks": specs})
        rows_, note = saved_results(run_dir)
        yield (f"<div class='mt-msg mt-ok' id='eval-done'>Evaluated {html.escape(run_list.label(name))} in "
               f"{time.time() - t0:.0f}s.</div>", results_html(rows_, note, name))

    go.click(evaluate, [run, benches, limit, with_base, data_root], [status, results])

    hook = (reload_runs, [run, focus], [run, benches, results])
    return {"load": hook, "select": hook, "run": run}
