"""The Train tab's live view, as pure functions of a JobSnapshot: chart, progress line, probes, checkpoints.

`render_status(snapshot, lang)` is what the tab's timer tick and a language switch show;
nothing here reads Gradio state, the runner or the clock except through its arguments
(`now` for the elapsed time and the ETA between step events), so tests call it with a
hand-made snapshot.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from .. import plots
from ..i18n import t
from ..jobs import JobSnapshot
from .boundary import md_code, md_text


# --- live view (pure) ------------------------------------------------------------------------
def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_html(snap: JobSnapshot, lang: str, now: float | None = None) -> str:
    last = snap.last_step
    num_steps = snap.started.num_steps if snap.started else (last.num_steps if last else 0)
    step = last.step if last else 0
    fraction = 1.0 if snap.status == "finished" else (step / num_steps if num_steps else 0.0)
    parts = [t(f"train.status_{snap.status}", lang)]
    if snap.status == "running" and snap.phase:  # "stopping…" stays until the run has stopped
        parts[0] = t(f"train.phase_{snap.phase}", lang)
    if num_steps:
        parts.append(t("train.progress_step", lang, step=step, num_steps=num_steps))
    epochs = snap.config.get("epochs")
    if last:
        parts.append(t("train.progress_epoch", lang, epoch=last.epoch, epochs=epochs or "?"))
    now = now if now is not None else time.time()
    if snap.started_at:
        parts.append(t("train.progress_elapsed", lang, elapsed=_hms((snap.finished_at or now) - snap.started_at)))
    if last and snap.active:
        parts.append(t("train.progress_eta", lang, eta=_hms(eta_s(snap, now))))
    on_gpu = bool(snap.started) and "cuda" in snap.started.device  # "cuda (…)" or "2 x cuda (…)"
    if last:
        parts.append(t("train.progress_speed_gpu" if on_gpu else "train.progress_speed_cpu", lang,
                       tok_per_s=last.tok_per_s, mem=last.mem_gib))
    if snap.started:
        parts.append(html.escape(how_it_computes(snap.started, lang)))
    meta = " · ".join(parts)
    return (f'<div class="rz-progress" data-status="{snap.status}" data-step="{step}" data-num-steps="{num_steps}">'
            f'<div class="rz-bar"><div class="rz-fill rz-{snap.status}" style="width:{fraction * 100:.1f}%"></div></div>'
            f'<div class="rz-meta">{meta}</div></div>')


def eta_s(snap: JobSnapshot, now: float) -> float:
    """The last step's ETA, counted down since that step arrived: validation and probes send no steps, and
    the clock must not stop while they run."""
    last = snap.last_step
    if last is None:
        return 0.0
    since = now - snap.last_step_at if snap.last_step_at else 0.0
    return max(0.0, last.eta_s - max(0.0, since))


def how_it_computes(started, lang: str) -> str:
    """The device and the precision in plain words ("fp32; eager steps" meant little to anyone)."""
    words = [started.device]
    if started.precision_code:
        words.append(t(f"train.precision_{started.precision_code}", lang))
    if started.steps_code:
        words.append(t(f"train.steps_{started.steps_code.replace('+', '_')}", lang))
    return " · ".join(words) if len(words) > 1 else f"{started.device} · {started.precision}"


PROBE_PREVIEW_CHARS = 40  # a cell shows this much of an answer; a click opens the rest


def probes_html(snap: JobSnapshot, lang: str) -> str:
    """The probe answers as one compact prompt x epoch table; each answer expands on click. Every text
    is escaped: an answer is model output and may hold tags or Markdown."""
    if not snap.samples:
        return f"<p class='rz-muted'>{html.escape(t('train.probes_none', lang))}</p>"
    prompts = list(dict.fromkeys(p for sample in snap.samples for p, _ in sample.answers))
    head = "".join(f"<th>{html.escape(t('train.probes_epoch', lang, epoch=s.epoch, step=s.step))}</th>"
                   for s in snap.samples)
    rows = []
    for prompt in prompts:
        cells = []
        for sample in snap.samples:
            answer = dict(sample.answers).get(prompt, "").strip()
            if not answer:
                cells.append(f"<td class='rz-muted'>{html.escape(t('train.probe_empty', lang))}</td>")
                continue
            short = answer if len(answer) <= PROBE_PREVIEW_CHARS else answer[:PROBE_PREVIEW_CHARS] + "…"
            cells.append(f"<td><details><summary>{html.escape(short)}</summary>"
                         f"<div class='rz-answer'>{html.escape(answer)}</div></details></td>")
        rows.append(f"<tr><th scope='row'>{html.escape(prompt)}</th>{''.join(cells)}</tr>")
    return (f"<table class='rz-probes'><thead><tr><th>{html.escape(t('train.probe_prompt', lang))}</th>{head}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def checkpoints_markdown(snap: JobSnapshot, lang: str, show_path=str) -> str:
    if not snap.checkpoints:
        return t("train.checkpoints_none", lang)
    per_epoch = snap.started.steps_per_epoch if snap.started else 0
    epoch_of = lambda step: -(-step // per_epoch) if per_epoch else step  # 1-based, as the probes count
    on_disk = bool(snap.run_dir) and Path(snap.run_dir).is_dir()
    kept = [c for c in snap.checkpoints if not on_disk or Path(c.path).exists()]  # keep_checkpoints pruned the rest
    lines = [t("train.checkpoint_line", lang, epoch=epoch_of(c.step), step=c.step, path=md_code(show_path(c.path)))
             + (" — " + t("train.checkpoint_final", lang) if c.final else "") for c in kept]
    if snap.run_dir:
        lines.append("\n" + t("train.run_dir", lang, path=md_code(show_path(snap.run_dir))))
    return "\n".join(f"- {line}" if not line.startswith("\n") else line for line in lines)


def error_markdown(snap: JobSnapshot, lang: str, redact=str) -> str:
    if snap.status != "failed":
        return ""
    text = t("train.failed", lang, error=md_text(redact(snap.error)))
    return text + ("\n\n" + t("train.hint", lang, hint=md_text(snap.hint)) if snap.hint else "")


def render_status(snap: JobSnapshot, lang: str = "zh", now: float | None = None, show_path=str, redact=str):
    """(loss figure, progress html, probes markdown, checkpoints markdown, error markdown).
    `show_path`/`redact` present paths as the visitor may see them (public mode: relative)."""
    if snap.status == "idle":
        figure = plots.empty_figure(t("train.chart_idle", lang))
    else:
        figure = plots.loss_figure(snap.steps, snap.evals, lang)
    return (figure, progress_html(snap, lang, now), probes_html(snap, lang),
            checkpoints_markdown(snap, lang, show_path), error_markdown(snap, lang, redact))


def poll_status_dict(snap: JobSnapshot, show_path=str, redact=str) -> dict:
    """A JSON-able summary of a job, for API clients and tests."""
    last = snap.last_step
    return {"version": snap.version, "status": snap.status, "active": snap.active, "run_dir": show_path(snap.run_dir),
            "step": last.step if last else 0,
            "num_steps": snap.started.num_steps if snap.started else (last.num_steps if last else 0),
            "epoch": last.epoch if last else 0.0, "loss": last.loss if last else None,
            "losses": [e.loss for e in snap.steps][-50:], "val_losses": [e.val_loss for e in snap.evals],
            "checkpoints": [show_path(c.path) for c in snap.checkpoints], "error": redact(snap.error), "hint": snap.hint}
