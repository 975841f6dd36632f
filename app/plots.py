"""Small inline SVG/HTML charts for the app: a progress bar, line charts (loss, learning rate), the
expert-usage heatmap and the evaluation bar chart. Plain strings, no plotting library: they render
at once, follow the page's text colour, and carry `data-*` attributes the browser test reads."""

from __future__ import annotations

import html
import math

LOSS_COLOR, LR_COLOR, BASE_COLOR, TUNED_COLOR = "#f97316", "#3b82f6", "#9ca3af", "#f97316"


def fmt_duration(seconds: float | None) -> str:
    """`1h 02m`, `3m 05s`, `42s`, or `–`."""
    if seconds is None or math.isnan(seconds):
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_bar(step: int, total: int, status: str, eta_s: float | None, elapsed_s: float | None) -> str:
    """A progress bar with step count, percentage, elapsed time and ETA."""
    frac = min(1.0, step / total) if total else 0.0
    color = {"error": "#ef4444", "crashed": "#ef4444", "stopped": "#eab308", "done": "#22c55e"}.get(status, LOSS_COLOR)
    eta = f" · ETA {fmt_duration(eta_s)}" if status in ("running", "starting") and eta_s is not None else ""
    text = (f"{html.escape(status)} · step {step} / {total or '?'} · {100 * frac:.0f}% · "
            f"elapsed {fmt_duration(elapsed_s)}{eta}")
    return (f'<div class="mt-progress" data-step="{step}" data-total="{total}" data-status="{html.escape(status)}">'
            f'<div style="background:rgba(127,127,127,.18);border-radius:6px;height:14px;overflow:hidden">'
            f'<div style="width:{100 * frac:.1f}%;height:100%;background:{color};transition:width .4s"></div></div>'
            f'<div style="margin-top:4px;font-size:13px">{text}</div></div>')


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) < 1e-2 or abs(v) >= 1e4:
        return f"{v:.1e}"
    return f"{v:.3g}"


def _finite(points: list[tuple[float, float]], log_y: bool) -> list[tuple[float, float]]:
    pts = [(x, y) for x, y in points if y is not None and not (isinstance(y, float) and math.isnan(y))]
    return [(x, y) for x, y in pts if y > 0] if log_y else pts


def line_chart(points: list[tuple[float, float]], title: str, color: str, *, chart_id: str,
               width: int = 460, height: int = 210, log_y: bool = False,
               markers: list[tuple[float, float]] | None = None, marker_label: str = "",
               marker_color: str = "#2563eb") -> str:
    """An SVG line chart of (x, y) points with axes, ticks and the last value in the title; `markers`
    are extra points drawn as dots on the same axes (e.g. held-out loss at checkpoints)."""
    pts = _finite(points, log_y)
    dots = _finite(markers or [], log_y)
    last = f" — {_num(pts[-1][1])}" if pts else ""
    if dots:
        last += f" · {marker_label} {_num(dots[-1][1])}"
    head = (f'<svg id="{chart_id}" class="mt-chart" data-points="{len(pts)}" viewBox="0 0 {width} {height}" '
            f'width="100%" style="max-width:{width}px;font-family:sans-serif;color:inherit" '
            f'xmlns="http://www.w3.org/2000/svg"><text x="8" y="16" font-size="13" fill="currentColor" '
            f'font-weight="600">{html.escape(title)}{last}</text>')
    if not pts:
        return head + (f'<text x="{width / 2}" y="{height / 2}" font-size="12" fill="currentColor" opacity=".6" '
                       'text-anchor="middle">waiting for the first step…</text></svg>')
    left, right, top, bottom = 52, 12, 26, 26
    tf = (lambda y: math.log10(y)) if log_y else (lambda y: y)  # noqa: E731
    xs = [p[0] for p in pts]
    ys = [tf(p[1]) for p in pts]
    x0, x1 = min(xs + [d[0] for d in dots]), max(xs + [d[0] for d in dots])
    y0, y1 = min(ys + [tf(d[1]) for d in dots]), max(ys + [tf(d[1]) for d in dots])
    if x1 == x0:
        x1 = x0 + 1
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    if not log_y and min(p[1] for p in pts + dots) >= 0:
        y0 = max(y0, 0.0)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)  # noqa: E731
    parts = [head]
    for t in _ticks(y0, y1):
        yy = sy(t)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="currentColor" '
                     f'opacity=".12"/><text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" fill="currentColor" '
                     f'opacity=".7" text-anchor="end">{_num(10 ** t if log_y else t)}</text>')
    for t in _ticks(x0, x1, 5):
        if float(t).is_integer():
            xx = sx(t)
            parts.append(f'<text x="{xx:.1f}" y="{height - 8}" font-size="11" fill="currentColor" opacity=".7" '
                         f'text-anchor="middle">{int(t)}</text>')
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
    parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" '
                 'stroke-linejoin="round"/>')
    if len(pts) == 1:
        parts.append(f'<circle cx="{sx(xs[0]):.1f}" cy="{sy(ys[0]):.1f}" r="3" fill="{color}"/>')
    for x, y in dots:
        parts.append(f'<circle class="mt-marker" cx="{sx(x):.1f}" cy="{sy(tf(y)):.1f}" r="4" fill="{marker_color}">'
                     f'<title>{html.escape(marker_label)} {_num(y)} at step {int(x)}</title></circle>')
    if dots:  # a legend: which mark is which
        lx = width - right - 190
        parts.append(f'<g class="mt-legend" font-size="11" fill="currentColor"><line x1="{lx}" x2="{lx + 18}" '
                     f'y1="{top + 6}" y2="{top + 6}" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{lx + 22}" y="{top + 10}">{html.escape(title)}</text>'
                     f'<circle cx="{lx + 104}" cy="{top + 6}" r="4" fill="{marker_color}"/>'
                     f'<text x="{lx + 112}" y="{top + 10}">{html.escape(marker_label)}</text></g>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="currentColor" opacity=".35"/>'
                 f'<text x="{left - 6}" y="{height - 8}" font-size="11" fill="currentColor" opacity=".7" '
                 'text-anchor="end">step</text></svg>')
    return "".join(parts)


def training_charts(history: dict[int, tuple[float, float]], eval_loss: dict[int, float] | None = None) -> str:
    """The loss chart (held-out loss as dots, when the run has data.eval) and the learning-rate chart."""
    steps = sorted(history)
    held = sorted((eval_loss or {}).items())
    loss = line_chart([(s, history[s][0]) for s in steps], "loss", LOSS_COLOR, chart_id="loss-chart",
                      markers=held, marker_label="held-out")
    lr = line_chart([(s, history[s][1]) for s in steps], "learning rate", LR_COLOR, chart_id="lr-chart")
    return (f'<div class="mt-charts" style="display:flex;gap:12px;flex-wrap:wrap">'
            f'<div style="flex:1 1 320px">{loss}</div><div style="flex:1 1 320px">{lr}</div></div>')


def expert_heatmap(usage: list[list[int]] | None, width: int = 940) -> str:
    """Expert usage per MoE layer (rows) and expert (columns): the share of the layer's routed tokens
    each expert took over the latest reported steps, darker = more."""
    if not usage:
        return ('<div id="expert-heatmap" data-layers="0" style="opacity:.6;font-size:13px">'
                'Expert usage appears with the first step.</div>')
    layers, experts = len(usage), max(len(r) for r in usage)
    left, top = 64, 24
    cell_w = max(3.0, min(56.0, (width - left - 10) / experts))
    cell_h = max(6.0, min(26.0, 360 / layers))
    w, h = max(560.0, left + cell_w * experts + 10), top + cell_h * layers + 22 + 34
    parts = [f'<svg id="expert-heatmap" data-layers="{layers}" data-experts="{experts}" viewBox="0 0 {w:.0f} {h:.0f}" '
             f'width="100%" style="max-width:{w:.0f}px;font-family:sans-serif" xmlns="http://www.w3.org/2000/svg">'
             f'<text x="4" y="14" font-size="13" font-weight="600" fill="currentColor">expert usage per MoE layer '
             f'(share of routed tokens, recent steps)</text>']
    for i, row in enumerate(usage):
        total = sum(row) or 1
        y = top + i * cell_h
        if layers <= 32 or i % max(1, layers // 16) == 0:
            parts.append(f'<text x="{left - 6}" y="{y + cell_h * 0.75:.1f}" font-size="10" fill="currentColor" '
                         f'text-anchor="end" opacity=".75">layer {i}</text>')
        for j, count in enumerate(row):
            share = count / total
            # opacity scaled so a uniform layer (1/experts) sits mid-way
            alpha = min(1.0, 0.06 + share * experts * 0.45)
            parts.append(f'<rect x="{left + j * cell_w:.1f}" y="{y:.1f}" width="{cell_w - 1:.1f}" height="{cell_h - 1:.1f}" '
                         f'fill="{LOSS_COLOR}" fill-opacity="{alpha:.2f}"><title>layer {i}, expert {j}: {count} tokens '
                         f'({100 * share:.1f}%)</title></rect>')
    step = max(1, experts // 16)
    for j in range(0, experts, step):
        parts.append(f'<text x="{left + (j + 0.5) * cell_w:.1f}" y="{h - 42:.1f}" font-size="10" fill="currentColor" '
                     f'text-anchor="middle" opacity=".75">{j}</text>')
    parts.append(_colour_scale(left, h - 26, experts))
    parts.append("</svg>")
    return "".join(parts)


def _colour_scale(x: float, y: float, experts: int, width: float = 220) -> str:
    """The heatmap's colour scale: share of a layer's routed tokens, 0 to the share drawn fully opaque, with the
    uniform share (1 / experts) marked."""
    full = 0.94 / (0.45 * experts)  # the share whose opacity reaches 1 (expert_heatmap's scale)
    stops = "".join(f'<stop offset="{o:.2f}" stop-color="{LOSS_COLOR}" stop-opacity="{min(1.0, 0.06 + o * 0.94):.2f}"/>'
                    for o in (0.0, 0.5, 1.0))
    ux = x + width * min(1.0, (1 / experts) / full)
    return (f'<g class="mt-colour-scale" font-size="10" fill="currentColor"><defs><linearGradient id="usage-scale">'
            f'{stops}</linearGradient></defs><text x="{x - 6}" y="{y + 9}" text-anchor="end" opacity=".75">share</text>'
            f'<rect x="{x}" y="{y}" width="{width}" height="10" fill="url(#usage-scale)" stroke="currentColor" '
            f'stroke-opacity=".25"/><text x="{x}" y="{y + 22}" opacity=".75">0%</text>'
            f'<line x1="{ux:.1f}" x2="{ux:.1f}" y1="{y - 2}" y2="{y + 12}" stroke="currentColor"/>'
            f'<text x="{ux:.1f}" y="{y + 22}" text-anchor="middle" opacity=".75">uniform {100 / experts:.1f}%</text>'
            f'<text x="{x + width}" y="{y + 22}" text-anchor="end" opacity=".75">≥ {100 * full:.0f}%</text></g>')


def eval_chart(rows: list[dict], width: int = 640) -> str:
    """Grouped bars of base vs tuned accuracy per benchmark (`rows`: benchmark, base, tuned)."""
    if not rows:
        return ""
    left, top, bar_h, gap = 110, 28, 16, 14
    h = top + len(rows) * (2 * bar_h + gap) + 10
    scale = width - left - 70
    parts = [f'<svg id="eval-chart" viewBox="0 0 {width} {h}" width="100%" style="max-width:{width}px;'
             f'font-family:sans-serif" xmlns="http://www.w3.org/2000/svg">'
             f'<rect x="{left}" y="6" width="12" height="12" fill="{BASE_COLOR}"/>'
             f'<text x="{left + 16}" y="16" font-size="12" fill="currentColor">base model</text>'
             f'<rect x="{left + 110}" y="6" width="12" height="12" fill="{TUNED_COLOR}"/>'
             f'<text x="{left + 126}" y="16" font-size="12" fill="currentColor">fine-tuned</text>']
    for i, r in enumerate(rows):
        y = top + i * (2 * bar_h + gap)
        parts.append(f'<text x="{left - 8}" y="{y + bar_h + 4}" font-size="12" fill="currentColor" '
                     f'text-anchor="end">{html.escape(str(r["benchmark"]))}</text>')
        for k, (key, color) in enumerate((("base", BASE_COLOR), ("tuned", TUNED_COLOR))):
            v = r.get(key)
            if v is None:
                continue
            yy = y + k * bar_h
            parts.append(f'<rect x="{left}" y="{yy}" width="{max(1.0, v * scale):.1f}" height="{bar_h - 2}" '
                         f'fill="{color}"/><text x="{left + v * scale + 6:.1f}" y="{yy + bar_h - 5}" font-size="11" '
                         f'fill="currentColor">{100 * v:.1f}%</text>')
    parts.append("</svg>")
    return "".join(parts)
