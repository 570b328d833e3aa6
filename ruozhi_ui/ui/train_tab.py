"""The Train tab: the TrainConfig form, a pre-flight estimate, Start/Stop and the live view.

Defaults are read from the TrainConfig dataclass, never restated. Start builds a
TrainConfig (`build_train_config`) and hands it to the process's JobRunner; the
live view is `render_status(snapshot, lang)`, a pure function fed by one always-on
timer that skips when the snapshot's version has not changed, so a reloaded page
or a second browser tab follows the same job. The training loop never runs here.
"""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass
from functools import partial

import gradio as gr

from .. import plots
from ..config import ModelConfig, TrainConfig, validate
from ..errors import ConfigError, RuozhiError
from ..i18n import t
from ..jobs import JobRunner, JobSnapshot
from .context import AppContext

L = gr.I18n()
DEFAULTS = TrainConfig()
INT_FIELDS = ("epochs", "batch_size", "grad_accum_steps", "warmup_steps", "max_source_length", "max_target_length",
              "lora_rank", "lora_alpha", "max_steps", "seed")
FLOAT_FIELDS = ("lr", "lora_dropout", "weight_decay", "max_grad_norm")
DATA_FIELDS = ("max_source_length", "max_target_length")
# The form's fields in the order of the Start handler's inputs (after model, trust, source).
FORM_FIELDS = ("method", "epochs", "batch_size", "grad_accum_steps", "lr", "lr_schedule", "warmup_steps",
               "max_source_length", "max_target_length", "packing", "run_name", "save_merged", "lora_rank",
               "lora_alpha", "lora_dropout", "max_steps", "seed", "weight_decay", "max_grad_norm")


def form_defaults() -> dict:
    """Every form field's default, read from TrainConfig / DataConfig."""
    return {name: getattr(DEFAULTS.data if name in DATA_FIELDS else DEFAULTS, name) for name in FORM_FIELDS}


def _number(name: str, value, kind):
    if value is None or value == "":
        raise ConfigError(f"{name} is empty; enter a number")
    if kind is int:
        if float(value) != int(float(value)):
            raise ConfigError(f"{name} must be a whole number, got {value}")
        return int(float(value))
    return float(value)


def build_train_config(model_spec: str, trust_remote_code: bool, data_source: str, **form) -> TrainConfig:
    """Widget values -> a validated TrainConfig; fields not on the form keep their defaults."""
    unknown = set(form) - set(FORM_FIELDS)
    if unknown:
        raise ConfigError(f"unknown form field(s): {', '.join(sorted(unknown))}")
    values = {**form_defaults(), **form}
    for name in INT_FIELDS:
        values[name] = _number(name, values[name], int)
    for name in FLOAT_FIELDS:
        values[name] = _number(name, values[name], float)
    values["packing"], values["save_merged"] = bool(values["packing"]), bool(values["save_merged"])
    data = dataclasses.replace(DEFAULTS.data, source=(data_source or "").strip(),
                               **{k: values.pop(k) for k in DATA_FIELDS})
    model = ModelConfig(spec=(model_spec or "").strip(), trust_remote_code=bool(trust_remote_code))
    return validate(dataclasses.replace(DEFAULTS, model=model, data=data, **values))


# --- pre-flight estimate ---------------------------------------------------------------------
def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def preflight_markdown(cfg: TrainConfig, n_train: int, lang: str) -> str:
    from ..preflight import estimate

    est = estimate(cfg, n_train)
    steps = str(est.num_steps) if est.num_steps is not None else t("train.steps_unknown", lang)
    return t("train.estimate", lang, trained=_fmt_count(est.params_trained), total=_fmt_count(est.params_total),
             share=est.params_trained / max(1, est.params_total), steps=steps, mem=est.memory_gib,
             weights=est.weights_gib, optim=est.optimizer_gib, act=est.activations_gib)


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
    if num_steps:
        parts.append(t("train.progress_step", lang, step=step, num_steps=num_steps))
    epochs = snap.config.get("epochs")
    if last:
        parts.append(t("train.progress_epoch", lang, epoch=last.epoch, epochs=epochs or "?"))
    if snap.started_at:
        end = snap.finished_at or (now if now is not None else time.time())
        parts.append(t("train.progress_elapsed", lang, elapsed=_hms(end - snap.started_at)))
    if last and snap.active:
        parts.append(t("train.progress_eta", lang, eta=_hms(last.eta_s)))
    if last:
        parts.append(t("train.progress_speed", lang, tok_per_s=last.tok_per_s, mem=last.mem_gib))
    if snap.started:
        parts.append(html.escape(f"{snap.started.device} · {snap.started.precision}"))
    meta = " · ".join(parts)
    return (f'<div class="rz-progress" data-status="{snap.status}" data-step="{step}" data-num-steps="{num_steps}">'
            f'<div class="rz-bar"><div class="rz-fill rz-{snap.status}" style="width:{fraction * 100:.1f}%"></div></div>'
            f'<div class="rz-meta">{meta}</div></div>')


def probes_markdown(snap: JobSnapshot, lang: str) -> str:
    if not snap.samples:
        return t("train.probes_none", lang)
    out = []
    for sample in snap.samples:
        out.append("#### " + t("train.probes_epoch", lang, epoch=sample.epoch, step=sample.step))
        for prompt, answer in sample.answers:
            quoted = "\n".join("> " + line for line in (answer.strip() or "∅").splitlines())
            out.append(f"**{prompt}**\n\n{quoted}\n")
    return "\n".join(out)


def checkpoints_markdown(snap: JobSnapshot, lang: str) -> str:
    if not snap.checkpoints:
        return t("train.checkpoints_none", lang)
    lines = [t("train.checkpoint_line", lang, epoch=c.epoch, step=c.step, path=c.path)
             + (" — " + t("train.checkpoint_final", lang) if c.final else "") for c in snap.checkpoints]
    if snap.run_dir:
        lines.append("\n" + t("train.run_dir", lang, path=snap.run_dir))
    return "\n".join(f"- {line}" if not line.startswith("\n") else line for line in lines)


def error_markdown(snap: JobSnapshot, lang: str) -> str:
    if snap.status != "failed":
        return ""
    text = t("train.failed", lang, error=snap.error)
    return text + ("\n\n" + t("train.hint", lang, hint=snap.hint) if snap.hint else "")


def render_status(snap: JobSnapshot, lang: str = "zh", now: float | None = None):
    """(loss figure, progress html, probes markdown, checkpoints markdown, error markdown)."""
    if snap.status == "idle":
        figure = plots.empty_figure(t("train.chart_idle", lang))
    else:
        figure = plots.loss_figure(snap.steps, snap.evals, lang)
    return (figure, progress_html(snap, lang, now), probes_markdown(snap, lang), checkpoints_markdown(snap, lang),
            error_markdown(snap, lang))


def poll_status(runner: JobRunner) -> dict:
    """A JSON-able summary of the job, for API clients and tests."""
    s = runner.snapshot()
    last = s.last_step
    return {"version": s.version, "status": s.status, "active": s.active, "run_dir": s.run_dir,
            "step": last.step if last else 0,
            "num_steps": s.started.num_steps if s.started else (last.num_steps if last else 0),
            "epoch": last.epoch if last else 0.0, "loss": last.loss if last else None,
            "losses": [e.loss for e in s.steps][-50:], "val_losses": [e.val_loss for e in s.evals],
            "checkpoints": [c.path for c in s.checkpoints], "error": s.error, "hint": s.hint}


# --- Gradio boundary -------------------------------------------------------------------------
def _config_from_widgets(model_spec, trust_remote_code, data_source, values, lang):
    try:
        return build_train_config(model_spec, trust_remote_code, data_source, **dict(zip(FORM_FIELDS, values)))
    except RuozhiError as e:
        raise gr.Error(t("errors.config", lang, error=str(e))) from None


def on_start(runner: JobRunner, model_spec, trust_remote_code, data_source, lang, *values):
    cfg = _config_from_widgets(model_spec, trust_remote_code, data_source, values, lang)
    try:
        runner.start(cfg)
    except RuozhiError as e:  # JobConflict, or a ConfigError from validate
        raise gr.Error(t("errors.start_failed", lang, error=str(e))) from None
    return t("train.started", lang, run_name=cfg.run_name)


def on_fetch_model(model_spec, lang, progress=gr.Progress(track_tqdm=True)):
    """Before Start: download a Hub model here, in an event, so the page shows the download's progress."""
    from ..models import fetch_model_files  # lazy: torch loads on first use, not at app start

    try:
        fetch_model_files(model_spec or "")
    except RuozhiError as e:
        raise gr.Error(t("errors.start_failed", lang, error=str(e))) from None


def on_stop(runner: JobRunner, lang):
    return t("train.stop_requested" if runner.stop() else "train.nothing_to_stop", lang)


def on_estimate(model_spec, trust_remote_code, data_source, n_train, lang, *values):
    cfg = _config_from_widgets(model_spec, trust_remote_code, data_source, values, lang)
    try:
        return preflight_markdown(cfg, int(n_train or 0), lang)
    except RuozhiError as e:
        return t("train.estimate_failed", lang, error=str(e))  # advisory only: the run may still work


def on_tick(runner: JobRunner, last_version, lang):
    snap = runner.snapshot()
    if snap.version == last_version:
        return (gr.skip(),) * 6
    return (snap.version, *render_status(snap, lang))


def on_refresh(runner: JobRunner, lang):
    """Page load and language switch: always push the current snapshot."""
    snap = runner.snapshot()
    return (snap.version, *render_status(snap, lang))


def form_values_from_config(config: dict) -> dict:
    """A job's config (as `config_to_dict` stores it) -> the form's values: the inverse of build_train_config."""
    return {name: (config["data"] if name in DATA_FIELDS else config)[name] for name in FORM_FIELDS}


def on_page_load_form(runner: JobRunner):
    """A reloaded page shows the running job's settings, not the defaults (top bar, then FORM_FIELDS)."""
    snap = runner.snapshot()
    if not snap.active or not snap.config:
        return (gr.skip(),) * (3 + len(FORM_FIELDS))
    c, values = snap.config, form_values_from_config(snap.config)
    return (c["model"]["spec"], c["model"]["trust_remote_code"], c["data"]["source"],
            *(values[name] for name in FORM_FIELDS))


def on_method(method):
    return gr.update(visible=method == "lora")


# --- layout and wiring -----------------------------------------------------------------------
@dataclass
class TrainHandles:
    tab: gr.Tab
    inputs: dict  # form field name -> component, in FORM_FIELDS order
    max_source_length: gr.Number
    max_target_length: gr.Number
    estimate_button: gr.Button
    estimate: gr.Markdown
    start_button: gr.Button
    stop_button: gr.Button
    action_status: gr.Markdown
    progress: gr.HTML
    loss_chart: gr.Plot
    error: gr.Markdown
    probes: gr.Markdown
    checkpoints: gr.Markdown
    timer: gr.Timer
    last_version: gr.State

    @property
    def live_outputs(self) -> list:
        return [self.last_version, self.loss_chart, self.progress, self.probes, self.checkpoints, self.error]


def _num(name: str, d: dict, **kw) -> gr.Number:
    precision = 0 if name in INT_FIELDS else None
    return gr.Number(value=d[name], label=L(f"train.{name}"), precision=precision,
                     elem_id=f"train-{name.replace('_', '-')}", **kw)


def build(ctx: AppContext, n_train: gr.State) -> TrainHandles:
    """Lay the tab out and wire it; `n_train` (the Data tab's loaded count) feeds the step estimate."""
    d = form_defaults()
    with gr.Tab(L("train.tab"), id="train", elem_id="tab-train") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                method = gr.Radio([(L("train.method_full"), "full"), (L("train.method_lora"), "lora")],
                                  value=d["method"], label=L("train.method"), elem_id="train-method")
                with gr.Group(visible=d["method"] == "lora") as lora_group:
                    with gr.Row():
                        lora_rank, lora_alpha = _num("lora_rank", d, minimum=1), _num("lora_alpha", d, minimum=1)
                        lora_dropout = _num("lora_dropout", d, minimum=0, maximum=0.99)
                    save_merged = gr.Checkbox(value=d["save_merged"], label=L("train.save_merged"),
                                              elem_id="train-save-merged")
                with gr.Row():
                    epochs, batch_size = _num("epochs", d, minimum=1), _num("batch_size", d, minimum=1)
                    grad_accum_steps = _num("grad_accum_steps", d, minimum=1)
                with gr.Row():
                    lr = _num("lr", d, minimum=0)
                    lr_schedule = gr.Dropdown(["constant", "cosine"], value=d["lr_schedule"],
                                              label=L("train.lr_schedule"), elem_id="train-lr-schedule")
                    warmup_steps = _num("warmup_steps", d, minimum=0)
                with gr.Row():
                    max_source_length = _num("max_source_length", d, minimum=8)
                    max_target_length = _num("max_target_length", d, minimum=1)
                    packing = gr.Checkbox(value=d["packing"], label=L("train.packing"), elem_id="train-packing")
                run_name = gr.Textbox(value=d["run_name"], label=L("train.run_name"), elem_id="train-run-name")
                with gr.Accordion(L("train.advanced"), open=False):
                    with gr.Row():
                        max_steps, seed = _num("max_steps", d, minimum=0), _num("seed", d)
                        weight_decay, max_grad_norm = _num("weight_decay", d, minimum=0), _num("max_grad_norm", d, minimum=0)
            with gr.Column(scale=1):
                estimate_button = gr.Button(L("train.estimate_button"), elem_id="train-estimate-button")
                estimate = gr.Markdown(elem_id="train-estimate")
                with gr.Row():
                    start_button = gr.Button(L("train.start"), variant="primary", elem_id="train-start")
                    stop_button = gr.Button(L("train.stop"), variant="stop", elem_id="train-stop")
                action_status = gr.Markdown(elem_id="train-action-status")
        progress = gr.HTML(elem_id="train-progress")
        error = gr.Markdown(elem_id="train-error")
        loss_chart = gr.Plot(label=L("train.loss_chart"), elem_id="train-loss-chart")
        with gr.Row():
            with gr.Column(scale=2):
                probes = gr.Markdown(elem_id="train-probes")
            with gr.Column(scale=1):
                checkpoints = gr.Markdown(elem_id="train-checkpoints")
        timer, last_version = gr.Timer(1.0), gr.State(-1)

    local = locals()
    inputs = {name: local[name] for name in FORM_FIELDS}
    h = TrainHandles(tab, inputs, max_source_length, max_target_length, estimate_button, estimate, start_button,
                     stop_button, action_status, progress, loss_chart, error, probes, checkpoints, timer,
                     last_version)
    _wire(ctx, h, method, lora_group, n_train)
    return h


def _wire(ctx: AppContext, h: TrainHandles, method: gr.Radio, lora_group: gr.Group, n_train: gr.State) -> None:
    private = dict(api_visibility="private")
    form = list(h.inputs.values())
    top = [ctx.model_spec, ctx.trust_remote_code, ctx.data_source]
    method.change(on_method, [method], [lora_group], **private)
    h.start_button.click(on_fetch_model, [ctx.model_spec, ctx.lang], None, **private).success(
        partial(on_start, ctx.runner), top + [ctx.lang] + form, [h.action_status], api_name="start_training")
    h.stop_button.click(partial(on_stop, ctx.runner), [ctx.lang], [h.action_status], api_name="stop_training")
    estimate_io = dict(inputs=top + [n_train, ctx.lang] + form, outputs=[h.estimate])
    h.estimate_button.click(on_estimate, **estimate_io, api_name="estimate")
    n_train.change(on_estimate, **estimate_io, **private)
    h.timer.tick(partial(on_tick, ctx.runner), [h.last_version, ctx.lang], h.live_outputs, **private,
                 show_progress="hidden")
    ctx.lang.change(partial(on_refresh, ctx.runner), [ctx.lang], h.live_outputs, **private)


def wire_page_load(demo: gr.Blocks, ctx: AppContext, h: TrainHandles) -> None:
    """A reloaded page or a second tab shows the running job at once; `poll_status` for API clients."""
    demo.load(partial(on_refresh, ctx.runner), [ctx.lang], h.live_outputs, api_visibility="private")
    demo.load(partial(on_page_load_form, ctx.runner), None,
              [ctx.model_spec, ctx.trust_remote_code, ctx.data_source, *h.inputs.values()], api_visibility="private")
    gr.api(partial(poll_status, ctx.runner), api_name="poll_status")  # outside gr.Tabs: it is not a component
