"""The Train form's parts that are not layout: the model and dataset pickers' choices (a published release not
downloaded, or a registry dataset whose file is missing, is marked with where to put it), filling the form from a config, the message boxes beside the
fields (which field's problem goes where), and Check fit's plan as a table."""

from __future__ import annotations

import html
import re

import gradio as gr

from engine.releases import published_releases

from . import controls as K
from .paths import DEMO_MODEL, DEMO_TRAIN, display_path, recent_models, registry_datasets, registry_file

#: message boxes of the form, in page order: beside the model, the dataset, the basics, each folded group, GPUs
SLOTS = ["model", "data", "basics", *K.GROUPS, "gpus"]
_LENGTH_FIELDS = ("train.epochs", "train.max_steps")


def slot_of(field: str) -> str | None:
    """The message box a problem of `field` is shown in (None: the general message under Start)."""
    if field == "model.path":
        return "model"
    if field == "data.train":
        return "data"
    if field in ("gpus", "train.expert_parallel"):
        return "gpus"
    if field in K.BASICS or field in _LENGTH_FIELDS:
        return "basics"
    return next((g for g, ids in K.GROUPS.items() if field in ids), None)


def message(text: str, kind: str = "error") -> str:
    """A coloured message box (error, warn, ok, info); '' for no text."""
    color = {"error": "#ef4444", "warn": "#f59e0b", "ok": "#22c55e", "info": "#3b82f6"}[kind]
    return (f'<div class="mt-msg mt-{kind} mt-filled" style="border-left:4px solid {color};padding:6px 10px;'
            f'white-space:pre-wrap;overflow-wrap:anywhere">{html.escape(text)}</div>') if text else ""


def model_choices(current: str | None = None) -> list[tuple[str, str]]:
    """The model picker: the demo model, recent models, then every published release `moetune models` knows
    (those not downloaded marked, with where to put them), and the current value."""
    out = [(f"Demo model ({DEMO_MODEL})", DEMO_MODEL)]
    for m in recent_models():
        shown = display_path(m)
        if shown != DEMO_MODEL and all(shown != v for _, v in out):
            out.append((shown, shown))
    for r in published_releases():
        if all(r.folder != v for _, v in out):
            where = "" if r.downloaded() else f" — not downloaded: put it at {r.folder}"
            out.append((f"{r.name} ({r.model_type}){where}", r.folder))
    if current and all(current != v for _, v in out):
        out.append((current, current))
    return out


def dataset_choices(current: str | None = None) -> list[tuple[str, str]]:
    """The dataset picker: the demo's sample set, then the registry's datasets — those whose file is not on disk
    marked with where it goes — (and the current value)."""
    out = [(f"Demo: two-digit addition ({DEMO_TRAIN})", DEMO_TRAIN)]
    for name, entry in registry_datasets().items():
        file = registry_file(entry)
        if file is not None and not file.exists():
            out.append((f"{name} — file missing: put it at {display_path(str(file))}", name))
        else:
            out.append((f"{name} — {entry.get('description', '')}"[:110], name))
    if current and all(current != v for _, v in out):
        out.append((current, current))
    return out


def form_updates(ctl: K.Controls, cfg: dict) -> list:
    """Updates of the Train form's widgets for a config, as choosing a preset makes them."""
    out = []
    for fid, v in zip(ctl.ids, ctl.values_of(cfg)):
        if fid == "model.path":
            out.append(gr.update(value=v, choices=model_choices(v)))
        elif fid == "data.train":
            out.append(gr.update(value=v, choices=dataset_choices(v)))
        else:
            out.append(v)
    return out


def slot_updates(problems, notes=()) -> tuple[list[str], str]:
    """(HTML of every slot, in SLOTS order; the general message) for preflight problems and notes."""
    boxes: dict[str, list[str]] = {s: [] for s in SLOTS}
    general = []
    for items, kind in ((problems, "error"), (notes, "warn")):
        for p in items:
            slot = slot_of(p.field)
            (boxes[slot] if slot else general).append(message(p.message, kind))
    return ["".join(boxes[s]) for s in SLOTS], "".join(general)


def plan_table(text: str, head: str) -> str:
    """`moetune plan`'s summary as HTML: its opening lines, the memory items as a two-column table that wraps in
    its column (totals and the fix never cut off), and its closing lines."""
    lines = [ln for ln in text.splitlines()]
    rows, before, after = [], [], []
    for ln in lines:
        m = re.match(r"^\s{2}(\S.*?)\s{2,}(\S.*)$", ln)
        if m and not after:
            rows.append(m.groups())
        elif rows:
            after.append(ln)
        else:
            before.append(ln)
    esc = html.escape
    table = "".join(f"<tr class='plan-row{' plan-total' if a.strip() == 'total' else ''}'>"
                    f"<td style='padding:2px 8px 2px 0'>{esc(a)}</td>"
                    f"<td style='padding:2px 0;text-align:right;white-space:normal'>{esc(b)}</td></tr>"
                    for a, b in rows)
    para = lambda ls: "".join(f"<div>{esc(x)}</div>" for x in ls if x.strip())  # noqa: E731
    return (f"<div id='plan' class='mt-plan mt-filled' style='font-size:13px;overflow-wrap:anywhere'><div><b>{esc(head)}</b></div>"
            f"{para(before)}<table style='width:100%;border-collapse:collapse;margin:4px 0'>{table}</table>"
            f"{para(after)}</div>")
