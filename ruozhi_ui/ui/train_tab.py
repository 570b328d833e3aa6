"""The Train tab: the TrainConfig form, a pre-flight estimate, Start/Stop and the live view.

Defaults are read from the TrainConfig dataclass, never restated. The form is a dict
of components (`TrainHandles.form`) handed to Gradio as a set, so handlers receive
values by field name. Start builds a TrainConfig (`build_train_config`), lets the
policy bound it, and hands it to the machine's JobRunner for this visitor; the live
view is `render_status(snapshot, lang)`, a pure function fed by a timer that runs
only while a job does and skips when the snapshot's version has not changed, so a
reloaded page or a second tab follows the same job. The training loop never runs here.
"""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .. import plots
from ..config import ModelConfig, TrainConfig, validate
from ..errors import ConfigError
from ..i18n import t
from ..jobs import JobSnapshot
from ..zerogpu import visitor_line
from .boundary import bind, md_code, md_text, show_errors_beside, user_errors
from .context import AppContext
from .texts import T

DEFAULTS = TrainConfig()
INT_FIELDS = ("epochs", "batch_size", "grad_accum_steps", "warmup_steps", "max_source_length", "max_target_length",
              "lora_rank", "lora_alpha", "max_steps", "seed", "gpus")
FLOAT_FIELDS = ("lr", "lora_dropout", "weight_decay", "max_grad_norm")
DATA_FIELDS = ("max_source_length", "max_target_length", "system_prompt")
# The form's fields in the order of the Start handler's inputs (after model, trust, source).
FORM_FIELDS = ("method", "epochs", "batch_size", "grad_accum_steps", "lr", "lr_schedule", "warmup_steps",
               "max_source_length", "max_target_length", "packing", "run_name", "save_merged", "lora_rank",
               "lora_alpha", "lora_dropout", "max_steps", "seed", "weight_decay", "max_grad_norm", "system_prompt",
               "gpus", "shard")


def form_defaults() -> dict:
    """Every form field's default, read from TrainConfig / DataConfig."""
    return {name: getattr(DEFAULTS.data if name in DATA_FIELDS else DEFAULTS, name) for name in FORM_FIELDS}


def _number(name: str, value, kind):
    if value is None or value == "":
        raise ConfigError(key="err.form.empty", name=name)
    try:
        number = float(value) if not isinstance(value, int) or isinstance(value, bool) else value
    except (TypeError, ValueError):
        raise ConfigError(key="err.form.number", name=name, value=repr(str(value)[:40])) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(key="err.form.finite", name=name)
    if kind is int:
        if isinstance(number, float) and number != int(number):
            raise ConfigError(key="err.form.whole_got", name=name, value=value)
        return int(number)
    return float(number)


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


def preflight_markdown(cfg: TrainConfig, n_train: int, lang: str, check_config=None) -> str:
    from ..preflight import estimate

    import torch

    est = estimate(cfg, n_train, check_config)
    steps = str(est.num_steps) if est.num_steps is not None else t("train.steps_unknown", lang)
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return t("train.estimate", lang, trained=_fmt_count(est.params_trained), total=_fmt_count(est.params_total),
             memory=t("train.memory_gpu" if on_gpu else "train.memory_cpu", lang),
             share=est.params_trained / max(1, est.params_total), steps=steps, mem=est.memory_gib,
             weights=est.weights_gib, optim=est.optimizer_gib, act=est.activations_gib) \
        + visitor_line(cfg, est, n_train, lang)  # on a ZeroGPU Space: the quota it spends, in how many leases


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
    if snap.active and snap.phase:
        parts[0] = t(f"train.phase_{snap.phase}", lang)
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


# --- Gradio handlers -------------------------------------------------------------------------
def visitor_view(ctx: AppContext, token, request):
    """(visitor, their job's snapshot, path presenter, text redactor)."""
    visitor = ctx.visitor_of(token, request)
    snap = ctx.runner.snapshot_for(visitor.id) if ctx.policy.public else ctx.runner.snapshot()
    return (visitor, snap, lambda path: ctx.policy.show_path(path, visitor),
            lambda text: ctx.policy.redact(text, visitor))


def finished_final(snap: JobSnapshot, visitor) -> str | None:
    """`<run>/checkpoints/final` of a job that has ended with one (what Compare switches to), else None."""
    final = next((c.path for c in reversed(snap.checkpoints) if c.final), None)
    if snap.active or final is None:
        return None
    path, root = Path(final).resolve(), visitor.runs_root.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else None


def poll_status(ctx: AppContext, token: str | None = None, request: gr.Request = None) -> dict:
    """The visitor's job as JSON (`/poll_status`); in public mode never another visitor's."""
    _, snap, show, redact = visitor_view(ctx, token, request)
    return poll_status_dict(snap, show, redact)


def _config(ctx: AppContext, visitor, model_spec, trust_remote_code, data_source, form: dict) -> TrainConfig:
    cfg = build_train_config(model_spec, trust_remote_code, data_source, **form)
    return ctx.policy.check_train_config(cfg, visitor)


@user_errors("errors.start_failed")
def on_start(ctx: AppContext, model_spec, trust_remote_code, data_source, lang, token=None, request=None, **form):
    visitor = ctx.visitor_of(token, request)
    cfg = _config(ctx, visitor, model_spec, trust_remote_code, data_source, form)
    busy = ctx.runner.busy_for(visitor.id)
    if busy:  # before touching the disk: nothing of the other run is said but how long it has left
        raise busy
    ctx.policy.make_room(visitor)
    ctx.runner.start(cfg, owner=visitor.id, runs_root=visitor.runs_root)
    return t("train.started", lang, run_name=md_code(cfg.run_name))


@user_errors("errors.start_failed")
def on_fetch_model(ctx: AppContext, model_spec, lang, progress=gr.Progress(track_tqdm=True)):
    """Before Start: download a Hub model here, in an event, so the page shows the download's progress."""
    from ..models import fetch_model_files  # lazy: torch loads on first use, not at app start

    fetch_model_files(ctx.policy.check_model(model_spec or ""))


def on_stop(ctx: AppContext, lang, token=None, request: gr.Request = None):
    visitor = ctx.visitor_of(token, request)
    stopped = ctx.runner.stop(owner=visitor.id if ctx.policy.public else None)
    return t("train.stop_requested" if stopped else "train.nothing_to_stop", lang)


@user_errors("train.estimate_failed")
def on_estimate(ctx: AppContext, model_spec, trust_remote_code, data_source, n_train, lang, token=None,
                request=None, **form):
    visitor = ctx.visitor_of(token, request)
    cfg = _config(ctx, visitor, model_spec, trust_remote_code, data_source, form)
    return preflight_markdown(cfg, int(n_train or 0), lang, ctx.policy.check_config_shape)


def on_tick(ctx: AppContext, last_version, lang, token=None, request: gr.Request = None):
    """Timer tick: the visitor's snapshot when it changed; the timer stops once no job of theirs runs."""
    visitor, snap, show, redact = visitor_view(ctx, token, request)
    timer = gr.Timer(active=snap.active)
    if snap.version == last_version:
        return (gr.skip(),) * 8 + (timer,)
    action = gr.skip() if snap.active else ""  # "Started"/"Stop requested" end with the run
    return (snap.version, *render_status(snap, lang, show_path=show, redact=redact), finished_final(snap, visitor),
            action, timer)


def on_refresh(ctx: AppContext, lang, token=None, request: gr.Request = None):
    """Page load and language switch: always push the visitor's current snapshot (and start the timer
    when their job runs)."""
    visitor, snap, show, redact = visitor_view(ctx, token, request)
    return (snap.version, *render_status(snap, lang, show_path=show, redact=redact), gr.skip(), gr.skip(),
            gr.Timer(active=snap.active))


def form_values_from_config(config: dict) -> dict:
    """A job's config (as `config_to_dict` stores it) -> the form's values: the inverse of build_train_config."""
    return {name: (config["data"] if name in DATA_FIELDS else config)[name] for name in FORM_FIELDS}


def on_page_load_form(ctx: AppContext, token=None, request: gr.Request = None):
    """A reloaded page shows the visitor's running job's settings, not the defaults (top bar, then FORM_FIELDS)."""
    _, snap, _, _ = visitor_view(ctx, token, request)
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
    form: dict  # form field name -> component, in FORM_FIELDS order
    estimate_button: gr.Button
    estimate: gr.Markdown
    start_button: gr.Button
    stop_button: gr.Button
    action_status: gr.Markdown
    progress: gr.HTML
    loss_chart: gr.Plot
    error: gr.Markdown
    probes: gr.HTML
    checkpoints: gr.Markdown
    timer: gr.Timer
    last_version: gr.State
    finished: gr.State  # `<run>/checkpoints/final` of the visitor's job once it has ended (Compare follows it)

    @property
    def live_outputs(self) -> list:
        return [self.last_version, self.loss_chart, self.progress, self.probes, self.checkpoints, self.error,
                self.finished, self.action_status, self.timer]


def by_name(fn, named: dict):
    """A handler for `inputs=set(named.values())`: Gradio passes {component: value}, `fn` gets keywords."""
    def handler(data: dict, request: gr.Request):
        return fn(**{name: data[component] for name, component in named.items()}, request=request)
    return handler


def _num(name: str, d: dict, **kw) -> gr.Number:
    precision = 0 if name in INT_FIELDS else None
    return gr.Number(value=d[name], label=T(f"train.{name}"), precision=precision,
                     elem_id=f"train-{name.replace('_', '-')}", **kw)


def visible_gpus() -> int:
    from ..launcher import available_gpus

    return available_gpus()


def build(ctx: AppContext, n_train: gr.State) -> TrainHandles:
    """Lay the tab out and wire it; `n_train` (the Data tab's loaded count) feeds the step estimate."""
    d = form_defaults()
    form = {}
    with gr.Tab(T("train.tab"), id="train", elem_id="tab-train") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                form["method"] = gr.Radio([(T("train.method_full"), "full"), (T("train.method_lora"), "lora")],
                                          value=d["method"], label=T("train.method"), elem_id="train-method")
                with gr.Group(visible=d["method"] == "lora") as lora_group:
                    with gr.Row():
                        form["lora_rank"] = _num("lora_rank", d, minimum=1)
                        form["lora_alpha"] = _num("lora_alpha", d, minimum=1)
                        form["lora_dropout"] = _num("lora_dropout", d, minimum=0, maximum=0.99)
                    form["save_merged"] = gr.Checkbox(value=d["save_merged"], label=T("train.save_merged"),
                                                      elem_id="train-save-merged")
                with gr.Row():
                    form["epochs"], form["batch_size"] = _num("epochs", d, minimum=1), _num("batch_size", d, minimum=1)
                    form["grad_accum_steps"] = _num("grad_accum_steps", d, minimum=1)
                with gr.Row():
                    form["lr"] = _num("lr", d, minimum=0)
                    form["lr_schedule"] = gr.Dropdown(["constant", "cosine"], value=d["lr_schedule"],
                                                      label=T("train.lr_schedule"), elem_id="train-lr-schedule")
                    form["warmup_steps"] = _num("warmup_steps", d, minimum=0)
                with gr.Row():
                    form["max_source_length"] = _num("max_source_length", d, minimum=8)
                    form["max_target_length"] = _num("max_target_length", d, minimum=1)
                    form["packing"] = gr.Checkbox(value=d["packing"], label=T("train.packing"), elem_id="train-packing")
                form["run_name"] = gr.Textbox(value=d["run_name"], label=T("train.run_name"), elem_id="train-run-name")
                gpus = visible_gpus()
                with gr.Row(visible=gpus > 1):  # one GPU (or none): nothing to choose
                    form["gpus"] = gr.Dropdown(list(range(1, gpus + 1)) if gpus > 1 else [1], value=d["gpus"],
                                               label=T("train.gpus"), elem_id="train-gpus")
                    form["shard"] = gr.Radio([(T("train.shard_auto"), "auto"), ("DDP", "ddp"), ("FSDP2", "fsdp")],
                                             value=d["shard"], label=T("train.shard"), elem_id="train-shard")
                with gr.Accordion(T("train.advanced"), open=False):
                    form["system_prompt"] = gr.Textbox(value=d["system_prompt"], label=T("train.system_prompt"),
                                                       lines=1, elem_id="train-system-prompt")
                    with gr.Row():
                        form["max_steps"], form["seed"] = _num("max_steps", d, minimum=0), _num("seed", d)
                        form["weight_decay"] = _num("weight_decay", d, minimum=0)
                        form["max_grad_norm"] = _num("max_grad_norm", d, minimum=0)
            with gr.Column(scale=1):
                estimate_button = gr.Button(T("train.estimate_button"), elem_id="train-estimate-button")
                estimate = gr.Markdown(elem_id="train-estimate")
                with gr.Row():
                    start_button = gr.Button(T("train.start"), variant="primary", elem_id="train-start")
                    stop_button = gr.Button(T("train.stop"), variant="stop", elem_id="train-stop")
                action_status = gr.Markdown(elem_id="train-action-status")
        progress = gr.HTML(elem_id="train-progress")
        error = gr.Markdown(elem_id="train-error")
        loss_chart = gr.Plot(label=T("train.loss_chart"), elem_id="train-loss-chart")
        with gr.Row():
            with gr.Column(scale=2):
                probes = gr.HTML(elem_id="train-probes")
            with gr.Column(scale=1):
                checkpoints = gr.Markdown(elem_id="train-checkpoints")
        timer, last_version, finished = gr.Timer(1.0, active=False), gr.State(-1), gr.State(None)

    h = TrainHandles(tab=tab, form={name: form[name] for name in FORM_FIELDS}, estimate_button=estimate_button,
                     estimate=estimate, start_button=start_button, stop_button=stop_button,
                     action_status=action_status, progress=progress, loss_chart=loss_chart, error=error,
                     probes=probes, checkpoints=checkpoints, timer=timer, last_version=last_version,
                     finished=finished)
    _wire(ctx, h, form["method"], lora_group, n_train)
    return h


def _wire(ctx: AppContext, h: TrainHandles, method: gr.Radio, lora_group: gr.Group, n_train: gr.State) -> None:
    private = dict(api_visibility="private")
    named = dict(model_spec=ctx.model_spec, trust_remote_code=ctx.trust_remote_code, data_source=ctx.data_source,
                 lang=ctx.lang, token=ctx.visitor, **h.form)
    method.change(on_method, [method], [lora_group], **private)
    fetched = h.start_button.click(bind(on_fetch_model, ctx), [ctx.model_spec, ctx.lang], None,
                                   show_progress_on=[h.action_status], **private)
    started = fetched.success(by_name(bind(on_start, ctx), named), set(named.values()), [h.action_status],
                              api_name="start_training")
    started.success(lambda: gr.Timer(active=True), None, [h.timer], **private)
    h.stop_button.click(bind(on_stop, ctx), [ctx.lang, ctx.visitor], [h.action_status], api_name="stop_training")
    estimate_named = dict(named, n_train=n_train)
    estimate_io = dict(fn=by_name(bind(on_estimate, ctx), estimate_named), inputs=set(estimate_named.values()),
                       outputs=[h.estimate], show_progress_on=[h.estimate])
    estimated = [h.estimate_button.click(**estimate_io, api_name="estimate"), n_train.change(**estimate_io, **private)]
    show_errors_beside(ctx, fetched, h.action_status)
    for event in (started, *estimated):  # Start writes its own line; an estimate leaves it as it was
        show_errors_beside(ctx, event, h.action_status, clear_on_success=False)
    h.timer.tick(bind(on_tick, ctx), [h.last_version, ctx.lang, ctx.visitor], h.live_outputs, **private,
                 show_progress="hidden")
    ctx.lang.change(bind(on_refresh, ctx), [ctx.lang, ctx.visitor], h.live_outputs, **private)


def wire_page_load(load_event, ctx: AppContext, h: TrainHandles) -> None:
    """After the visitor is known: a reloaded page or a second tab shows the visitor's running job at once."""
    load_event.then(bind(on_refresh, ctx), [ctx.lang, ctx.visitor], h.live_outputs, api_visibility="private")
    load_event.then(bind(on_page_load_form, ctx), [ctx.visitor],
                    [ctx.model_spec, ctx.trust_remote_code, ctx.data_source, *h.form.values()],
                    api_visibility="private")

    def poll(token: str | None = None, request: gr.Request = None) -> dict:  # gr.api reads these hints
        return poll_status(ctx, token, request)

    gr.api(poll, api_name="poll_status")  # outside gr.Tabs: it is not a component
