"""The Train tab: preset, model, dataset (with its preview), the basic settings and the folded advanced ones, GPU
budget with Check fit, the equivalent command and YAML; beside them, always in reach, the run panel: run name,
GPUs, Start / Stop / Resume, the run shown, its progress, run line and the live tail of train.log. Start checks
everything `moetune train` would (engine/preflight.py) and shows each problem beside its field; a config that
fails gets no run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import yaml

from engine import config as C
from engine import preflight

from . import commands, controls as K, data_preview, plots
from .paths import display_path, remember_model, resolve_config_paths, runs_dir
from .presets import DEMO, list_presets, load_preset
from .runner import Runner
from .train_form import (SLOTS, dataset_choices, form_updates, message, model_choices, plan_table,  # noqa: F401
                         slot_updates)
from .train_view import empty_view, status_markdown, view  # noqa: F401  (status_markdown: tests, other tabs)

UPLOAD_TYPES = [".json", ".jsonl", ".csv", ".parquet"]
#: short help for the basic fields shown at once (the full help is in the YAML's field docs and the README)
SHORT_INFO = {"routing.strategy": "shared · dense · routed · embedded · none", "adapter.kind": "lora · bottleneck · gated",
              "adapter.rank": "r (≥ 1)", "train.lr": "peak, AdamW", "data.template": "prompt template",
              "data.max_len": "cut-off in tokens"}
SLOT = ["mt-slot"]  # message boxes that take no room while empty (CSS in app/main.py)
_message = message  # the Sweep tab's name for it


def _length_widgets(ctl: K.Controls, cfg: dict) -> None:
    unit, n = K.length_of(cfg)
    ctl.add(K.LENGTH_UNIT, gr.Radio(["epochs", "steps"], value=unit, label="Train for", elem_id="cfg-train-length-unit",
                                    info="passes over the data, or optimizer steps", min_width=120))
    ctl.add(K.LENGTH, gr.Number(value=n, label="epochs" if unit == "epochs" else "steps", elem_id="cfg-train-length",
                                info="how many", min_width=120))


def build(runner: Runner, ctl: K.Controls, focus: gr.State | None = None) -> dict:
    """Lay out the Train tab inside the current Blocks; returns the components other tabs need."""
    presets = list_presets()
    first = DEMO if any(p.name == DEMO for p in presets) else (presets[0].name if presets else None)
    start_cfg = load_preset(first).to_dict() if first else C.Config().to_dict()
    desc = {p.name: p.description for p in presets}
    preset_base = gr.State(start_cfg)
    slots, accordions = {}, {}
    with gr.Row(elem_id="train-layout"):
        with gr.Column(scale=3, min_width=420):
            preset = gr.Dropdown(choices=[(p.label, p.name) for p in presets], value=first, label="Preset",
                                 info="a one-click configuration: it fills every control below", elem_id="preset")
            preset_desc = gr.Markdown(desc.get(first, ""), elem_id="preset-description")
            with gr.Row(equal_height=True):
                ctl.add("model.path", gr.Dropdown(
                    choices=model_choices(start_cfg["model"]["path"]), value=start_cfg["model"]["path"],
                    allow_custom_value=True, label="Model", elem_id="cfg-model-path", scale=3,
                    info="a local HF checkpoint folder (relative to the project root), a recent model, or the demo"))
                ctl.add("data.train", gr.Dropdown(
                    choices=dataset_choices(start_cfg["data"]["train"]), value=start_cfg["data"]["train"],
                    allow_custom_value=True, label="Dataset", elem_id="cfg-data-train", scale=3,
                    info="a registry dataset, or a file path (JSON, JSONL, CSV, Parquet)"))
                with gr.Column(scale=1, min_width=130):
                    upload = gr.UploadButton("Upload a file", file_types=UPLOAD_TYPES, elem_id="dataset-upload",
                                             size="sm")
                    preview_btn = gr.Button("Preview dataset", elem_id="preview-dataset", size="sm")
            slots["model"] = gr.HTML(elem_id="msg-model", elem_classes=SLOT)
            slots["data"] = gr.HTML(elem_id="msg-data", elem_classes=SLOT)
            preview_box = gr.HTML(elem_id="dataset-preview", elem_classes=SLOT)
            for i in range(0, len(K.BASICS), 4):
                with gr.Row():
                    for fid in K.BASICS[i:i + 4]:
                        if fid == K.LENGTH_UNIT:
                            _length_widgets(ctl, start_cfg)
                        elif fid != K.LENGTH:
                            ctl.build(fid, value=K.to_widget(fid, K.get(start_cfg, fid)), info=SHORT_INFO.get(fid),
                                      min_width=120)
            slots["basics"] = gr.HTML(elem_id="msg-basics", elem_classes=SLOT)
            for title, ids in K.GROUPS.items():
                with gr.Accordion(title, open=False, elem_id="group-" + title.lower().replace(" ", "-")) as acc:
                    slots[title] = gr.HTML(elem_classes=SLOT)
                    for i in range(0, len(ids), 4):
                        with gr.Row():
                            for fid in ids[i:i + 4]:
                                ctl.build(fid, value=K.to_widget(fid, K.get(start_cfg, fid)))
                accordions[title] = acc
            with gr.Row(equal_height=True):
                ctl.build("memory.gpu_gb", value=K.to_widget("memory.gpu_gb", start_cfg["memory"]["gpu_gb"]),
                          scale=2)
                check = gr.Button("Check fit", elem_id="check-fit", scale=1)
            fit_out = gr.HTML(elem_id="fit-result", elem_classes=SLOT)
            with gr.Accordion("Equivalent command and YAML", open=False):
                cmd_box = gr.Code(language="shell", label="moetune train (from the project root)",
                                  elem_id="command-preview", interactive=False)
                yaml_box = gr.Code(language="yaml", label="config", elem_id="yaml-preview", interactive=False)
        with gr.Column(scale=2, min_width=330, elem_id="run-panel"):
            with gr.Row(equal_height=True):
                run_name = gr.Textbox(label="Run name", info=f"a folder under {display_path(str(runs_dir()))}",
                                      elem_id="run-name", scale=3)
                gpus = gr.Number(value=1, precision=0, label="GPUs", elem_id="gpus", scale=1,
                                 info="processes (--gpus N)")
            slots["gpus"] = gr.HTML(elem_id="msg-gpus", elem_classes=SLOT)
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="start", min_width=80)
                stop = gr.Button("Stop", variant="stop", elem_id="stop", interactive=False, min_width=80)
                resume = gr.Button("Resume", elem_id="resume", interactive=False, min_width=80)
            msg = gr.HTML(elem_id="train-message", elem_classes=SLOT)
            run_pick = gr.Dropdown(choices=runner.list_runs(), value=None, label="Run shown", elem_id="run-shown",
                                   info="the live run, or any earlier one; the view follows it from disk")
            progress = gr.HTML(plots.progress_bar(0, 0, "empty", None, None), elem_id="progress")
            stats = gr.Markdown(elem_id="run-stats")
            run_error = gr.HTML(elem_id="run-error", elem_classes=SLOT)
            log = gr.HTML(elem_id="train-log-box", elem_classes=SLOT)
    charts = gr.HTML(plots.training_charts({}), elem_id="charts")
    heatmap = gr.HTML(plots.expert_heatmap(None), elem_id="heatmap")
    timer = gr.Timer(1.0)
    widgets = ctl.components
    slot_list = [slots[s] for s in SLOTS]
    acc_list = list(accordions.values())

    # ---- preset, length choice and preview --------------------------------------------------------

    def on_preset(name):
        cfg = load_preset(name).to_dict()
        return [cfg, desc.get(name, ""), runner.new_name(name), "", ""] + form_updates(ctl, cfg)

    preset.input(on_preset, [preset], [preset_base, preset_desc, run_name, fit_out, preview_box] + widgets)

    def on_unit(unit, base):
        own = K.get(base, "train.epochs") if unit == "epochs" else K.get(base, "train.max_steps")
        value = (own or 1) if unit == "epochs" else (own or 100)
        return gr.update(label=unit, value=int(value) if float(value).is_integer() else value)

    ctl.widgets[K.LENGTH_UNIT].input(on_unit, [ctl.widgets[K.LENGTH_UNIT], preset_base], [ctl.widgets[K.LENGTH]])

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

    def on_preview(base, *values):
        try:
            data = resolve_config_paths(K.config_dict(ctl.to_dict(base, list(values))))
            return data_preview.preview_html(data_preview.preview(data)), ""
        except ValueError as e:
            return "", message(str(e))

    preview_btn.click(on_preview, [preset_base] + widgets, [preview_box, slots["data"]])
    for fid in ("data.train", "data.template", "data.max_len", "model.path"):  # a preview of other settings goes
        ctl.widgets[fid].change(lambda: "", None, [preview_box], show_progress="hidden")

    # ---- check fit ---------------------------------------------------------------------------

    def on_check(base, *values):
        try:
            data = resolve_config_paths(K.config_dict(ctl.to_dict(base, list(values))))
        except C.ConfigError as e:
            return message(str(e))
        fits, text = commands.check_fit(data, data["memory"]["gpu_gb"])
        if fits is None:
            return message(f"No plan: {text}", "warn")
        return plan_table(text, "✅ Fits." if fits else "❌ Does not fit.")

    check.click(on_check, [preset_base] + widgets, [fit_out])

    # ---- GPUs, start / stop / resume ---------------------------------------------------------

    def on_gpus(n):
        problems, notes = preflight.check_gpus(n)
        return "".join(message(p.message) for p in problems) + "".join(message(p.message, "warn") for p in notes)

    gpus.change(on_gpus, [gpus], [slots["gpus"]], show_progress="hidden")

    def on_start(preset_name, base, name, n_gpus, *values):
        keep = [gr.update(), gr.update()]
        try:
            data = resolve_config_paths(ctl.to_dict(base, list(values)))
            name = (name or "").strip() or runner.new_name(data.get("title") or "run")
            runner.run_path(name)  # a bad run name is refused before the checks
        except ValueError as e:
            return keep + [message(str(e)), gr.update()] + [""] * len(SLOTS) + [gr.update()] * len(acc_list)
        result = preflight.check(data, gpus=n_gpus)  # what `moetune train` checks first, before anything exists
        boxes, general = slot_updates(result.problems, result.notes)
        opened = [gr.update(open=True) if boxes[SLOTS.index(t)] else gr.update() for t in accordions]
        if not result.ok:
            head = message(f"not started: {len(result.problems)} problem(s) to fix, shown beside the field "
                           "concerned; nothing was written")
            return keep + [head + general, gr.update()] + boxes + opened
        try:
            started = runner.start(result.config.to_dict(), name, gpus=int(n_gpus or 1))
        except (ValueError, RuntimeError, OSError) as e:
            return keep + [message(str(e)), gr.update()] + boxes + opened
        remember_model(result.config.model.path)
        return ([gr.update(choices=runner.list_runs(), value=started), started,
                 message(f"started {started}", "ok") + general, runner.new_name(preset_name or "run")]
                + boxes + opened)

    start.click(on_start, [preset, preset_base, run_name, gpus] + widgets,
                [run_pick, focus or gr.State(), msg, run_name] + slot_list + acc_list)

    def on_stop(name):
        if not name:
            return message("no run is shown", "info")
        return message(f"stopping {name}: it saves a checkpoint first", "info") if runner.stop(name) else \
            message(f"{name} is not running", "info")

    stop.click(on_stop, [run_pick], [msg])

    def on_resume(name):
        if not name:
            return message("no run is shown", "info")
        try:
            runner.resume(name)
        except (RuntimeError, ValueError) as e:
            return message(str(e))
        return message(f"resuming {name}", "ok")

    resume.click(on_resume, [run_pick], [msg])

    # ---- the live view -----------------------------------------------------------------------

    run_pick.focus(lambda current: gr.update(choices=runner.list_runs(), value=current), [run_pick], [run_pick],
                   show_progress="hidden")
    outputs = [progress, stats, run_error, log, charts, heatmap, start, stop, resume]
    timer.tick(lambda name: view(runner, name), [run_pick], outputs, show_progress="hidden")
    run_pick.change(lambda name: view(runner, name), [run_pick], outputs, show_progress="hidden")
    if focus is not None:  # the run shown here is the one the other tabs offer first
        run_pick.input(lambda name: name, [run_pick], [focus], show_progress="hidden")

    def on_load():
        current = runner.current_run()
        return gr.update(choices=runner.list_runs(), value=current), runner.new_name(first or "run")

    return {"load": (on_load, [], [run_pick, run_name]), "preview": (preview, preview_inputs, [cmd_box, yaml_box]),
            "run_pick": run_pick, "preset_base": preset_base, "preset": preset, "preset_desc": preset_desc,
            "message": msg, "preview_box": preview_box}
