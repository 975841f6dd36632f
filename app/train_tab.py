"""The Train tab: preset, model, dataset, routing and hyperparameters, GPU budget with Check fit,
the equivalent command and YAML, Start / Stop / Resume, and the live view of a run."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import gradio as gr
import yaml

from engine import config as C

from . import commands, controls as K, plots
from .paths import DEMO_MODEL, DEMO_TRAIN, display_path, recent_models, registry_datasets, remember_model, \
    resolve_config_paths, runs_dir
from .presets import DEMO, list_presets, load_preset
from .runner import Runner, RunState

UPLOAD_TYPES = [".json", ".jsonl", ".csv", ".parquet"]


def model_choices(current: str | None = None) -> list[tuple[str, str]]:
    """The model picker: the demo model, then recent models (and the current value)."""
    out = [(f"Demo model ({DEMO_MODEL})", DEMO_MODEL)]
    for m in recent_models():
        shown = display_path(m)
        if shown != DEMO_MODEL and all(shown != v for _, v in out):
            out.append((shown, shown))
    if current and all(current != v for _, v in out):
        out.append((current, current))
    return out


def dataset_choices(current: str | None = None) -> list[tuple[str, str]]:
    """The dataset picker: the demo's sample set, then the registry's datasets (and the current value)."""
    out = [(f"Demo: two-digit addition ({DEMO_TRAIN})", DEMO_TRAIN)]
    for name, entry in registry_datasets().items():
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


def _message(text: str, kind: str = "error") -> str:
    color = {"error": "#ef4444", "warn": "#f59e0b", "ok": "#22c55e", "info": "#3b82f6"}[kind]
    return (f'<div class="mt-msg mt-{kind}" style="border-left:4px solid {color};padding:6px 10px;'
            f'white-space:pre-wrap">{html.escape(text)}</div>') if text else ""


def status_markdown(s: RunState) -> str:
    """One line of run facts under the progress bar."""
    if s.status == "empty":
        return ""
    bits = [f"**{s.name}**"]
    if s.loss is not None:
        bits.append(f"loss **{s.loss:.4f}**")
    if s.lr is not None:
        bits.append(f"lr {s.lr:.2e}")
    if s.tokens_per_s is not None:
        bits.append(f"**{s.tokens_per_s:,.0f}** tokens/s")
    if s.memory_gb is not None:
        bits.append(f"memory {s.memory_gb:.2f} GB" + (" (CPU RSS)" if s.device == "cpu" else ""))
    if s.offload:
        o = s.offload
        bits.append(f"experts over PCIe {o.get('bytes_moved', 0) / 1e6:,.1f} MB/step "
                    f"({o.get('hits', 0)} hits, {o.get('misses', 0)} misses)")
    if s.eval_loss:
        bits.append(f"held-out loss {s.eval_loss[max(s.eval_loss)]:.4f}")
    if s.history:
        bits.append(f"epoch {s.epoch + 1}")  # events count passes from 0
    if s.device:
        bits.append(f"on {s.device}" + (f" × {s.world_size} ranks" if s.world_size > 1 else ""))
    if s.dropped:
        bits.append(f"{s.dropped:,} rows dropped by the cut-off (data.max_len)"
                    + (f", training on {s.examples:,}" if s.examples else ""))
    if s.final_loss is not None:
        bits.append(f"final loss {s.final_loss:.4f}")
    for bench, acc in s.accuracy.items():
        bits.append(f"{bench} **{100 * acc:.1f}%**" if isinstance(acc, float) else f"{bench}: not scored ({acc})")
    return " · ".join(bits)


def build(runner: Runner, ctl: K.Controls) -> dict:
    """Lay out the Train tab inside the current Blocks; returns the components other tabs need."""
    presets = list_presets()
    first = DEMO if any(p.name == DEMO for p in presets) else (presets[0].name if presets else None)
    start_cfg = load_preset(first).to_dict() if first else C.Config().to_dict()
    desc = {p.name: p.description for p in presets}

    preset_base = gr.State(start_cfg)
    preset = gr.Dropdown(choices=[(p.label, p.name) for p in presets], value=first, label="Preset",
                         info="a one-click configuration: it fills every control below", elem_id="preset")
    preset_desc = gr.Markdown(desc.get(first, ""), elem_id="preset-description")
    with gr.Row(equal_height=True):
        ctl.add("model.path", gr.Dropdown(
            choices=model_choices(start_cfg["model"]["path"]), value=start_cfg["model"]["path"],
            allow_custom_value=True, label="Model", elem_id="cfg-model-path", scale=3,
            info="a local HF checkpoint folder (relative paths are relative to the project root), a recent "
                 "model, or the demo"))
        ctl.add("data.train", gr.Dropdown(
            choices=dataset_choices(start_cfg["data"]["train"]), value=start_cfg["data"]["train"],
            allow_custom_value=True, label="Dataset", elem_id="cfg-data-train", scale=3,
            info="a registry dataset, or a file path (JSON, JSONL, CSV, Parquet)"))
        upload = gr.UploadButton("Upload a dataset file", file_types=UPLOAD_TYPES, elem_id="dataset-upload",
                                 scale=1)
    for title, ids in K.GROUPS.items():
        with gr.Accordion(title, open=title in ("Adapter", "Routing", "Hyperparameters")):
            for i in range(0, len(ids), 4):
                with gr.Row():
                    for fid in ids[i:i + 4]:
                        ctl.build(fid, value=K.to_widget(fid, K.get(start_cfg, fid)))
    with gr.Row(equal_height=True):
        ctl.build("memory.gpu_gb", value=K.to_widget("memory.gpu_gb", start_cfg["memory"]["gpu_gb"]), scale=1)
        check = gr.Button("Check fit", elem_id="check-fit", scale=0)
        fit_out = gr.Markdown(elem_id="fit-result")
    with gr.Accordion("Equivalent command and YAML", open=False):
        cmd_box = gr.Code(language="shell", label="moetune train (from the project root)", elem_id="command-preview",
                          interactive=False)
        yaml_box = gr.Code(language="yaml", label="config", elem_id="yaml-preview", interactive=False)
    with gr.Row(equal_height=True):
        run_name = gr.Textbox(label="Run name", info=f"a folder under {runs_dir()}", elem_id="run-name", scale=2)
        gpus = gr.Number(value=1, precision=0, minimum=1, label="GPUs", elem_id="gpus", scale=1,
                         info="data parallel over this many GPUs of this machine (moetune train --gpus N)")
        start = gr.Button("Start", variant="primary", elem_id="start", scale=1)
        stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1, interactive=False)
        resume = gr.Button("Resume", elem_id="resume", scale=1, interactive=False)
    message = gr.HTML(elem_id="train-message")
    with gr.Column():
        run_pick = gr.Dropdown(choices=runner.list_runs(), value=None, label="Run shown", elem_id="run-shown",
                               info="the live run, or any earlier one; the view follows it from disk")
        progress = gr.HTML(plots.progress_bar(0, 0, "empty", None, None), elem_id="progress")
        stats = gr.Markdown(elem_id="run-stats")
        run_error = gr.HTML(elem_id="run-error")
        charts = gr.HTML(plots.training_charts({}), elem_id="charts")
        heatmap = gr.HTML(plots.expert_heatmap(None), elem_id="heatmap")
    timer = gr.Timer(1.0)

    widgets = ctl.components

    # ---- preset and preview ------------------------------------------------------------------

    def on_preset(name):
        cfg = load_preset(name).to_dict()
        return [cfg, desc.get(name, ""), runner.new_name(name), ""] + form_updates(ctl, cfg)

    preset.input(on_preset, [preset], [preset_base, preset_desc, run_name, fit_out] + widgets)

    def preview(preset_name, base, name, *values):
        try:
            data = K.config_dict(ctl.to_dict(base, list(values)))
            out = display_path(str(runner.run_path(name) if (name or "").strip() else runs_dir() / "RUN"))
        except ValueError as e:  # ConfigError, or a run name that is not one folder name
            return f"# {e}", f"# {e}"
        return K.command_preview(preset_name, base, data, out), yaml.safe_dump(data, sort_keys=False)

    preview_inputs = [preset, preset_base, run_name] + widgets
    gr.on([w.change for w in widgets] + [run_name.change, preset_base.change], preview, preview_inputs,
          [cmd_box, yaml_box], show_progress="hidden")

    def on_upload(file):
        if file is None:
            return gr.update()
        src = Path(file if isinstance(file, str) else file.name)
        dest_dir = runs_dir() / "uploads"
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / src.name
        shutil.copyfile(src, dest)
        return gr.update(value=str(dest), choices=dataset_choices(str(dest)))

    upload.upload(on_upload, [upload], [ctl.widgets["data.train"]])

    # ---- check fit ---------------------------------------------------------------------------

    def on_check(base, *values):
        try:
            data = resolve_config_paths(K.config_dict(ctl.to_dict(base, list(values))))
        except C.ConfigError as e:
            return _message(str(e))
        fits, text = commands.check_fit(data, data["memory"]["gpu_gb"])
        head = {True: "✅ **Fits.**", False: "❌ **Does not fit.**", None: "⚠️ **No plan.**"}[fits]
        return f"{head}\n\n```\n{text}\n```"

    check.click(on_check, [preset_base] + widgets, [fit_out])

    # ---- start / stop / resume ---------------------------------------------------------------

    def on_start(preset_name, base, name, n_gpus, *values):
        try:
            data = resolve_config_paths(K.config_dict(ctl.to_dict(base, list(values))))
            model = Path(data["model"]["path"])
            if not (model / "config.json").is_file():
                raise C.ConfigError(f"model.path: {display_path(str(model))} is not a checkpoint folder (no "
                                    "config.json); pick the demo model or give a local HF checkpoint folder.")
            name = (name or "").strip() or runner.new_name(data.get("title") or "run")
            started = runner.start(data, name, gpus=int(n_gpus or 1))
        except (ValueError, RuntimeError, OSError) as e:  # ConfigError is a ValueError, as is a bad run name
            return gr.update(), _message(str(e)), gr.update()
        remember_model(str(model))
        return (gr.update(choices=runner.list_runs(), value=started), _message(f"started {started}", "ok"),
                runner.new_name(preset_name or "run"))

    start.click(on_start, [preset, preset_base, run_name, gpus] + widgets, [run_pick, message, run_name])

    def on_stop(name):
        if not name:
            return _message("no run is shown", "info")
        return _message(f"stopping {name}: it saves a checkpoint first", "info") if runner.stop(name) else \
            _message(f"{name} is not running", "info")

    stop.click(on_stop, [run_pick], [message])

    def on_resume(name):
        if not name:
            return _message("no run is shown", "info")
        try:
            runner.resume(name)
        except (RuntimeError, ValueError) as e:
            return _message(str(e))
        return _message(f"resuming {name}", "ok")

    resume.click(on_resume, [run_pick], [message])

    # ---- the live view -----------------------------------------------------------------------

    def refresh(name):
        if not name:
            return (plots.progress_bar(0, 0, "empty", None, None), "", "", plots.training_charts({}),
                    plots.expert_heatmap(None), gr.update(interactive=True), gr.update(interactive=False),
                    gr.update(interactive=False))
        s = runner.state(name)
        err = _message(s.warning, "warn")
        if s.error:
            tail = f"\n\n{s.log_tail}" if s.log_tail else ""
            err += _message(f"{s.status}: {s.error}{tail}")
        can_resume = s.status in ("stopped", "crashed") or (s.status == "error" and s.step > 0)
        return (plots.progress_bar(s.step, s.total_steps, s.status, s.eta_s, s.elapsed_s), status_markdown(s), err,
                plots.training_charts(s.history, s.eval_loss), plots.expert_heatmap(s.expert_usage),
                gr.update(interactive=not s.running), gr.update(interactive=s.running),
                gr.update(interactive=can_resume))

    run_pick.focus(lambda current: gr.update(choices=runner.list_runs(), value=current), [run_pick], [run_pick],
                   show_progress="hidden")

    view = [progress, stats, run_error, charts, heatmap, start, stop, resume]
    timer.tick(refresh, [run_pick], view, show_progress="hidden")
    run_pick.change(refresh, [run_pick], view, show_progress="hidden")

    def on_load():
        current = runner.current_run()
        return gr.update(choices=runner.list_runs(), value=current), runner.new_name(first or "run")

    return {"load": (on_load, [], [run_pick, run_name]), "preview": (preview, preview_inputs, [cmd_box, yaml_box]),
            "run_pick": run_pick, "preset_base": preset_base}
