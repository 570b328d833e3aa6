"""The Train tab: layout and wiring of the form, the checks beside Start, Start/Stop and the live view.

The form's values and checks are train_form.py, the live view train_view.py (both plain
functions). The form is a dict of components (`TrainHandles.form`) handed to Gradio as
a set, so handlers receive values by field name. Every form change re-runs the checks
and the estimate beside Start; Start builds a TrainConfig, lets the policy bound it, and
hands it to the machine's JobRunner for this visitor. The live view is fed by a timer
that runs only while a job does (between events it moves only the progress line's clock),
so a reloaded page or a second tab follows the same job. The training loop never runs here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..config import TrainConfig
from ..errors import RuozhiError
from ..i18n import DEFAULT_LANG, t
from ..jobs import JobSnapshot
from .boundary import bind, md_code, md_text, show_errors_beside, user_errors
from .context import AppContext
from .texts import T
from .train_form import (DATA_FIELDS, FORM_FIELDS, INT_FIELDS, build_train_config, form_defaults,  # noqa: F401
                         preflight_markdown, truncation_warning)
from .train_view import (error_markdown, poll_status_dict, probes_html, progress_html,  # noqa: F401
                         render_status)

# Start brings the live view into sight (the form is long: on a laptop the chart was below the fold).
# Once more a moment later: the start event's outputs still re-render above it and push it down.
SCROLL_TO_PROGRESS_JS = """() => { const show = () => document.querySelector('#train-progress')
    ?.scrollIntoView({block: 'start'}); show(); setTimeout(show, 400); setTimeout(show, 1200); }"""


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


def _warning(text: str) -> str:
    return f"<span class='rz-error'>⚠️ {md_text(text)}</span>" if text else ""


def loaded_stats(ctx: AppContext, loaded_key, cfg: TrainConfig):
    """The Data tab's statistics of what it loaded, at the form's limits (cached there), or None."""
    if not loaded_key:
        return None
    from .data_tab import data_stats, load_data

    return data_stats(ctx, load_data(ctx, loaded_key), cfg.data.max_source_length, cfg.data.max_target_length,
                      "train", cfg.data.system_prompt)


def on_form_change(ctx: AppContext, model_spec, trust_remote_code, data_source, n_train, loaded_key, lang,
                   token=None, request=None, **form):
    """Every form change: (estimate, the line beside Start, Start's state). A setting out of bounds is named
    beside Start, in the page's language, and Start waits until it is fixed; a max_target_length that cuts
    most answers of the loaded data is a warning (Start stays on)."""
    visitor = ctx.visitor_of(token, request)
    try:
        cfg = _config(ctx, visitor, model_spec, trust_remote_code, data_source, form)
    except RuozhiError as e:
        problem = ctx.policy.redact(e.localized(lang), visitor)
        return "", _warning(problem), gr.update(interactive=False)
    try:
        estimate = preflight_markdown(cfg, int(n_train or 0), lang, ctx.policy.check_config_shape)
    except RuozhiError as e:  # e.g. a Hub model's config unreachable: Start may still fetch it
        estimate = t("train.estimate_failed", lang, error=md_text(ctx.policy.redact(e.localized(lang), visitor)))
    try:
        warning = truncation_warning(loaded_stats(ctx, loaded_key, cfg), lang)
    except RuozhiError:  # the loaded data's model is gone from the cache and cannot load: no warning to give
        warning = ""
    return estimate, _warning(warning), gr.update(interactive=True)


def on_tick(ctx: AppContext, last_version, lang, token=None, request: gr.Request = None):
    """Timer tick: the visitor's snapshot when it changed; the timer stops once no job of theirs runs."""
    visitor, snap, show, redact = visitor_view(ctx, token, request)
    timer = gr.Timer(active=snap.active)
    stop = gr.update(interactive=snap.status in ("starting", "running"))
    if snap.version == last_version:  # nothing new; while it runs the clock (elapsed, ETA) still moves
        progress = progress_html(snap, lang) if snap.active else gr.skip()
        return (gr.skip(), gr.skip(), progress, *(gr.skip(),) * 5, stop, timer)
    action = gr.skip() if snap.active else ""  # "Started"/"Stop requested" end with the run
    return (snap.version, *render_status(snap, lang, show_path=show, redact=redact), finished_final(snap, visitor),
            action, stop, timer)


def on_refresh(ctx: AppContext, lang, token=None, request: gr.Request = None):
    """Page load and language switch: always push the visitor's current snapshot (and start the timer
    when their job runs)."""
    visitor, snap, show, redact = visitor_view(ctx, token, request)
    return (snap.version, *render_status(snap, lang, show_path=show, redact=redact), gr.skip(), gr.skip(),
            gr.update(interactive=snap.status in ("starting", "running")), gr.Timer(active=snap.active))


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


def public_limits(ctx: AppContext, lang: str) -> str:
    return t("train.public_limits", lang, **dataclasses.asdict(ctx.policy.limits))


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
    check: gr.Markdown  # beside Start: a setting out of bounds, or a warning before a run that cuts answers
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
                self.finished, self.action_status, self.stop_button, self.timer]


def by_name(fn, named: dict):
    """A handler for `inputs=set(named.values())`: Gradio passes {component: value}, `fn` gets keywords."""
    def handler(data: dict, request: gr.Request):
        return fn(**{name: data[component] for name, component in named.items()}, request=request)
    return handler


def _num(name: str, d: dict) -> gr.Number:
    """No minimum/maximum: Gradio's own check toasts "Value 0 is less than minimum value 1." in English and
    names no field; train_form's checks say it beside Start instead."""
    precision = 0 if name in INT_FIELDS else None
    return gr.Number(value=d[name], label=T(f"train.{name}"), precision=precision,
                     elem_id=f"train-{name.replace('_', '-')}")


def visible_gpus() -> int:
    from ..launcher import available_gpus

    return available_gpus()


def build(ctx: AppContext, n_train: gr.State, loaded_key: gr.State) -> TrainHandles:
    """Lay the tab out and wire it; `n_train` (the Data tab's loaded count) feeds the step estimate and
    `loaded_key` (what the Data tab loaded) the warning about answers cut short."""
    d = form_defaults()
    form = {}
    with gr.Tab(T("train.tab"), id="train", elem_id="tab-train") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                form["method"] = gr.Radio([(T("train.method_full"), "full"), (T("train.method_lora"), "lora")],
                                          value=d["method"], label=T("train.method"), elem_id="train-method")
                with gr.Group(visible=d["method"] == "lora") as lora_group:
                    with gr.Row():
                        form["lora_rank"] = _num("lora_rank", d)
                        form["lora_alpha"] = _num("lora_alpha", d)
                        form["lora_dropout"] = _num("lora_dropout", d)
                    form["save_merged"] = gr.Checkbox(value=d["save_merged"], label=T("train.save_merged"),
                                                      elem_id="train-save-merged")
                with gr.Row():
                    form["epochs"], form["batch_size"] = _num("epochs", d), _num("batch_size", d)
                    form["grad_accum_steps"] = _num("grad_accum_steps", d)
                with gr.Row():
                    form["lr"] = _num("lr", d)
                    form["lr_schedule"] = gr.Dropdown(["constant", "cosine"], value=d["lr_schedule"],
                                                      label=T("train.lr_schedule"), elem_id="train-lr-schedule")
                    form["warmup_steps"] = _num("warmup_steps", d)
                with gr.Row():
                    form["max_source_length"] = _num("max_source_length", d)
                    form["max_target_length"] = _num("max_target_length", d)
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
                        form["max_steps"], form["seed"] = _num("max_steps", d), _num("seed", d)
                        form["weight_decay"] = _num("weight_decay", d)
                        form["max_grad_norm"] = _num("max_grad_norm", d)
            with gr.Column(scale=1):
                estimate_button = gr.Button(T("train.estimate_button"), elem_id="train-estimate-button")
                estimate = gr.Markdown(elem_id="train-estimate")
                with gr.Row():
                    start_button = gr.Button(T("train.start"), variant="primary", elem_id="train-start")
                    stop_button = gr.Button(T("train.stop"), variant="stop", interactive=False, elem_id="train-stop")
                check = gr.Markdown(elem_id="train-check")
                if ctx.policy.public:  # the bounds before Start, not after a refusal
                    limits = gr.Markdown(public_limits(ctx, DEFAULT_LANG), elem_id="train-limits")
                    ctx.lang.change(bind(public_limits, ctx), [ctx.lang], [limits], api_visibility="private")
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
                     estimate=estimate, start_button=start_button, stop_button=stop_button, check=check,
                     action_status=action_status, progress=progress, loss_chart=loss_chart, error=error,
                     probes=probes, checkpoints=checkpoints, timer=timer, last_version=last_version,
                     finished=finished)
    _wire(ctx, h, form["method"], lora_group, n_train, loaded_key)
    return h


def _wire(ctx: AppContext, h: TrainHandles, method: gr.Radio, lora_group: gr.Group, n_train: gr.State,
          loaded_key: gr.State) -> None:
    private = dict(api_visibility="private")
    named = dict(model_spec=ctx.model_spec, trust_remote_code=ctx.trust_remote_code, data_source=ctx.data_source,
                 lang=ctx.lang, token=ctx.visitor, **h.form,
                 **({"data_options": ctx.data_options} if ctx.data_options is not None else {}))
    method.change(on_method, [method], [lora_group], **private)
    fetched = h.start_button.click(bind(on_fetch_model, ctx), [ctx.model_spec, ctx.lang], None,
                                   show_progress_on=[h.action_status], **private)
    started = fetched.success(by_name(bind(on_start, ctx), named), set(named.values()), [h.action_status],
                              api_name="start_training")
    started.success(lambda: (gr.Timer(active=True), gr.update(interactive=True)), None, [h.timer, h.stop_button],
                    js=SCROLL_TO_PROGRESS_JS, **private)
    h.stop_button.click(bind(on_stop, ctx), [ctx.lang, ctx.visitor], [h.action_status], api_name="stop_training")
    estimate_named = dict(named, n_train=n_train)
    h.estimate_button.click(by_name(bind(on_estimate, ctx), estimate_named), set(estimate_named.values()),
                            [h.estimate], show_progress_on=[h.estimate], api_name="estimate")
    # Every change of the form, the top bar or the loaded data re-runs the checks and the estimate.
    check_named = dict(named, n_train=n_train, loaded_key=loaded_key)
    check_io = dict(fn=by_name(bind(on_form_change, ctx), check_named), inputs=set(check_named.values()),
                    outputs=[h.estimate, h.check, h.start_button], show_progress="hidden", trigger_mode="always_last",
                    **private)
    for component in (*h.form.values(), ctx.model_spec, ctx.data_source, ctx.trust_remote_code, n_train, loaded_key,
                      ctx.lang):
        if hasattr(component, "change"):
            component.change(**check_io)
    show_errors_beside(ctx, fetched, h.action_status)
    show_errors_beside(ctx, started, h.action_status, clear_on_success=False)  # Start writes its own line
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
