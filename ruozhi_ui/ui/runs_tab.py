"""The Runs tab: past runs (the app's and the CLI's) listed, overlaid, opened in Compare, resumed, deleted,
exported (export_panel.py).

Everything is read from the visitor's runs folder by `runs.py`, so a run started on
the command line appears as well. Resuming continues a run's final checkpoint into a
new run folder (the original is never touched), with the run's own settings shown
read-only and only the number of epochs to choose. Deleting asks for a confirmation
first. Layout and wiring only; handlers are module-level functions of plain values.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import gradio as gr

from .. import plots
from ..checkpoints import CHECKPOINT_CONFIG, is_resumable, sanitize_run_name
from ..config import load_config
from ..errors import ConfigError
from ..i18n import t
from ..runs import RunRecord, delete_run, list_runs
from .boundary import bind, md_code, md_text, user_errors
from . import export_panel
from .context import AppContext
from .texts import T

COLUMNS = ("name", "model", "data", "method", "epochs", "status", "final_val", "best_val", "duration")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def runs_table(records: list[RunRecord], lang: str) -> dict:
    status = lambda r: t("runs.status_incomplete" if r.status == "incomplete" else f"train.status_{r.status}", lang)
    rows = [[r.name, r.model, r.data, r.method, r.epochs, status(r), _loss(r.final_val_loss),
             _loss(r.best_val_loss), _duration(r.duration_s)] for r in records]
    return {"headers": [t(f"runs.col_{c}", lang) for c in COLUMNS], "data": rows}


def visitor_runs(ctx: AppContext, token, request) -> tuple[object, list[RunRecord]]:
    visitor = ctx.visitor_of(token, request)
    snap = ctx.runner.snapshot_for(visitor.id) if ctx.policy.public else ctx.runner.snapshot()
    active = snap.run_dir.rsplit("/", 1)[-1] if snap.active and snap.run_dir else ""
    return visitor, list_runs(visitor.runs_root, active_run=active)


def on_refresh(ctx: AppContext, selected, lang, token=None, request: gr.Request = None):
    """(table, overlay choices and selection, chart, run picker): the newest run overlaid by default."""
    _, records = visitor_runs(ctx, token, request)
    names = [r.name for r in records]
    kept = [n for n in (selected or []) if n in names] or names[:1]
    chart = plots.runs_figure([r for r in records if r.name in kept], lang)
    empty = "" if records else t("runs.none", lang)
    return (runs_table(records, lang), gr.CheckboxGroup(choices=names, value=kept), chart,
            gr.Dropdown(choices=names, value=names[0] if names else None), empty)


def on_overlay(ctx: AppContext, selected, lang, token=None, request: gr.Request = None):
    _, records = visitor_runs(ctx, token, request)
    return plots.runs_figure([r for r in records if r.name in (selected or [])], lang)


def _record(ctx: AppContext, name, token, request) -> RunRecord:
    _, records = visitor_runs(ctx, token, request)
    found = next((r for r in records if r.name == name), None)
    if found is None:
        raise ConfigError(key="err.runs.not_yours", name=name)
    return found


@user_errors()
def on_open_in_compare(ctx: AppContext, name, lang, token=None, request: gr.Request = None):
    """Switch to Compare with the run's final checkpoint picked."""
    record = _record(ctx, name, token, request)
    if not record.final_checkpoint:
        raise ConfigError(key="runs.no_final")
    return record.final_checkpoint, gr.Tabs(selected="compare")


def on_ask_delete(name, lang):
    if not name:
        return gr.update(visible=False), ""
    return gr.update(visible=True), t("runs.confirm_delete", lang, name=md_code(name))


@user_errors()
def on_delete(ctx: AppContext, name, selected, lang, token=None, request: gr.Request = None):
    visitor, records = visitor_runs(ctx, token, request)
    active = next((r.name for r in records if r.status == "running"), "")
    delete_run(visitor.runs_root, name or "", active_run=active)
    return (gr.update(visible=False), t("runs.deleted", lang, name=md_code(name)),
            *on_refresh(ctx, selected, lang, token, request))


def resumable_checkpoint(ctx: AppContext, name, token, request):
    """(the run's final checkpoint path, its config) when it can be continued, else (None, None)."""
    visitor = ctx.visitor_of(token, request)
    record = _record(ctx, name, token, request)
    if not record.final_checkpoint:
        return None, None
    path = ctx.policy.resolve_checkpoint(record.final_checkpoint, visitor)
    if not is_resumable(path):
        return None, None
    return path, load_config(path / CHECKPOINT_CONFIG)


def on_pick(ctx: AppContext, name, lang, token=None, request: gr.Request = None):
    """The picked run's settings (read-only) and a sensible total for a continuation."""
    if not name:
        return "", gr.update(), gr.update(interactive=False)
    try:
        path, cfg = resumable_checkpoint(ctx, name, token, request)
    except ConfigError:
        path, cfg = None, None
    if cfg is None:
        return t("runs.resume_none", lang), gr.update(), gr.update(interactive=False)
    shown = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume_from",)}
    text = "```json\n" + json.dumps(shown, ensure_ascii=False, indent=1).replace("```", "'''") + "\n```"
    return text, gr.update(value=cfg.epochs + 1, minimum=cfg.epochs + 1), gr.update(interactive=True)


@user_errors("errors.start_failed")
def on_resume(ctx: AppContext, name, epochs, lang, token=None, request: gr.Request = None):
    """Continue the run's final checkpoint for more epochs as a new run (`<name>-cont`, `-cont-2`, ...)."""
    visitor = ctx.visitor_of(token, request)
    path, saved = resumable_checkpoint(ctx, name, token, request)
    if saved is None:
        raise ConfigError(key="runs.resume_none")
    try:
        epochs = int(epochs)
    except (TypeError, ValueError):
        raise ConfigError(key="err.form.whole", name="epochs") from None
    if epochs <= saved.epochs:
        raise ConfigError(key="err.runs.more_epochs", epochs=saved.epochs)
    cfg = dataclasses.replace(saved, epochs=epochs, resume_from=str(path), max_steps=0,
                              run_name=sanitize_run_name(f"{name}-cont"))
    cfg = ctx.policy.check_train_config(cfg, visitor)
    busy = ctx.runner.busy_for(visitor.id)
    if busy:
        raise busy
    ctx.policy.make_room(visitor, keep=(path.parent.parent,))
    ctx.runner.start(cfg, owner=visitor.id, runs_root=visitor.runs_root)
    return t("runs.resumed", lang, checkpoint=md_code(record_name(path, visitor)), name=md_text(cfg.run_name))


def record_name(path, visitor) -> str:
    return str(path.relative_to(visitor.runs_root.resolve())) if path.is_relative_to(visitor.runs_root.resolve()) \
        else path.name


@dataclass
class RunsHandles:
    tab: gr.Tab
    refresh: gr.Button
    table: gr.Dataframe
    empty: gr.Markdown
    selected: gr.CheckboxGroup
    chart: gr.Plot
    pick: gr.Dropdown
    open_compare: gr.Button
    delete: gr.Button
    confirm: gr.Group
    confirm_text: gr.Markdown
    delete_yes: gr.Button
    delete_no: gr.Button
    status: gr.Markdown
    settings: gr.Markdown
    resume_epochs: gr.Number
    resume: gr.Button
    export: export_panel.ExportHandles


def build(ctx: AppContext) -> RunsHandles:
    with gr.Tab(T("runs.tab"), id="runs", elem_id="tab-runs") as tab:
        with gr.Row():
            refresh = gr.Button(T("runs.refresh"), size="sm", scale=0, elem_id="runs-refresh")
        empty = gr.Markdown(elem_id="runs-empty")
        table = gr.Dataframe(label=T("runs.table"), interactive=False, wrap=True, elem_id="runs-table")
        selected = gr.CheckboxGroup(choices=[], label=T("runs.selected"), elem_id="runs-selected")
        chart = gr.Plot(show_label=False, elem_id="runs-chart")
        with gr.Row(equal_height=True):
            pick = gr.Dropdown(choices=[], label=T("runs.pick"), scale=3, elem_id="runs-pick")
            open_compare = gr.Button(T("runs.open_compare"), scale=1, elem_id="runs-open-compare")
            delete = gr.Button(T("runs.delete"), variant="stop", scale=1, elem_id="runs-delete")
        with gr.Group(visible=False, elem_id="runs-confirm") as confirm:
            confirm_text = gr.Markdown(elem_id="runs-confirm-text")
            with gr.Row():
                delete_yes = gr.Button(T("runs.delete_yes"), variant="stop", size="sm", elem_id="runs-delete-yes")
                delete_no = gr.Button(T("runs.delete_no"), size="sm", elem_id="runs-delete-no")
        status = gr.Markdown(elem_id="runs-status")
        with gr.Accordion(T("runs.resume_title"), open=False, elem_id="runs-resume"):
            settings = gr.Markdown(elem_id="runs-settings")
            with gr.Row(equal_height=True):
                resume_epochs = gr.Number(value=None, precision=0, minimum=1, label=T("runs.resume_epochs"),
                                          elem_id="runs-resume-epochs")
                resume = gr.Button(T("runs.resume_button"), variant="primary", interactive=False,
                                   elem_id="runs-resume-button")
        export = export_panel.build(ctx)
    return RunsHandles(tab=tab, refresh=refresh, table=table, empty=empty, selected=selected, chart=chart, pick=pick,
                       open_compare=open_compare, delete=delete, confirm=confirm, confirm_text=confirm_text,
                       delete_yes=delete_yes, delete_no=delete_no, status=status, settings=settings,
                       resume_epochs=resume_epochs, resume=resume, export=export)


def wire(ctx: AppContext, h: RunsHandles, tabs: gr.Tabs, compare_checkpoint: gr.Dropdown, load_event):
    """Connect the tab; returns the Resume click's event (the shell starts the Train tab's timer after it)."""
    private = dict(api_visibility="private")
    listing = [h.table, h.selected, h.chart, h.pick, h.empty]
    refresh_io = dict(fn=bind(on_refresh, ctx), inputs=[h.selected, ctx.lang, ctx.visitor], outputs=listing,
                      **private)
    pick_io = dict(fn=bind(on_pick, ctx), inputs=[h.pick, ctx.lang, ctx.visitor],
                   outputs=[h.settings, h.resume_epochs, h.resume], **private)
    for trigger in (h.refresh.click, h.tab.select, ctx.lang.change, load_event.then):
        trigger(**refresh_io).then(**pick_io)  # the picked run may have finished since it was picked
    h.selected.input(bind(on_overlay, ctx), [h.selected, ctx.lang, ctx.visitor], [h.chart], **private)
    h.open_compare.click(bind(on_open_in_compare, ctx), [h.pick, ctx.lang, ctx.visitor], [compare_checkpoint, tabs],
                         **private)
    h.delete.click(on_ask_delete, [h.pick, ctx.lang], [h.confirm, h.confirm_text], **private)
    h.delete_no.click(lambda: gr.update(visible=False), None, [h.confirm], **private)
    h.delete_yes.click(bind(on_delete, ctx), [h.pick, h.selected, ctx.lang, ctx.visitor],
                       [h.confirm, h.status, *listing], **private)
    h.pick.change(**pick_io)
    export_panel.wire(ctx, h.export, h.pick)
    return h.resume.click(bind(on_resume, ctx), [h.pick, h.resume_epochs, ctx.lang, ctx.visitor], [h.status],
                          api_name="resume_run")
