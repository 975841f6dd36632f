"""The Chat tab: one prompt, answered by the base model and the adapted model side by side, by one
`moetune chat --serve` process that keeps the run's model loaded (the base answer comes from the same
weights with the adapters switched off). Each message is answered on its own (single turn)."""

from __future__ import annotations

import gradio as gr

from . import commands
from .runner import Runner


def build(runner: Runner) -> dict:
    """Lay out the Chat tab; returns its on-load hook."""
    with gr.Row(equal_height=True):
        run = gr.Dropdown(choices=runner.finished_runs(), label="Run", elem_id="chat-run", scale=3,
                          info="the adapter to talk to; its base model answers beside it")
        refresh = gr.Button("↻", scale=0, min_width=40)
    with gr.Row():
        base_bot = gr.Chatbot(label="Base model", elem_id="chat-base", height=360)
        tuned_bot = gr.Chatbot(label="Fine-tuned", elem_id="chat-tuned", height=360)
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(placeholder="e.g. What is 47 + 38?", show_label=False, elem_id="chat-prompt", scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button("Clear", scale=0)

    def respond(name, text, base_hist, tuned_hist):
        base_hist, tuned_hist = list(base_hist or []), list(tuned_hist or [])
        if not name or not (text or "").strip():
            return base_hist, tuned_hist, text
        user = {"role": "user", "content": text}
        base_hist.append(user)
        tuned_hist.append(dict(user))
        b, t = commands.chat_both(runner.run_path(name), text)
        base_hist.append({"role": "assistant", "content": b})
        tuned_hist.append({"role": "assistant", "content": t})
        return base_hist, tuned_hist, ""

    for trigger in (send.click, prompt.submit):
        trigger(respond, [run, prompt, base_bot, tuned_bot], [base_bot, tuned_bot, prompt])
    clear.click(lambda: ([], []), None, [base_bot, tuned_bot])

    def reload_runs(current=None):
        runs = runner.finished_runs()
        return gr.update(choices=runs, value=current if current in runs else (runs[0] if runs else None))

    refresh.click(reload_runs, [run], [run])
    return {"load": (reload_runs, [], [run]), "select": (reload_runs, [run], [run])}
