"""The app: Train, Sweep, Evaluate, Chat, Export and Runs tabs in one Gradio Blocks, served on 127.0.0.1 by
default with no public share link. Started by `moetune ui`; it imports no torch at start-up (the first Start,
dataset preview or export-format check loads the engine's checks in its process; training is always a child).

One State, the *focus*, holds the run the user works with — started or shown on Train, picked in any tab or in
the runs table — and Evaluate, Chat and Export offer it first when they are opened."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from . import chat_tab, evaluate_tab, export_tab, runs_tab, sweep_tab, train_tab  # noqa: E402
from .controls import Controls  # noqa: E402
from .paths import runs_dir  # noqa: E402
from .runner import Runner  # noqa: E402

CSS = """
.mt-msg { margin: 4px 0; }
#progress { min-height: 40px; }
footer { display: none !important; }
/* the run panel stays in reach while the form scrolls */
#run-panel { position: sticky; top: 8px; align-self: flex-start; max-height: calc(100vh - 16px); overflow-y: auto; }
/* the chat's copy / retry toolbar sits below a message, never over its text */
.mt-chat .message-buttons, .mt-chat .message-buttons-left, .mt-chat .message-buttons-right {
  position: static !important; opacity: 1 !important; margin-top: 2px; }
.mt-chat .message { padding-bottom: 4px; }
#fit-result table td { word-break: break-word; }
/* a message box holding nothing takes no room */
.mt-slot:not(:has(.mt-filled)) { display: none !important; }
"""


def build_app(runner: Runner | None = None) -> gr.Blocks:
    """The whole app, wired to a Runner (by default over the runs folder)."""
    runner = runner or Runner()
    ctl = Controls()
    with gr.Blocks(title="MoETune", analytics_enabled=False) as app:
        gr.Markdown("## MoETune — routed adapters for Mixture-of-Experts models", elem_id="title")
        focus = gr.State(None)  # the run the user works with
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(runner, ctl, focus)
            with gr.Tab("Sweep", id="sweep", elem_id="tab-sweep") as sweep_t:
                sweep = sweep_tab.build(ctl, train["preset_base"], tabs, sweep_tab.Sweeps(runner.root), train)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as eval_t:
                ev = evaluate_tab.build(runner, focus)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_t:
                chat = chat_tab.build(runner, focus)
            with gr.Tab("Export", id="export", elem_id="tab-export") as export_t:
                exp = export_tab.build(runner, focus)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as runs_t:
                runs = runs_tab.build(runner, ctl, tabs, focus, train,
                                      {"evaluate": ev["select"], "chat": chat["select"], "export": exp["select"]})
        for part in (train, sweep, ev, chat, exp, runs):
            if part.get("load"):
                fn, inputs, outputs = part["load"]
                app.load(fn, inputs, outputs)
        fn, inputs, outputs = train["preview"]
        app.load(fn, inputs, outputs)
        app.load(runner.current_run, [], [focus])
        # runs finished meanwhile appear in the other tabs when they are opened, the focus run first
        for tab, part in ((sweep_t, sweep), (eval_t, ev), (chat_t, chat), (export_t, exp), (runs_t, runs)):
            hook = part.get("select") or part.get("load")
            if hook:
                tab.select(*hook, show_progress="minimal")
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Serve the app until interrupted; runs started from it go on after it stops."""
    app = build_app()
    print(f"MoETune app on http://{host}:{port} (runs in {runs_dir()})", flush=True)
    app.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, share=share,
                                                  inbrowser=False, show_error=True, css=CSS,
                                                  theme=gr.themes.Soft(primary_hue="orange"),
                                                  footer_links=[])
