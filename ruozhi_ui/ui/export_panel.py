"""The Runs tab's Export panel: the picked run's checkpoint as a zip, GGUF + Modelfile, or a Hub repo.

Layout and wiring only; the work is `ruozhi_ui.export`, run as the visitor's export job (progress
and Cancel; the page polls a snapshot with a timer, so a reload finds the job again). Server-side
rules, hidden endpoints included: a public visitor exports only their own checkpoints (the policy
resolves them), within the export size limit and their disk quota, one export at a time, and
pushes only with their own Hugging Face sign-in (never the Space's token). The files an export
writes live in the visitor's runs folder under `.exports/`, replaced by their next export.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..checkpoints import EXPORTS_DIR, sanitize_run_name
from ..errors import ConfigError, PolicyError
from ..export import FORMATS, QUANTS, ExportRequest, choose_token, run_export
from ..export.source import checkpoint_files, files_bytes
from ..i18n import t
from ..runs import checkpoint_names
from .boundary import bind, md_code, md_text, user_errors
from .context import AppContext
from .texts import T

POLL_S = 1.0


def checkpoints_of(ctx: AppContext, run, token, request) -> list[str]:
    """The visitor's checkpoints of one run, `final` first."""
    if not run:
        return []
    visitor = ctx.visitor_of(token, request)
    return [c for c in checkpoint_names(visitor.runs_root) if c.startswith(f"{run}/checkpoints/")]


def on_pick(ctx: AppContext, run, token=None, request: gr.Request = None):
    names = checkpoints_of(ctx, run, token, request)
    return gr.Dropdown(choices=names, value=names[0] if names else None)


def space_oauth() -> bool:
    """Whether "Sign in with Hugging Face" is real here: a Space with `hf_oauth: true` sets OAUTH_CLIENT_ID.
    Elsewhere Gradio's LoginButton signs everyone in with the server's own token (read at start-up)."""
    return bool(os.environ.get("OAUTH_CLIENT_ID"))


def oauth_token_of(policy, oauth) -> str | None:
    """The visitor's own Hugging Face token, only from a real sign-in, never the server's."""
    if not policy.public or oauth is None or not space_oauth():
        return None
    return getattr(oauth, "token", None) or None


@user_errors()
def on_start(ctx: AppContext, checkpoint, fmt, quant, repo_id, private, merged, with_gguf, typed_token, lang,
             token=None, oauth: gr.OAuthToken | None = None, request: gr.Request = None):
    """Check everything the export needs, then start it as the visitor's job."""
    visitor = ctx.visitor_of(token, request)
    if fmt not in FORMATS:
        raise ConfigError(key="err.export.format", formats=", ".join(FORMATS))
    if quant not in QUANTS:
        raise ConfigError(key="err.export.quant", quant=str(quant)[:20], quants=", ".join(QUANTS))
    path = ctx.policy.resolve_checkpoint(checkpoint or "", visitor)
    hub_token = None
    if fmt == "hub":
        repo_id = ctx.policy.check_text(repo_id, "repo id", max_chars=200)
        typed = None if ctx.policy.public else ctx.policy.check_text(typed_token, "token", max_chars=500)
        hub_token = choose_token(ctx.policy.public, oauth_token_of(ctx.policy, oauth), typed)
    ctx.policy.check_export(visitor, files_bytes(checkpoint_files(path)))
    folder = visitor.runs_root / EXPORTS_DIR
    name = sanitize_run_name(f"{path.parent.parent.name}-{path.name}")
    output = folder / {"zip": f"{name}.zip", "gguf": f"{name}-gguf", "hub": f"{name}-hub"}[fmt]
    request_ = ExportRequest(checkpoint=path, format=fmt, output=output, quant=quant, repo_id=repo_id or "",
                             private=bool(private), merged=bool(merged), with_gguf=bool(with_gguf), token=hub_token,
                             uploads_dir=visitor.uploads)

    def work(progress):
        if folder.exists():  # the visitor's previous export goes: one export's files at a time
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        result = run_export(request_, progress)
        if fmt == "hub":  # the staging copy is on the Hub now
            shutil.rmtree(output, ignore_errors=True)
            return type(result)(files=(), url=result.url)
        return result

    ctx.exports.start(visitor.id, fmt, work)
    return render(ctx, lang, token, request) + (gr.Timer(active=True),)


def on_cancel(ctx: AppContext, lang, token=None, request: gr.Request = None):
    ctx.exports.cancel(ctx.visitor_of(token, request).id)
    return render(ctx, lang, token, request)


def render(ctx: AppContext, lang, token=None, request: gr.Request = None) -> tuple:
    """(status text, files to download, cancel button) for the visitor's export job."""
    visitor = ctx.visitor_of(token, request)
    snap = ctx.exports.snapshot_for(visitor.id)
    if snap.status == "idle":
        return "", gr.File(value=None, visible=False), gr.Button(interactive=False)
    if snap.active:
        text = t("export.running", lang, stage=t(snap.stage, lang), percent=f"{snap.done * 100:.0f}")
    elif snap.status == "done":
        text = t("export.done_hub", lang, url=snap.url) if snap.url else t("export.done", lang)
    elif snap.status == "cancelled":
        text = t("export.cancelled", lang)
    else:
        error = ctx.policy.redact(snap.error.localized(lang), visitor) if snap.error else ""
        text = "⚠️ " + md_text(error)
    files = [f for f in snap.files if Path(f).is_file()] if snap.status == "done" else []
    return (text, gr.File(value=files or None, visible=bool(files)), gr.Button(interactive=snap.active))


def on_tick(ctx: AppContext, seen, lang, token=None, request: gr.Request = None):
    """Timer: the job's state when it changed; the timer stops once the job has ended."""
    snap = ctx.exports.snapshot_for(ctx.visitor_of(token, request).id)
    if snap.version == seen:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=snap.active)
    return (*render(ctx, lang, token, request), snap.version, gr.Timer(active=snap.active))


@dataclass
class ExportHandles:
    checkpoint: gr.Dropdown
    format: gr.Radio
    quant: gr.Radio
    repo_id: gr.Textbox
    private: gr.Checkbox
    merged: gr.Checkbox
    with_gguf: gr.Checkbox
    token: gr.Textbox | gr.State
    start: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    files: gr.File
    timer: gr.Timer
    seen: gr.State


def build(ctx: AppContext) -> ExportHandles:
    with gr.Accordion(T("export.title"), open=False, elem_id="export"):
        with gr.Row(equal_height=True):
            # Any value passes Gradio, so that the policy refuses what is not the visitor's, in its own words.
            checkpoint = gr.Dropdown(choices=[], label=T("export.checkpoint"), allow_custom_value=True, scale=3,
                                     elem_id="export-checkpoint")
            fmt = gr.Radio([(T(f"export.format_{f}"), f) for f in FORMATS], value="zip",
                           label=T("export.format"), scale=2, elem_id="export-format")
            quant = gr.Radio([("F16", "f16"), ("Q8_0", "q8_0")], value="f16", label=T("export.quant"), scale=1,
                             elem_id="export-quant")
        with gr.Row(equal_height=True):
            repo_id = gr.Textbox(label=T("export.repo_id"), placeholder="owner/name", scale=2, elem_id="export-repo")
            private = gr.Checkbox(True, label=T("export.private"), scale=1, elem_id="export-private")
            merged = gr.Checkbox(False, label=T("export.merged"), scale=1, elem_id="export-merged")
            with_gguf = gr.Checkbox(False, label=T("export.with_gguf"), scale=1, elem_id="export-with-gguf")
        if ctx.policy.public:  # the visitor's own account: Sign in with Hugging Face; no token field at all
            if space_oauth():
                gr.LoginButton(elem_id="export-login")
            else:
                gr.Markdown(T("export.sign_in_unavailable"), elem_id="export-login-note")
            token = gr.State("")
        else:
            token = gr.Textbox(type="password", label=T("export.token"), info=T("export.token_info"),
                               elem_id="export-token")
        with gr.Row():
            start = gr.Button(T("export.start"), variant="primary", elem_id="export-start")
            cancel = gr.Button(T("export.cancel"), interactive=False, elem_id="export-cancel")
        status = gr.Markdown(elem_id="export-status")
        files = gr.File(label=T("export.files"), file_count="multiple", visible=False, interactive=False,
                        elem_id="export-files")
        timer = gr.Timer(POLL_S, active=False)
        seen = gr.State(-1)
    return ExportHandles(checkpoint=checkpoint, format=fmt, quant=quant, repo_id=repo_id, private=private,
                         merged=merged, with_gguf=with_gguf, token=token, start=start, cancel=cancel, status=status,
                         files=files, timer=timer, seen=seen)


def wire(ctx: AppContext, h: ExportHandles, pick: gr.Dropdown) -> None:
    private = dict(api_visibility="private")
    pick.change(bind(on_pick, ctx), [pick, ctx.visitor], [h.checkpoint], **private)
    shown = [h.status, h.files, h.cancel]
    h.start.click(bind(on_start, ctx), [h.checkpoint, h.format, h.quant, h.repo_id, h.private, h.merged, h.with_gguf,
                                        h.token, ctx.lang, ctx.visitor], [*shown, h.timer], api_name="export_run")
    h.cancel.click(bind(on_cancel, ctx), [ctx.lang, ctx.visitor], shown, **private)
    h.timer.tick(bind(on_tick, ctx), [h.seen, ctx.lang, ctx.visitor], [*shown, h.seen, h.timer], **private)
