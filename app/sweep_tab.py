"""The Sweep tab: which routing fits the task. It starts `moetune sweep` on the Train tab's current
settings as a subprocess (its own session, like a training: closing the app does not stop it), follows
`SWEEP/sweep.json`, and shows the table and a bar chart; *Use the winner* fills the Train form with the
winning candidate (its overrides, rank and alpha), the way a preset fills it.

    SWEEP/sweep.yaml    the Train settings the sweep started from (paths made absolute)
    SWEEP/app.json      pid, command and start time of the sweep process
    SWEEP/sweep.log     its output
    SWEEP/sweep.json    what `moetune sweep` writes: candidates, ranks, results, table, winner
    SWEEP/<candidate>/  one ordinary run folder per candidate
"""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import gradio as gr
import yaml

from engine import config as C
from engine.io import atomic_write_text
from engine.runs import moetune_command
from engine.sweep import MEASURES, SWEEP_FILE, check_measure, expand, lr_grid as engine_lr_grid
from engine.sweep_results import format_count, format_lr, format_stat, grid_line, notes_of, winner_overrides

from . import controls as K, plots
from .paths import ROOT, child_folder, display_path, is_folder_name, resolve_config_paths, runs_dir
from .runner import _log_tail, pid_alive, read_app_meta, spawn_logged
from .run_list import label
from .train_form import form_updates, message as _message

BASE_FILE, LOG_FILE = "sweep.yaml", "sweep.log"
#: the paper's comparison: attention LoRA (standard PEFT) against the four routings, LoRA experts throughout
DEFAULT_CANDIDATES = """attention-lora: routing.strategy=none routing.attention_lora=true adapter.placement=parallel
shared: routing.strategy=shared adapter.placement=parallel
dense: routing.strategy=dense adapter.placement=parallel
routed: routing.strategy=routed adapter.placement=parallel
embedded-parallel: routing.strategy=embedded adapter.placement=parallel
embedded-inside: routing.strategy=embedded adapter.placement=inside"""


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]


def sweep_args(candidates: str, tries: str, seeds: str, params, max_steps, lr_grid: str = "",
               match: str = "trainable") -> list[str]:
    """The `moetune sweep` options of the tab's fields; raises ConfigError naming the field and the fix."""
    listed, tried = _lines(candidates), _lines(tries)
    grid = engine_lr_grid(tried, (lr_grid or "").strip() or None)
    check_measure(match)
    seed_list = [s.strip() for s in (seeds or "").split(",") if s.strip()]
    if not all(s.isdigit() for s in seed_list):
        raise C.ConfigError(f"seeds: {seeds!r} must be numbers separated by commas, e.g. 0,1,2.")
    cands = expand(tried, listed, [int(s) for s in seed_list] if len(seed_list) > 1 else None)
    if len(cands) < 2 and not tried:
        raise C.ConfigError("candidates: give at least two (one a line), or values to try.")
    args = [a for c in listed for a in ("--candidate", c)] + [a for t in tried for a in ("--try", t)]
    if len(seed_list) > 1:
        args += ["--seeds", ",".join(seed_list)]
    elif seed_list:
        args += ["--set", f"train.seed={seed_list[0]}"]
    for name, value in (("params", params), ("max-steps", max_steps)):
        if value not in (None, ""):
            if float(value) < 1 or not float(value).is_integer():
                raise C.ConfigError(f"{name}: {value!r} must be a whole number of at least 1 (or empty).")
            args += [f"--{name}", str(int(float(value)))]
    if grid and (lr_grid or "").strip():
        args += ["--lr-grid", ",".join(grid)]
    if match != "trainable":
        args += ["--match", match]
    return args


class Sweeps:
    """Starts, stops and follows sweeps under the runs folder (a sweep is a folder with sweep.yaml)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else runs_dir()
        self._procs: dict[Path, subprocess.Popen] = {}

    def path(self, name: str) -> Path:
        """The folder of a sweep name: one folder name under the runs folder (ValueError for anything else)."""
        return child_folder(self.root, name, "sweep name")

    def list(self) -> list[str]:
        """Sweep names, newest first (started here, or by `moetune sweep --out` into the runs folder)."""
        found = [(p.stat().st_mtime, p.name) for p in (self.root.iterdir() if self.root.is_dir() else [])
                 if is_folder_name(p.name) and ((p / BASE_FILE).is_file() or (p / SWEEP_FILE).is_file())]
        return [n for _, n in sorted(found, reverse=True)]

    def alive(self, path: Path) -> bool:
        """Whether the sweep's process runs."""
        proc = self._procs.get(path)
        if proc is not None and proc.poll() is None:
            return True
        return pid_alive(read_app_meta(path).get("pid"))

    def _spawn(self, path: Path, cmd: list[str]) -> None:
        if self.alive(path):
            raise RuntimeError(f"sweep {path.name} is running already; stop it first.")
        self._procs[path] = spawn_logged(path, cmd, LOG_FILE)

    def start(self, config: dict, name: str, args: list[str]) -> str:
        """Write the base config into a new sweep folder and start `moetune sweep` on it."""
        path = self.path(name)
        if path.exists() and any(path.iterdir()):
            raise RuntimeError(f"sweep folder {path} already exists; choose another name.")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / BASE_FILE, yaml.safe_dump(config, sort_keys=False))
        self._spawn(path, moetune_command() + ["sweep", str(path / BASE_FILE), "--out", str(path), *args])
        return name

    def rerun(self, name: str) -> None:
        """Start the sweep's command again: finished candidates are skipped, a stopped one resumes."""
        path = self.path(name)
        cmd = read_app_meta(path).get("command")
        if not cmd:
            raise RuntimeError(f"sweep {name} was not started from the app; rerun its command in a terminal.")
        self._spawn(path, cmd)

    def stop(self, name: str) -> bool:
        """SIGTERM to the sweep (it passes it to the running training, which saves a checkpoint)."""
        path = self.path(name)
        if not self.alive(path):
            return False
        os.kill(int(read_app_meta(path)["pid"]), signal.SIGTERM)
        return True

    def result(self, name: str) -> dict | None:
        """The sweep's sweep.json (None before it is written)."""
        try:
            return json.loads((self.path(name) / SWEEP_FILE).read_text())
        except (OSError, ValueError):
            return None

    def status(self, name: str) -> tuple[str, str]:
        """(status, error text): running, done, stopped, incomplete, error (with the log's tail)."""
        path, result = self.path(name), self.result(name)
        if self.alive(path):
            return "running", ""
        if result and result.get("status") in ("done", "stopped", "incomplete"):
            return result["status"], ""
        tail = _log_tail(path / LOG_FILE, 8)
        errors = [ln for ln in tail.splitlines() if "error" in ln.lower()]
        return ("error", errors[-1] if errors else tail) if tail else ("empty", "")


def winner_config(sweeps: Sweeps, name: str) -> dict:
    """The winner's complete config: the sweep's base with the winner's overrides; raises RuntimeError."""
    result = sweeps.result(name)
    items = winner_overrides(result or {})
    if not items:
        raise RuntimeError(f"sweep {name} has no finished candidate yet.")
    if (sweeps.path(name) / BASE_FILE).is_file():
        base = yaml.safe_load((sweeps.path(name) / BASE_FILE).read_text()) or {}
    else:  # started on the command line: the config it ran (--set included), with its file's steps, not --max-steps
        base = {k: dict(v) if isinstance(v, dict) else v for k, v in result["base"].items()}
        source = Path(result.get("config") or "")
        source = source if source.is_absolute() else ROOT / source
        if source.is_file():
            own = C.load(source).to_dict()["train"]
            base["train"].update(max_steps=own["max_steps"], epochs=own["epochs"])
    cfg = C.from_dict(C.apply_overrides(base, items)).to_dict()
    for fid in ("model.path", "data.train", "data.eval"):  # shown as the Train tab shows them
        if K.get(cfg, fid):
            K.put(cfg, fid, display_path(K.get(cfg, fid)))
    return cfg


# ---- the view --------------------------------------------------------------------------------

def table_html(result: dict | None) -> str:
    """The sweep's table: candidate, rank, trainable params and %, activated params per token, lr (with the lr grid's
    held-out losses under the candidate), held-out loss, accuracy, tokens/s, memory."""
    if not result or not result.get("table"):
        return ""
    heads = ("candidate", "rank", "trainable", "%", "activated / token", "lr", "held-out loss", "accuracy", "tokens/s",
             "peak GB", "runs")
    best = (result.get("winner") or {}).get("candidate")
    body = []

    def _pm(s: dict | None, scale: float = 1.0, digits: int = 4) -> str:
        return format_stat(s, scale, digits, missing="–")

    for r in result["table"]:
        cells = [html.escape(r["candidate"]) + (" 🏆" if r["candidate"] == best else ""), str(r["rank"]),
                 f"{r['trainable']:,}", f"{r['percent']:.2f}%", format_count(r.get("activated")), format_lr(r),
                 _pm(r["eval_loss"]), _pct(_pm(r["accuracy"], 100, 1)),
                 _pm(r["tokens_per_s"], 1, 0), _pm(r["memory_gb"], 1, 2), f"{r['done']}/{r['runs']}"]
        notes = notes_of(r)
        note = "".join(f"<div class='sweep-note' style='font-size:11px;color:"
                       f"{'#ef4444' if n.startswith('not matched') else '#b45309'}'>{html.escape(n)}</div>" for n in notes)
        if r.get("grid"):
            note += (f"<div class='sweep-grid' style='font-size:11px;opacity:.75'>lr grid, held-out loss: "
                     f"{html.escape(grid_line(r))}</div>")
        acc = r["accuracy"]["mean"] if r["accuracy"] else ""
        body.append(f"<tr class='sweep-row' data-candidate='{html.escape(r['candidate'])}' data-accuracy='{acc}'>" +
                    "".join(f"<td style='padding:3px 8px;text-align:{'left' if i == 0 else 'right'}'>{c}"
                            f"{note if i == 0 else ''}</td>" for i, c in enumerate(cells)) + "</tr>")
    head = "".join(f"<th style='padding:3px 8px;text-align:{'left' if i == 0 else 'right'}'>{h}</th>"
                   for i, h in enumerate(heads))
    return (f"<table id='sweep-table' style='border-collapse:collapse'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
            f"<div style='font-size:12px;opacity:.7'>target {result['target_params']:,} "
            f"{result.get('match', 'trainable')} parameters (± {100 * result['tolerance']:.0f} %); mean ± std over "
            "seeds; activated = the adapter parameters one token's forward uses</div>")


def _pct(text: str) -> str:
    """An accuracy cell with its unit: `90.7 ± 2.1 %` (– stays –)."""
    return text if text.strip() in ("–", "") else f"{text} %"


def chart_html(result: dict | None, width: int = 640) -> str:
    """Bars of each candidate's mean accuracy (held-out loss when no benchmark was scored), with its spread."""
    rows = [r for r in (result or {}).get("table", []) if r["done"]]
    if not rows:
        return ""
    key = "accuracy" if any(r["accuracy"] for r in rows) else "eval_loss"
    rows = [r for r in rows if r[key]]
    top = max(r[key]["max"] for r in rows) or 1.0
    left, bar_h, gap = 150, 18, 8
    scale = (width - left - 90) / top
    parts = [f'<svg id="sweep-chart" data-metric="{key}" viewBox="0 0 {width} {len(rows) * (bar_h + gap) + 24}" '
             f'width="100%" style="max-width:{width}px;font-family:sans-serif" xmlns="http://www.w3.org/2000/svg">'
             f'<text x="{left}" y="12" font-size="12" fill="currentColor">'
             f'{"accuracy (mean, min–max over seeds)" if key == "accuracy" else "held-out loss (lower is better)"}</text>']
    for i, r in enumerate(rows):
        y, s = 20 + i * (bar_h + gap), r[key]
        label = f"{100 * s['mean']:.1f}%" if key == "accuracy" else f"{s['mean']:.4f}"
        parts.append(f'<text x="{left - 8}" y="{y + bar_h - 5}" font-size="12" fill="currentColor" text-anchor="end">'
                     f'{html.escape(r["candidate"][:22])}</text>'
                     f'<rect class="sweep-bar" x="{left}" y="{y}" width="{max(1.0, s["mean"] * scale):.1f}" '
                     f'height="{bar_h}" fill="{plots.TUNED_COLOR}" data-value="{s["mean"]:.6f}"/>'
                     f'<line x1="{left + s["min"] * scale:.1f}" x2="{left + s["max"] * scale:.1f}" y1="{y + bar_h / 2}" '
                     f'y2="{y + bar_h / 2}" stroke="currentColor" stroke-width="2"/>'
                     f'<text x="{left + s["max"] * scale + 6:.1f}" y="{y + bar_h - 5}" font-size="11" '
                     f'fill="currentColor">{label}</text>')
    return "".join(parts) + "</svg>"


def progress_html(result: dict | None, status: str) -> str:
    """Candidates finished out of all, and the step of the one training now."""
    entries = (result or {}).get("entries", [])
    done = sum(e.get("result", {}).get("status") == "done" for e in entries)
    now = next((e for e in entries if e.get("result", {}).get("status") == "running"), None) if status == "running" else None
    text = f"{status} · {done} / {len(entries) or '?'} candidates"
    if now:
        r = now["result"]
        text += f" · now {now['name']}: step {r['step']} / {r.get('total_steps') or '?'}"
    frac = done / len(entries) if entries else 0.0
    color = {"error": "#ef4444", "stopped": "#eab308", "incomplete": "#eab308", "done": "#22c55e"}.get(status, plots.LOSS_COLOR)
    return (f'<div id="sweep-progress" data-done="{done}" data-total="{len(entries)}" data-status="{status}">'
            f'<div style="background:rgba(127,127,127,.18);border-radius:6px;height:14px;overflow:hidden">'
            f'<div style="width:{100 * frac:.1f}%;height:100%;background:{color}"></div></div>'
            f'<div style="margin-top:4px;font-size:13px">{html.escape(text)}</div></div>')


def build(ctl: K.Controls, base_state, tabs=None, sweeps: Sweeps | None = None, train: dict | None = None) -> dict:
    """Lay out the Sweep tab; `base_state` is the Train tab's preset config (the State its form builds on); `train`
    the Train tab's parts (its message and preset description), where *Use the winner* says what it changed."""
    sweeps = sweeps or Sweeps()
    gr.Markdown("Short trainings of each candidate on the **Train tab's current settings**, each at matched "
                "trainable (or activated) parameters (its rank is chosen within 10 % of the target) and, with a "
                "learning-rate grid, at its own best lr, scored on the held-out data (`data.eval`) and the benchmarks "
                "(`eval.benchmarks`). Every run is an ordinary run folder.")
    with gr.Row():
        candidates = gr.Textbox(DEFAULT_CANDIDATES, lines=6, label="Candidates", scale=3, elem_id="sweep-candidates",
                                info="one a line: [NAME:] section.key=value section.key=value")
        tries = gr.Textbox("", lines=6, label="Try (cross product)", scale=2, elem_id="sweep-tries",
                           info="one field a line: section.key=V1,V2,... (crossed with every candidate)")
    with gr.Row():
        seeds = gr.Textbox("0", label="Seeds", info="e.g. 0,1,2: each candidate once per seed", elem_id="sweep-seeds")
        params = gr.Textbox("", label="Trainable parameters", elem_id="sweep-params",
                            info="the target count (empty: the Train settings' own count)")
        max_steps = gr.Number(50, precision=0, label="Steps per candidate", elem_id="sweep-max-steps")
        name = gr.Textbox(label="Sweep name", info=f"a folder under {runs_dir()}", elem_id="sweep-name")
    with gr.Row():
        lr_grid = gr.Textbox("", label="Learning-rate grid", elem_id="sweep-lr-grid",
                             info="e.g. 1e-4,3e-4,1e-3: each candidate trains once per lr, its seeds at the lr with "
                                  "the lowest held-out loss (needs held-out data); empty: the Train lr for all")
        match = gr.Dropdown(list(MEASURES), value="trainable", label="Match ranks by", elem_id="sweep-match",
                            info="trainable parameters, or activated adapter parameters per token (those one "
                                 "token's forward uses)")
    with gr.Row():
        start = gr.Button("Start sweep", variant="primary", elem_id="sweep-start")
        stop = gr.Button("Stop", variant="stop", elem_id="sweep-stop")
        rerun = gr.Button("Continue", elem_id="sweep-rerun")
        use = gr.Button("Use the winner in Train", elem_id="sweep-use-winner")
    message = gr.HTML(elem_id="sweep-message")
    pick = gr.Dropdown(choices=sweeps.list(), value=None, label="Sweep shown", elem_id="sweep-shown")
    progress = gr.HTML(elem_id="sweep-progress-box")
    table = gr.HTML(elem_id="sweep-results")
    chart = gr.HTML(elem_id="sweep-chart-box")
    timer = gr.Timer(2.0)

    def on_start(base, sweep_name, cand, tri, seed, target, steps, grid, measure, *values):
        try:
            data = resolve_config_paths(K.config_dict(ctl.to_dict(base, list(values))))
            args = sweep_args(cand, tri, seed, target.strip() if isinstance(target, str) else target, steps, grid,
                              measure or "trainable")
            sweep_name = (sweep_name or "").strip() or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
            sweeps.start(data, sweep_name, args)  # refuses a name that is not one folder name
        except (C.ConfigError, RuntimeError, OSError, ValueError) as e:
            return gr.update(), _message(str(e))
        return gr.update(choices=sweeps.list(), value=sweep_name), _message(f"started {sweep_name}", "ok")

    start.click(on_start, [base_state, name, candidates, tries, seeds, params, max_steps, lr_grid, match]
                + ctl.components,
                [pick, message])

    def on_stop(sweep_name):
        if not sweep_name:
            return _message("no sweep is shown", "info")
        return _message(f"stopping {sweep_name}: the running training saves a checkpoint", "info") \
            if sweeps.stop(sweep_name) else _message(f"{sweep_name} is not running", "info")

    stop.click(on_stop, [pick], [message])

    def on_rerun(sweep_name):
        try:
            sweeps.rerun(sweep_name)
        except (RuntimeError, OSError, TypeError) as e:
            return _message(str(e) if sweep_name else "no sweep is shown")
        return _message(f"continuing {sweep_name}: finished candidates are skipped", "ok")

    rerun.click(on_rerun, [pick], [message])

    extra = [train["message"], train["preset_desc"]] if train else []

    def on_use(sweep_name, base, *values):
        try:
            cfg = winner_config(sweeps, sweep_name) if sweep_name else None
            if cfg is None:
                raise RuntimeError("no sweep is shown")
        except (RuntimeError, OSError, C.ConfigError) as e:
            return [_message(str(e))] + [gr.update() for _ in extra + ctl.ids] + \
                ([gr.update()] if tabs is not None else [])
        best = sweeps.result(sweep_name)["winner"]
        try:  # what the winner changes in the form as it is now
            now = K.config_dict(ctl.to_dict(base, list(values)))
            changed = [c for c in K.overrides(now, K.config_dict(ctl.to_dict(cfg, ctl.values_of(cfg))))
                       if not c.startswith(("title=", "description="))]
        except ValueError:
            changed = []
        what = ", ".join(changed) if changed else "nothing (the form held it already)"
        text = (f"the Train form now holds sweep {sweep_name}'s winner {best['candidate']} (rank {best['rank']}, alpha "
                f"{best['alpha']:g}); changed: {what}. Set its steps or epochs for the full training.")
        desc = (f"Filled from sweep **{label(sweep_name)}**'s winner **{best['candidate']}**; the preset's description "
                "no longer applies.")
        return [_message(text, "ok")] + ([_message(text, "ok"), desc] if train else []) + form_updates(ctl, cfg) + \
            ([gr.Tabs(selected="train")] if tabs is not None else [])

    use.click(on_use, [pick, base_state] + ctl.components,
              [message] + extra + ctl.components + ([tabs] if tabs is not None else []))

    def refresh(sweep_name):
        if not sweep_name:
            return "", "", ""
        status, error = sweeps.status(sweep_name)
        result = sweeps.result(sweep_name)
        err = _message(f"{status}: {error}") if error else ""
        return progress_html(result, status) + err, table_html(result), chart_html(result)

    timer.tick(refresh, [pick], [progress, table, chart], show_progress="hidden")
    pick.change(refresh, [pick], [progress, table, chart], show_progress="hidden")
    pick.focus(lambda v: gr.update(choices=sweeps.list(), value=v), [pick], [pick], show_progress="hidden")

    def on_load():
        names = sweeps.list()
        return gr.update(choices=names, value=names[0] if names else None)

    return {"load": (on_load, [], [pick])}
