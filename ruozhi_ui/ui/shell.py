"""The app shell: top bar (model, trust_remote_code, language, dataset source), the three tabs, launch kwargs.

`build_app(runner=None, runs_root=None, policy=None)` composes the tabs around one
AppContext; tests inject a JobRunner, a runs folder and a policy (public mode is
tested on 127.0.0.1 with `Policy(mode="public")`). `LAUNCH_KWARGS` is the one dict of
theme/css/i18n that `app.py` and the tests both hand to `launch()`. No torch or
transformers import happens here, so the page serves in a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .. import specs
from ..checkpoints import runs_root as default_runs_root
from ..config import DEFAULT_DATASET, DEFAULT_MODEL
from ..data import MAX_FILE_BYTES
from ..i18n import DEFAULT_LANG, t
from ..hub import HubStatus
from ..jobs import JobRunner
from ..policy import TOKEN, Policy, new_token, policy_from_env
from . import compare_tab, data_tab, runs_tab, train_tab
from . import guard
from .boundary import bind
from .boundary import md_code
from .context import AppContext
from .texts import PICK_LANGUAGE_JS, STORE_LANGUAGE_JS, T, language_updates, toast_title_css, translations

LANG_CHOICES = (("中文", "zh"), ("English", "en"))
VISITOR_STORAGE_KEY = "ruozhi-visitor"
CSS = """
.rz-progress { margin: 4px 0 8px; }
.rz-bar { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.rz-fill { height: 100%; background: var(--color-accent); transition: width .5s; }
.rz-fill.rz-failed { background: #dc2626; } .rz-fill.rz-stopped { background: #f59e0b; }
.rz-meta { font-size: 0.9em; margin-top: 4px; color: var(--body-text-color-subdued); }
#app-offline { border: 1px solid #f59e0b; border-radius: 8px; padding: 8px; }
#app-trust-warning, #app-model-note { color: #b45309; }
#app-top { align-items: center; }
#app-lang { flex: 0 0 auto !important; width: auto !important; }
#app-lang .wrap { flex-wrap: nowrap; gap: 2px; }
#app-lang label { padding: 2px 10px; }
.rz-error { color: #b91c1c; font-weight: 500; }
.rz-muted { color: var(--body-text-color-subdued); }
.rz-probes { border-collapse: collapse; width: 100%; table-layout: fixed; font-size: 0.92em; }
.rz-probes th, .rz-probes td { border: 1px solid var(--border-color-primary); padding: 4px 6px; vertical-align: top;
  text-align: left; overflow-wrap: anywhere; }
.rz-probes thead th:first-child { width: 28%; }
.rz-probes tbody th { font-weight: 500; }
.rz-probes summary { cursor: pointer; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#train-checkpoints code { overflow-wrap: anywhere; white-space: normal; }
.rz-answer { white-space: pre-wrap; margin-top: 4px; }
#compare-base-chat .label-wrap, #compare-tuned-chat .label-wrap { white-space: nowrap; }
#compare-base-label, #compare-tuned-label { min-height: 2.6em; }
.rz-details summary { cursor: pointer; font-weight: 500; }
.rz-details code { display: block; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.85em; }
label span, [data-testid="block-info"] { overflow-wrap: anywhere; }
@media (max-width: 640px) {
  /* Gradio puts a row's form fields into one .form box: stack them, one field a line */
  #app-bar .form { flex-direction: column; }
  #app-bar .form > * { min-width: 100% !important; }
  #app-top { flex-wrap: wrap; }
  .rz-probes tbody th { width: auto; }
  #data-preview, #data-stats, #compare-ab-table, #runs-table { overflow-x: auto; }
  /* a table keeps readable columns and scrolls sideways instead of cutting headers to one character */
  #data-preview table, #compare-ab-table table, #runs-table table { min-width: 600px; }
  /* Plotly's toolbar sat over the chart's label and legend; the chart's own label says what the axes say */
  .js-plotly-plot .modebar-container { display: none !important; }
  #train-loss-chart [data-testid="block-label"], #runs-chart [data-testid="block-label"] { display: none; }
  #compare-base-chat .label-wrap, #compare-tuned-chat .label-wrap { white-space: normal; overflow-wrap: anywhere; }
}
"""
# max_file_size: Gradio refuses an upload data.py would refuse anyway, before it fills the temp folder.
# app_kwargs: the guard middleware (ui/guard.py) in front of every route; it reads the policy `build_app` installs.
LAUNCH_KWARGS = dict(theme=gr.themes.Soft(), css=CSS + toast_title_css(), max_file_size=MAX_FILE_BYTES,
                     app_kwargs=guard.APP_KWARGS)
# Gradio's own temp files (uploads are copied out of them at once) go after a day, checked hourly.
DELETE_CACHE = (3600, 86400)


def needs_hub(model_spec: str, source: str, look_at_disk: bool = True) -> bool:
    """True when the model or the dataset would come from the Hugging Face Hub."""
    return (specs.model_kind(model_spec or "", look_at_disk) == "hub"
            or specs.data_kind(source or "", look_at_disk) == "hub")


def offline_notice(model_spec: str, source: str, lang: str, look_at_disk: bool = True):
    """After a failed load: offer the offline fallbacks when the Hub was involved."""
    if not needs_hub(model_spec, source, look_at_disk):
        return gr.update(visible=False), ""
    return gr.update(visible=True), t("app.offline_notice", lang, model=md_code(model_spec), source=md_code(source))


def offline_buttons(model_spec: str, source: str, look_at_disk: bool = True):
    """The offline box offers only what is still to apply: "use demo" while the model is a Hub one, "use
    sample" while the data is; once both are applied nothing is left to click."""
    return (gr.update(visible=specs.model_kind(model_spec or "", look_at_disk) == "hub"),
            gr.update(visible=specs.data_kind(source or "", look_at_disk) == "hub"))


def offline_text(hub, model_spec: str, source: str, lang: str, look_at_disk: bool = True) -> str:
    """A language switch: the offline box's text again, in the new language (shown or not, the page knows)."""
    if hub is not None and not hub.online(wait_s=0):
        return t("app.offline_start", lang)
    return offline_notice(model_spec, source, lang, look_at_disk)[1] or gr.skip()


def use_demo_model(source: str):
    """Switch to the offline model; the notice stays while the dataset still needs the Hub."""
    return "demo", gr.update(visible=needs_hub("demo", source, look_at_disk=False))


def use_bundled_sample(model_spec: str):
    return "sample", "sample", gr.update(visible=needs_hub(model_spec, "sample", look_at_disk=False))


def trust_warning(trusted: bool, lang: str):
    return gr.update(value=t("app.trust_warning", lang) if trusted else "", visible=bool(trusted))


def model_note(model_spec: str, lang: str) -> str:
    return t("app.demo_note", lang) if (model_spec or "").strip().lower() == "demo" else ""


def offline_start(hub, model_spec: str, source: str, lang: str):
    """Page load: when the Hub cannot be reached, open with the demo model and the bundled sample and say
    why (instead of a first Load that waits through retries); online, keep the Hub defaults."""
    if hub is None or hub.online():
        return gr.skip(), gr.skip(), gr.skip(), gr.update(visible=False), gr.skip()
    model = "demo" if specs.model_kind(model_spec or "", look_at_disk=False) == "hub" else model_spec
    data = "sample" if specs.data_kind(source or "", look_at_disk=False) == "hub" else source
    return model, data, "sample" if data == "sample" else gr.skip(), gr.update(visible=True), \
        t("app.offline_start", lang)


def ensure_visitor(token):
    """Page load: the browser keeps its visitor token; a browser without one (or with a bad one) gets one."""
    return token if isinstance(token, str) and TOKEN.match(token) else new_token()


def build_app(runner: JobRunner | None = None, runs_root: Path | None = None, policy: Policy | None = None,
              hub: HubStatus | None = None) -> gr.Blocks:
    """The whole UI. Tests pass their own runner (e.g. max_steps runs), runs folder, policy and Hub status."""
    root = Path(runs_root) if runs_root else (runner.runs_root if runner else default_runs_root())
    policy = policy or policy_from_env(root)
    runner = runner or JobRunner(policy.runs_root)
    hub = hub or HubStatus()
    private = dict(api_visibility="private")
    with gr.Blocks(title="ruozhi-sft studio", delete_cache=DELETE_CACHE) as demo:
        visitor = gr.BrowserState(None, storage_key=VISITOR_STORAGE_KEY)
        with gr.Row(equal_height=True, elem_id="app-top"):
            gr.Markdown(T("app.title"), elem_id="app-title")
            lang = gr.Radio([list(c) for c in LANG_CHOICES], value=DEFAULT_LANG, show_label=False, container=False,
                            elem_id="app-lang", scale=0, min_width=190)
        if policy.public:
            gr.Markdown(T("app.public_mode"), elem_id="app-mode")
        with gr.Row(equal_height=True, elem_id="app-bar"):
            models = list(policy.allowed_models) if policy.public else [DEFAULT_MODEL, "demo"]
            # Custom values pass Gradio so that the policy refuses them with its own words (public mode).
            # Public mode's info texts offer only what public mode allows (no server folder, no file path).
            info = ("app.model_info_public", "app.data_source_info_public") if policy.public else \
                ("app.model_info", "app.data_source_info")
            model_spec = gr.Dropdown(models, value=DEFAULT_MODEL, allow_custom_value=True, label=T("app.model"),
                                     info=T(info[0]), elem_id="app-model", scale=3)
            data_source = gr.Textbox(DEFAULT_DATASET, label=T("app.data_source"), info=T(info[1]),
                                     elem_id="app-data-source", scale=3)
            # Public mode: no checkbox at all; only the operator's allowlist runs remote code (policy).
            trust = gr.State(False) if policy.public else gr.Checkbox(False, label=T("app.trust_remote_code"),
                                                                     elem_id="app-trust", scale=1)
        trust_md = gr.Markdown(visible=False, elem_id="app-trust-warning")
        note_md = gr.Markdown(elem_id="app-model-note")
        with gr.Group(visible=False, elem_id="app-offline") as offline_group:
            offline_md = gr.Markdown(elem_id="app-offline-text")
            with gr.Row():
                demo_button = gr.Button(T("app.use_demo"), size="sm", elem_id="app-use-demo")
                sample_button = gr.Button(T("app.use_sample"), size="sm", elem_id="app-use-sample")

        ctx = AppContext(policy=policy, runner=runner, visitor=visitor, model_spec=model_spec,
                         trust_remote_code=trust, data_source=data_source, lang=lang, hub=hub)
        with gr.Tabs(elem_id="app-tabs") as tabs:
            data = data_tab.build(ctx)
            train = train_tab.build(ctx, data.n_train, data.loaded_key)
            with gr.Tab(T("app.compare_tab"), id="compare", elem_id="tab-compare") as compare_block:
                compare = compare_tab.build(ctx)
            runs = runs_tab.build(ctx)
        data_tab.wire(ctx, data, train.form)
        # The language comes first: every later page-load step reads it (it raced with the offline notice,
        # which came up in Chinese on 2 of 12 English loads).
        visitor_known = wire_language(demo, lang).then(ensure_visitor, [visitor], [visitor], **private).then(
            lambda m, s, lg: offline_start(hub, m, s, lg), [model_spec, data_source, lang],
            [model_spec, data_source, data.source_kind, offline_group, offline_md], **private)
        compare_tab.wire_page_load(visitor_known, compare_block, ctx, compare)
        train_tab.wire_page_load(visitor_known, ctx, train)
        resumed = runs_tab.wire(ctx, runs, tabs, compare.checkpoint, visitor_known)
        resumed.success(lambda: gr.Timer(active=True), None, [train.timer], **private)  # follow the new run
        # A run that ends while the page is open becomes Compare's pick.
        train.finished.change(bind(compare_tab.on_run_finished, ctx), [train.finished, visitor], [compare.checkpoint],
                              **private)

        if not policy.public:
            trust.change(trust_warning, [trust, lang], [trust_md], **private)
            lang.change(trust_warning, [trust, lang], [trust_md], **private)
        model_spec.change(model_note, [model_spec, lang], [note_md], **private)
        lang.change(model_note, [model_spec, lang], [note_md], **private)
        look = not policy.public  # a public page never learns whether a server path exists
        data.load_event.failure(lambda m, s, lg: offline_notice(m, s, lg, look), [model_spec, data_source, lang],
                                [offline_group, offline_md], **private)
        data.load_event.success(lambda: gr.update(visible=False), None, [offline_group], **private)
        lang.change(lambda m, s, lg: offline_text(hub, m, s, lg, look), [model_spec, data_source, lang], [offline_md],
                    **private)
        for top in (model_spec, data_source):
            top.change(lambda m, s: offline_buttons(m, s, look), [model_spec, data_source],
                       [demo_button, sample_button], **private)
        demo_button.click(use_demo_model, [data_source], [model_spec, offline_group], **private)
        sample_button.click(use_bundled_sample, [model_spec], [data_source, data.source_kind, offline_group],
                            **private)
    guard.install(demo, policy, runner)
    # With SYSTEM=spaces Gradio's page adds a Spaces header when it is opened outside huggingface.co's frame:
    # it asks huggingface.co/api/spaces/... and loads Google Fonts from the browser. The page makes no outside
    # request (the server asks the Hub, hub.py): without a space id the header is never built.
    demo.space_id = None
    return demo


def wire_language(demo: gr.Blocks, lang: gr.Radio):
    """The one switch: on page load the stored (or the browser's) language, on a click the new one; the
    server re-renders every fixed text, and `lang.change` re-renders what handlers made. Returns the page-load
    event, which every other page-load step follows."""
    items = translations(demo)
    components = [item.component for item in items]

    def apply(choice: str):
        return [choice, *language_updates(items, choice)]

    private = dict(api_visibility="private", queue=False, show_progress="hidden")
    lang.input(apply, [lang], [lang, *components], js=STORE_LANGUAGE_JS, **private)
    return demo.load(apply, [lang], [lang, *components], js=PICK_LANGUAGE_JS, **private)
