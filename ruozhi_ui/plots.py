"""Plotly figures for the UI: token-length histograms and the training loss curve.

The only module that imports plotly. Functions take plain values (a TokenStats,
StepLogged/EvalDone events, numbers) and return a `go.Figure`; they know nothing
of Gradio, jobs or files. Titles go through `i18n.t` so a figure matches the page.
"""

from __future__ import annotations

import math
from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .i18n import t

MAX_POINTS = 2000  # each timer tick sends the whole figure: keep it small
EMA_WEIGHT = 0.9  # TensorBoard-style smoothing of the train loss
HIST_FIELDS = ("instruction", "output", "prompt", "total")
COLORS = {"train": "#94a3b8", "ema": "#2563eb", "val": "#dc2626", "p95": "#f59e0b", "limit": "#dc2626"}


def _base_layout(fig: go.Figure, height: int) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=40, r=20, t=50, b=40), template="plotly_white",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return fig


def empty_figure(message: str) -> go.Figure:
    """A blank chart that says why there is nothing to plot yet."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
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


def ema(values: Sequence[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Debiased exponential moving average, so the first points are not pulled towards 0."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** i))
    return out


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
        smooth = ema(ys)
        keep = downsample(len(xs))
        few = len(keep) < 50  # markers make the very first steps visible (one step = one dot)
        fig.add_trace(go.Scatter(x=[xs[i] for i in keep], y=[ys[i] for i in keep], name=t("train.chart_loss", lang),
                                 mode="lines+markers" if few else "lines",
                                 line=dict(color=COLORS["train"], width=1)))
        fig.add_trace(go.Scatter(x=[xs[i] for i in keep], y=[smooth[i] for i in keep],
                                 name=t("train.chart_ema", lang), mode="lines",
                                 line=dict(color=COLORS["ema"], width=2)))
    if evals:
        fig.add_trace(go.Scatter(x=[e.step for e in evals], y=[e.val_loss for e in evals],
                                 name=t("train.chart_val", lang), mode="markers+lines",
                                 marker=dict(color=COLORS["val"], size=10, symbol="diamond"),
                                 line=dict(color=COLORS["val"], dash="dot"),
                                 text=[f"epoch {e.epoch}" for e in evals]))
    fig.update_xaxes(title_text=t("train.chart_xaxis", lang), rangemode="tozero")
    fig.update_yaxes(title_text=t("train.chart_yaxis", lang))
    return _base_layout(fig, 360)
