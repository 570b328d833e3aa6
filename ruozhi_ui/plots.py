"""Plotly figures for the UI: token-length histograms and the training loss curve.

The only module that imports plotly. Functions take plain values (a TokenStats,
StepLogged/EvalDone events, numbers) and return a `go.Figure`; they know nothing
of Gradio, jobs or files. Titles go through `i18n.t` so a figure matches the page.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .i18n import t

MAX_POINTS = 2000  # each timer tick sends the whole figure: keep it small
SMOOTH_SHARE = 0.05  # the smoothed train loss averages this share of the run's steps around each step
HIST_FIELDS = ("instruction", "output", "prompt", "total")
COLORS = {"train": "#94a3b8", "ema": "#2563eb", "val": "#dc2626", "p95": "#f59e0b", "limit": "#dc2626"}
RUN_COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f")


def plain(text) -> str:
    """Text for a trace name, hover or annotation: plotly renders a subset of HTML there (links included),
    so a run name or a dataset string is entity-escaped and shows as written."""
    return html.escape(str(text), quote=True)


def _base_layout(fig: go.Figure, height: int) -> go.Figure:
    # The legend sits at the top right, above the plot: the page's own label badge is at the top left.
    fig.update_layout(height=height, margin=dict(l=40, r=20, t=50, b=40), template="plotly_white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))
    return fig


def empty_figure(message: str) -> go.Figure:
    """A blank chart that says why there is nothing to plot yet."""
    fig = go.Figure()
    fig.add_annotation(text=plain(message), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#64748b"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _base_layout(fig, 320)


def length_limits(max_source_length: int, max_target_length: int) -> dict[str, int | None]:
    """Which training limit applies to which histogram (the instruction has none of its own)."""
    return {"instruction": None, "output": max_target_length, "prompt": max_source_length,
            "total": max_source_length + max_target_length + 1}  # + <|im_end|>


def length_histograms(stats, max_source_length: int, max_target_length: int, lang: str = "zh") -> go.Figure:
    """Four histograms (instruction, output, templated prompt, total) with p95 and limit lines."""
    titles = [t(f"data.hist_{f}", lang) for f in HIST_FIELDS]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, horizontal_spacing=0.08, vertical_spacing=0.16)
    limits = length_limits(max_source_length, max_target_length)
    for i, field in enumerate(HIST_FIELDS):
        row, col = i // 2 + 1, i % 2 + 1
        fig.add_trace(go.Histogram(x=stats.lengths[field], name=titles[i], nbinsx=40, showlegend=False,
                                   marker_color="#60a5fa"), row=row, col=col)
        p95 = getattr(stats, field).p95
        fig.add_vline(x=p95, line=dict(color=COLORS["p95"], dash="dash", width=2), row=row, col=col,
                      annotation_text=f"p95 {p95:.0f}", annotation_position="top left")
        if limits[field] is not None:
            fig.add_vline(x=limits[field], line=dict(color=COLORS["limit"], width=2), row=row, col=col,
                          annotation_text=t("data.hist_limit", lang, n=limits[field]),
                          annotation_position="top right")
    fig.update_xaxes(title_text=t("data.hist_xaxis", lang))
    return _base_layout(fig, 560)


def smooth(values: Sequence[float], share: float = SMOOTH_SHARE) -> list[float]:
    """Centred moving average over `share` of the points (at least 3): a trailing average (TensorBoard's
    EMA) lags behind a falling loss and sits above almost every raw point; a centred one does not.
    Near the ends the window shrinks to the points there are."""
    n = len(values)
    half = max(1, int(n * share) // 2)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    return [(prefix[min(n, i + half + 1)] - prefix[max(0, i - half)]) / (min(n, i + half + 1) - max(0, i - half))
            for i in range(n)]


def downsample(n: int, max_points: int = MAX_POINTS) -> list[int]:
    """Indices of at most `max_points` evenly spread points, always keeping the last one."""
    if n <= max_points:
        return list(range(n))
    stride = math.ceil(n / max_points)
    idx = list(range(0, n, stride))
    if idx[-1] != n - 1:
        idx[-1] = n - 1  # replace rather than append: the count stays <= max_points
    return idx


def loss_figure(steps: Sequence, evals: Sequence, lang: str = "zh") -> go.Figure:
    """Train loss per step (raw + EMA line) and validation loss per epoch as markers.

    `steps` are StepLogged-like (step, loss), `evals` EvalDone-like (step, epoch, val_loss).
    """
    if not steps and not evals:
        return empty_figure(t("train.chart_waiting", lang))
    fig = go.Figure()
    if steps:
        xs = [s.step for s in steps]
        ys = [s.loss for s in steps]
        smoothed = smooth(ys)
        keep = downsample(len(xs))
        few = len(keep) < 50  # markers make the very first steps visible (one step = one dot)
        fig.add_trace(go.Scatter(x=[xs[i] for i in keep], y=[ys[i] for i in keep], name=t("train.chart_loss", lang),
                                 mode="lines+markers" if few else "lines",
                                 line=dict(color=COLORS["train"], width=1)))
        fig.add_trace(go.Scatter(x=[xs[i] for i in keep], y=[smoothed[i] for i in keep],
                                 name=t("train.chart_ema", lang), mode="lines",
                                 line=dict(color=COLORS["ema"], width=2)))
    if evals:
        fig.add_trace(go.Scatter(x=[e.step for e in evals], y=[e.val_loss for e in evals],
                                 name=t("train.chart_val", lang), mode="markers+lines",
                                 marker=dict(color=COLORS["val"], size=10, symbol="diamond"),
                                 line=dict(color=COLORS["val"], dash="dot"),
                                 text=[f"epoch {e.epoch}" for e in evals]))
    # From the run's first step, not from 0: a continued run starts at step N + 1 (an empty 0..N band before).
    fig.update_xaxes(title_text=t("train.chart_xaxis", lang), rangemode="normal")
    fig.update_yaxes(title_text=t("train.chart_yaxis", lang))
    return _base_layout(fig, 360)


def runs_figure(runs: Sequence, lang: str = "zh") -> go.Figure:
    """Loss curves of several runs on one chart: each run's smoothed train loss (a line) and validation
    loss (markers), in one colour per run. `runs` are RunRecord-like (name, steps, evals)."""
    if not runs:
        return empty_figure(t("runs.chart_none", lang))
    fig = go.Figure()
    for i, run in enumerate(runs):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        if run.steps:
            keep = downsample(len(run.steps))
            xs, ys = [s for s, _ in run.steps], smooth([v for _, v in run.steps])
            fig.add_trace(go.Scatter(x=[xs[k] for k in keep], y=[ys[k] for k in keep], mode="lines",
                                     name=t("runs.chart_train", lang, name=plain(run.name)), line=dict(color=color, width=2)))
        if run.evals:
            fig.add_trace(go.Scatter(x=[s for s, _ in run.evals], y=[v for _, v in run.evals], mode="markers+lines",
                                     name=t("runs.chart_val", lang, name=plain(run.name)),
                                     marker=dict(color=color, size=9, symbol="diamond"),
                                     line=dict(color=color, dash="dot")))
    fig.update_xaxes(title_text=t("train.chart_xaxis", lang), rangemode="tozero")
    fig.update_yaxes(title_text=t("train.chart_yaxis", lang))
    return _base_layout(fig, 380)
