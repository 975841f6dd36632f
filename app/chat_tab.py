"""The Chat tab: one prompt, answered by the base model and the adapted model side by side, by one
`moetune chat --serve` process that keeps the run's model loaded (the base answer comes from the same
weights with the adapters switched off). Each message is answered on its own (single turn). The tab names the
run it talks to; while a reply is pending, the message is shown with "loading the model …" (or "thinking …")."""

from __future__ import annotations

import html

import gradio as gr

from . import commands, run_list
from .runner import Runner

EMPTY_PROMPT = "Type a message first: the prompt is empty."


def header(name: str | None) -> str:
    """The line above the chat that names the run answering."""
    if not name:
        return "<div id='chat-run-name' style='opacity:.7'>No finished run yet: train one on the Train tab.</div>"
    return (f"<div id='chat-run-name' data-run='{html.escape(name)}'>Talking to <b>{html.escape(run_list.label(name))}"
            f"</b>: its base model on the left, the fine-tuned model on the right.</div>")


def build(runner: Runner, focus: gr.State | None = None) -> dict:
    """Lay out the Chat tab; returns its on-load and on-select hooks (which offer the focus run first)."""
    focus = focus if focus is not None else gr.State()
    with gr.Row(equal_height=True):
        run = gr.Dropdown(choices=run_list.choices(run_list.finished(runner)), label="Run", elem_id="chat-run",
                          scale=3, info="the adapter to talk to; its base model answers beside it")
        refresh = gr.Button("↻", scale=0, min_width=40)
    named = gr.HTML(header(None), elem_id="chat-header")
    with gr.Row():
        base_bot = gr.Chatbot(label="Base model", elem_id="chat-base", height=360, elem_classes=["mt-chat"])
        tuned_bot = gr.Chatbot(label="Fine-tuned", elem_id="chat-tuned", height=360, elem_classes=["mt-chat"])
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(placeholder="e.g. What is 47 + 38?", show_label=False, elem_id="chat-prompt", scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button("Clear", scale=0)
    note = gr.HTML(elem_id="chat-note")

    def respond(name, text, base_hist, tuned_hist):
        base_hist, tuned_hist = list(base_hist or []), list(tuned_hist or [])
        if not name:
            yield base_hist, tuned_hist, text, "<div class='mt-msg mt-error'>Pick a finished run first.</div>"
            return
        if not (text or "").strip():
            yield base_hist, tuned_hist, text, f"<div class='mt-msg mt-error'>{EMPTY_PROMPT}</div>"
            return
        server = commands.chat_server(runner.run_path(name))
        pending = "thinking …" if server.ready else "loading the model … (the first message waits for it)"
        user = {"role": "user", "content": text}
        wait = {"role": "assistant", "content": f"⏳ {pending}"}
        yield base_hist + [user, wait], tuned_hist + [dict(user), dict(wait)], "", ""
        b, t = commands.chat_both(runner.run_path(name), text)
        base_hist += [user, {"role": "assistant", "content": b}]
        tuned_hist += [dict(user), {"role": "assistant", "content": t}]
        yield base_hist, tuned_hist, "", ""

    for trigger in (send.click, prompt.submit):
        trigger(respond, [run, prompt, base_bot, tuned_bot], [base_bot, tuned_bot, prompt, note])
    clear.click(lambda: ([], [], ""), None, [base_bot, tuned_bot, note])

    def reload_runs(current=None, wanted=None):
        runs = run_list.finished(runner)
        name = run_list.pick(runs, wanted, current)
        same = name == current
        return (gr.update(choices=run_list.choices(runs), value=name), header(name),
                gr.update() if same else [], gr.update() if same else [])

    hook = (reload_runs, [run, focus], [run, named, base_bot, tuned_bot])
    refresh.click(*hook)
    # another run: its name above, the conversation of the previous one cleared
    run.input(lambda name: (header(name), [], [], name), [run], [named, base_bot, tuned_bot, focus])
    return {"load": hook, "select": hook, "run": run, "header": named, "bots": [base_bot, tuned_bot]}
