"""The live view of a run on the Train tab: the progress bar, the run line, errors, the tail of `train.log`, the
charts, and which of Start / Stop / Resume can be pressed — all read from the run folder."""

from __future__ import annotations

import html

import gradio as gr

from . import plots
from .runner import LOG_FILE, Runner, RunState, _log_tail
from .train_form import message

LOG_LINES = 14


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


def log_html(runner: Runner, name: str | None) -> str:
    """The last lines of the run's train.log, newest at the bottom."""
    if not name:
        return ""
    try:
        text = _log_tail(runner.run_path(name) / LOG_FILE, LOG_LINES)
    except ValueError:
        return ""
    if not text:
        return ""
    return (f"<details open id='train-log' class='mt-log mt-filled'><summary style='font-size:12px;opacity:.8'>train.log (live)</summary>"
            f"<pre style='font-size:11px;line-height:1.35;max-height:190px;overflow:auto;white-space:pre-wrap;"
            f"overflow-wrap:anywhere;margin:2px 0'>{html.escape(text)}</pre></details>")


def empty_view() -> tuple:
    """The view with no run shown."""
    return (plots.progress_bar(0, 0, "empty", None, None), "", "", "", plots.training_charts({}),
            plots.expert_heatmap(None), gr.update(interactive=True), gr.update(interactive=False),
            gr.update(interactive=False))


def view(runner: Runner, name: str | None) -> tuple:
    """progress, run line, errors, log tail, charts, heatmap, and Start / Stop / Resume's state for a run."""
    if not name:
        return empty_view()
    try:
        s = runner.state(name)
    except ValueError:  # a name that is no longer a run folder
        return empty_view()
    err = message(s.warning, "warn")
    if s.error:
        err += message(f"{s.status}: {s.error}")
    can_resume = s.status in ("stopped", "crashed") or (s.status == "error" and s.step > 0)
    return (plots.progress_bar(s.step, s.total_steps, s.status, s.eta_s, s.elapsed_s), status_markdown(s), err,
            log_html(runner, name), plots.training_charts(s.history, s.eval_loss), plots.expert_heatmap(s.expert_usage),
            gr.update(interactive=not s.running), gr.update(interactive=s.running), gr.update(interactive=can_resume))
