"""The Runs tab, the runs manager: one table of every run (sweep candidates under their sweep) with its status,
date, steps, final loss, eval score and strategy; open a run in Evaluate / Chat / Export, compare two, delete one
(after asking), or fill the Train form from a run's config."""

from __future__ import annotations

import html

import gradio as gr

from . import controls as K, run_list
from .paths import display_path
from .runner import Runner
from .train_form import form_updates, message

COLUMNS = ("run", "status", "started", "steps", "final loss", "eval score", "strategy")
_STATUS_COLOR = {"done": "#22c55e", "error": "#ef4444", "crashed": "#ef4444", "stopped": "#eab308",
                 "running": "#f97316", "starting": "#f97316", "stopping": "#eab308"}


def table_html(rows: list[run_list.RunRow]) -> str:
    """The runs table (one row a run, candidates indented under their sweep)."""
    if not rows:
        return "<div id='runs-table' data-runs='0' style='opacity:.7'>No runs yet: start one on the Train tab.</div>"
    head = "".join(f"<th style='text-align:left;padding:4px 8px'>{h}</th>" for h in COLUMNS)
    body, sweep = [], None
    for r in rows:
        if "/" in r.name and r.name.split("/")[0] != sweep:
            sweep = r.name.split("/")[0]
            body.append(f"<tr><td colspan='{len(COLUMNS)}' style='padding:6px 8px 2px;font-weight:600'>"
                        f"sweep {html.escape(sweep)}</td></tr>")
        shown = ("&nbsp;&nbsp;↳ " + html.escape(r.name.split("/", 1)[1])) if "/" in r.name else html.escape(r.name)
        loss = f"{r.final_loss:.4f}" if isinstance(r.final_loss, (int, float)) else "–"
        steps = f"{r.step} / {r.total_steps}" if r.total_steps else (str(r.step) if r.step else "–")
        color = _STATUS_COLOR.get(r.status, "inherit")
        cells = [shown, f"<span style='color:{color}'>{html.escape(r.status)}</span>", r.date, steps, loss,
                 html.escape(r.score), html.escape(r.strategy)]
        body.append(f"<tr class='runs-row' data-run='{html.escape(r.name)}' data-status='{html.escape(r.status)}' "
                    f"style='border-top:1px solid rgba(127,127,127,.25)'>"
                    + "".join(f"<td style='padding:4px 8px;overflow-wrap:anywhere'>{c}</td>" for c in cells) + "</tr>")
    return (f"<div style='overflow-x:auto'><table id='runs-table' data-runs='{len(rows)}' "
            f"style='border-collapse:collapse;width:100%;font-size:13px'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def compare_html(runner: Runner, a: str, b: str) -> str:
    """Two runs side by side: their facts, then every config value that differs."""
    rows = {r.name: r for r in run_list.rows(runner) if r.name in (a, b)}
    if a not in rows or b not in rows:
        return message("pick two runs to compare", "info")
    ra, rb = rows[a], rows[b]
    facts = [("status", ra.status, rb.status), ("steps", ra.step, rb.step),
             ("final loss", ra.final_loss, rb.final_loss), ("eval score", ra.score, rb.score),
             ("strategy", ra.strategy, rb.strategy)]
    ca, cb = run_list.run_config(runner.run_path(a)), run_list.run_config(runner.run_path(b))
    for section in dict.fromkeys([*ca, *cb]):
        sa, sb = ca.get(section), cb.get(section)
        if isinstance(sa, dict) or isinstance(sb, dict):
            sa, sb = sa or {}, sb or {}
            for key in dict.fromkeys([*sa, *sb]):
                if sa.get(key) != sb.get(key) and section not in ("title", "description"):
                    facts.append((f"{section}.{key}", sa.get(key, "–"), sb.get(key, "–")))
    esc = lambda v: html.escape("–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    body = "".join(f"<tr style='border-top:1px solid rgba(127,127,127,.25)'><td style='padding:3px 8px'>{esc(k)}</td>"
                   f"<td style='padding:3px 8px;overflow-wrap:anywhere'>{esc(x)}</td>"
                   f"<td style='padding:3px 8px;overflow-wrap:anywhere'>{esc(y)}</td></tr>" for k, x, y in facts)
    return (f"<table id='runs-comparison' class='mt-filled' style='border-collapse:collapse;width:100%;font-size:13px'><thead><tr>"
            f"<th></th><th style='text-align:left;padding:3px 8px'>{esc(run_list.label(a))}</th>"
            f"<th style='text-align:left;padding:3px 8px'>{esc(run_list.label(b))}</th></tr></thead>"
            f"<tbody>{body}</tbody></table>")


def build(runner: Runner, ctl: K.Controls, tabs, focus, train: dict, opens: dict[str, tuple]) -> dict:
    """Lay out the Runs tab. `opens` maps a tab id (evaluate, chat, export) to that tab's select hook, whose
    function takes (current, wanted, *rest): opening a run there fills that tab as selecting it would."""
    with gr.Row(equal_height=True):
        pick = gr.Dropdown(label="Run", elem_id="runs-pick", scale=3, info="the run the buttons act on")
        refresh = gr.Button("↻", elem_id="runs-refresh", scale=0, min_width=40)
    with gr.Row():
        open_btns = {t: gr.Button(f"Open in {t.capitalize()}", elem_id=f"runs-open-{t}", size="sm") for t in opens}
        fill = gr.Button("Fill the Train form from its config", elem_id="runs-fill", size="sm")
        delete = gr.Button("Delete…", variant="stop", elem_id="runs-delete", size="sm")
    with gr.Row(visible=False, elem_id="runs-confirm") as confirm:
        confirm_text = gr.HTML()
        yes = gr.Button("Yes, delete it", variant="stop", elem_id="runs-delete-yes", size="sm", scale=0)
        no = gr.Button("Cancel", elem_id="runs-delete-no", size="sm", scale=0)
    msg = gr.HTML(elem_id="runs-message", elem_classes=["mt-slot"])
    table = gr.HTML(elem_id="runs-table-box")
    with gr.Row(equal_height=True):
        other = gr.Dropdown(label="Compare with", elem_id="runs-compare-with", scale=3)
        compare = gr.Button("Compare", elem_id="runs-compare", scale=0)
    comparison = gr.HTML(elem_id="runs-comparison-box", elem_classes=["mt-slot"])

    def reload(current=None, wanted=None, second=None):
        names = run_list.all_runs(runner)
        name = run_list.pick(names, wanted, current)
        rest = [n for n in names if n != name]
        return (gr.update(choices=run_list.choices(names), value=name), table_html(run_list.rows(runner)),
                gr.update(choices=run_list.choices(rest), value=second if second in rest else (rest[0] if rest else None)))

    hook = (reload, [pick, focus, other], [pick, table, other])
    refresh.click(*hook)
    pick.input(lambda name: name, [pick], [focus], show_progress="hidden")
    compare.click(lambda a, b: compare_html(runner, a, b), [pick, other], [comparison])

    for tab_id, (fn, inputs, outputs) in opens.items():
        def open_in(name, *rest, _fn=fn, _tab=tab_id):
            if not name:
                return [gr.update(), gr.update(), message("pick a run first")] + [gr.update()] * len(outputs)
            if not (runner.run_path(name) / "adapter.safetensors").is_file():
                return [gr.update(), gr.update(), message(f"{run_list.label(name)} has no adapter yet (not finished); "
                                                          f"{_tab.capitalize()} takes finished runs.")] + \
                    [gr.update()] * len(outputs)
            return [gr.Tabs(selected=_tab), name, ""] + list(_fn(None, name, *rest))

        open_btns[tab_id].click(open_in, [pick] + inputs[2:], [tabs, focus, msg] + outputs)

    def on_fill(name):
        cfg = run_list.run_config(runner.run_path(name)) if name else {}
        try:
            cfg = K.config_dict(cfg)
        except ValueError as e:
            cfg = {}
            err = str(e)
        else:
            err = ""
        if not cfg:
            return [gr.update()] * 5 + [message(err or "pick a run with a config first")] + [gr.update()] * len(ctl.ids)
        for fid in ("model.path", "data.train", "data.eval"):
            if K.get(cfg, fid):
                K.put(cfg, fid, display_path(K.get(cfg, fid)))
        note = (f"The form holds the config of run **{run_list.label(name)}** (no preset: the YAML below is the "
                "whole config). Give the new run a name and press Start.")
        return ([gr.Tabs(selected="train"), gr.update(value=None), cfg, note,
                 message(f"filled the form from run {run_list.label(name)}'s config", "ok"), ""]
                + form_updates(ctl, cfg))

    fill.click(on_fill, [pick], [tabs, train["preset"], train["preset_base"], train["preset_desc"], train["message"],
                                 msg] + ctl.components)

    def ask(name):
        if not name:
            return gr.update(visible=False), "", message("pick a run first")
        if runner.state(name).running:
            return gr.update(visible=False), "", message(f"{name} is training; stop it before deleting it.")
        return (gr.update(visible=True), f"<b>Delete {html.escape(run_list.label(name))}</b> and every file in it "
                f"(checkpoints, adapter, exports)? This cannot be undone.", "")

    delete.click(ask, [pick], [confirm, confirm_text, msg])
    no.click(lambda: (gr.update(visible=False), ""), None, [confirm, msg])

    def do_delete(name, second):
        try:
            runner.delete(name)
        except (RuntimeError, ValueError, OSError) as e:
            return (gr.update(visible=False), message(str(e)), *reload(None, None, second))
        return (gr.update(visible=False), message(f"deleted {run_list.label(name)}", "ok"), *reload(None, None, second))

    yes.click(do_delete, [pick, other], [confirm, msg, pick, table, other])
    return {"load": hook, "select": hook}
