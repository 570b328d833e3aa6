"""Compare tab: base vs fine-tuned side by side, streaming, plus a batch A/B table.

Layout and wiring only; every handler is a module-level function of plain values
(testable without a browser) that calls `generation`. Each pane is titled with the
exact weights it used. Stop both cancels the streaming event and sets the
session's cancel events, so `generate()` itself stops, not just the UI.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.i18n import I18nData

from .. import generation as g
from ..checkpoints import list_checkpoints
from ..config import DEFAULT_SYSTEM_PROMPT, REFERENCE_PROMPTS, DataConfig, GenConfig
from ..data import load_source
from ..errors import ConfigError, RuozhiError
from ..i18n import t
from ..models import fetch_model_files
from .context import AppContext

AB_MAX_PROMPTS = 500  # the A/B table runs two full generations per prompt


@dataclass
class CompareHandles:
    checkpoint: gr.Dropdown
    refresh: gr.Button
    system_prompt: gr.Textbox
    max_new_tokens: gr.Slider
    do_sample: gr.Checkbox
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    repetition_penalty: gr.Slider
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    clear: gr.Button
    base_label: gr.Markdown
    tuned_label: gr.Markdown
    base_chat: gr.Chatbot
    tuned_chat: gr.Chatbot
    ab_source: gr.Radio
    ab_limit: gr.Number
    ab_prompts: gr.Textbox
    ab_run: gr.Button
    ab_loss: gr.Markdown
    ab_table: gr.Dataframe
    ab_csv: gr.File
    runs_root: gr.State


# ---------------------------------------------------------------- pure helpers

def content_text(content) -> str:
    """A chat message's text: gradio 6 gives a string, a block list, or a dict (files carry no text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(content_text(part) for part in content)
    return str(content)


def _field(message, name: str):
    return message.get(name) if isinstance(message, dict) else getattr(message, name, None)


def history_pairs(history) -> list[tuple[str, str]]:
    """Messages-format chat history -> (user, assistant) pairs; a trailing unanswered user turn is dropped."""
    pairs, user = [], None
    for message in history or []:
        role, text = _field(message, "role"), content_text(_field(message, "content"))
        if role == "user":
            if user is not None:  # two user turns in a row: the first got no answer
                pairs.append((user, ""))
            user = text
        elif role == "assistant" and user is not None:
            pairs.append((user, text))
            user = None
    return pairs


def pending_message(history) -> str | None:
    """The last user turn still waiting for an answer, or None."""
    if history and _field(history[-1], "role") == "user":
        return content_text(_field(history[-1], "content"))
    return None


def gen_config_from_widgets(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty) -> GenConfig:
    gen = GenConfig(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
                    top_p=float(top_p), top_k=int(top_k), repetition_penalty=float(repetition_penalty))
    if gen.max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be at least 1")
    if gen.do_sample and not (gen.temperature > 0 and 0 < gen.top_p <= 1 and gen.top_k >= 0):
        raise ConfigError("sampling needs temperature > 0, top-p in (0, 1] and top-k >= 0")
    if gen.repetition_penalty <= 0:
        raise ConfigError("repetition_penalty must be above 0 (1.0 = off)")
    return gen


def checkpoint_choices(runs_root) -> list[tuple[str, str]]:
    """(run/checkpoints/name, absolute path) for the dropdown, newest first."""
    root = Path(runs_root)
    return [(str(p.relative_to(root)) if p.is_relative_to(root) else str(p), str(p)) for p in list_checkpoints(root)]


def base_title(spec: str, lang: str) -> str:
    return t("compare.base_title", lang, label=g.describe_base(spec)) if spec else ""


def tuned_title(checkpoint: str | None, lang: str) -> str:
    return t("compare.tuned_title", lang, label=g.describe_checkpoint(checkpoint)) if checkpoint else t("compare.tuned_none", lang)


def _ui_error(e: Exception, lang: str) -> gr.Error:
    return gr.Error(t("compare.error", lang, detail=str(e)))


# ---------------------------------------------------------------- cancel registry

_active: dict[str, set[threading.Event]] = {}  # session -> events of its running generations
_active_lock = threading.Lock()


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def _register(request) -> threading.Event:
    event = threading.Event()
    with _active_lock:
        _active.setdefault(_session(request), set()).add(event)
    return event


def _unregister(request, event: threading.Event) -> None:
    with _active_lock:
        _active.get(_session(request), set()).discard(event)


# ---------------------------------------------------------------- handlers

def refresh_checkpoints(runs_root: str, current: str | None) -> gr.Dropdown:
    choices = checkpoint_choices(runs_root)
    paths = [path for _, path in choices]
    return gr.Dropdown(choices=choices, value=current if current in paths else (paths[0] if paths else None))


def on_checkpoint_change(checkpoint: str | None, system_prompt: str, lang: str) -> tuple[str, str]:
    """(system prompt, tuned title): the checkpoint's training system prompt replaces the box."""
    try:
        trained_with = g.checkpoint_system_prompt(checkpoint) if checkpoint else None
    except RuozhiError:
        trained_with = None  # a damaged run_config must not block picking; loading reports it
    return (trained_with if trained_with is not None else system_prompt), tuned_title(checkpoint, lang)


def on_base_change(spec: str, lang: str) -> str:
    return base_title(spec, lang)


def append_user(message: str, base_history: list, tuned_history: list, lang: str) -> tuple[str, list, list]:
    if not message or not message.strip():
        raise gr.Error(t("compare.err_empty", lang))
    turn = {"role": "user", "content": message}
    return "", [*(base_history or []), turn], [*(tuned_history or []), dict(turn)]


def load_pair(base_spec: str, checkpoint: str | None, trust_remote_code: bool, lang: str):
    if not checkpoint:
        raise gr.Error(t("compare.err_no_checkpoint", lang))
    try:
        base = g.get_model(base_spec, trust_remote_code=bool(trust_remote_code))
        tuned = g.get_model(checkpoint, trust_remote_code=bool(trust_remote_code))
        g.check_pair(base, tuned)
    except RuozhiError as e:
        raise _ui_error(e, lang) from None
    return base, tuned


def fetch_base_model(base_spec: str, checkpoint: str | None, lang: str, progress=gr.Progress(track_tqdm=True)):
    """Before the first answer: download a Hub base model in its own event, so the base pane shows the
    download's progress instead of a silent wait. A no-op once cached, for `demo` and for folders."""
    if not checkpoint:  # say so before a 1 GB download, not after
        raise gr.Error(t("compare.err_no_checkpoint", lang))
    try:
        fetch_model_files(base_spec or "")
    except RuozhiError as e:
        raise _ui_error(e, lang) from None
    return gr.skip()


def respond(base_history: list, tuned_history: list, base_spec: str, checkpoint: str | None,
            trust_remote_code: bool, system_prompt: str, max_new_tokens, do_sample, temperature, top_p, top_k,
            repetition_penalty, lang: str, request: gr.Request = None):
    """Stream both answers into both panes; yields (base_history, tuned_history, base_title, tuned_title)."""
    message = pending_message(base_history)
    if message is None:  # append_user refused the input: nothing to answer
        return
    try:
        gen = gen_config_from_widgets(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty)
    except RuozhiError as e:
        raise _ui_error(e, lang) from None
    base, tuned = load_pair(base_spec, checkpoint, trust_remote_code, lang)
    titles = (t("compare.base_title", lang, label=base.label), t("compare.tuned_title", lang, label=tuned.label))
    history_base, history_tuned = history_pairs(base_history[:-1]), history_pairs(tuned_history[:-1])

    def panes(base_text: str, tuned_text: str):
        return ([*base_history, {"role": "assistant", "content": base_text}],
                [*tuned_history, {"role": "assistant", "content": tuned_text}], *titles)

    yield panes("", "")
    cancel = _register(request)
    try:
        for base_text, tuned_text in g.stream_pair(base, tuned, message, history_base, history_tuned,
                                                   system_prompt, gen, cancel):
            yield panes(base_text, tuned_text)
    except RuozhiError as e:
        raise _ui_error(e, lang) from None
    finally:
        cancel.set()  # a cancelled event closes this generator: generate() must stop too
        _unregister(request, cancel)


def stop_generation(request: gr.Request = None) -> None:
    """Set every cancel event of this session (chat and A/B)."""
    with _active_lock:
        for event in _active.get(_session(request), ()):
            event.set()


def clear_chats() -> tuple[list, list]:
    return [], []


def ab_prompts(source: str, limit, pasted: str, data_source: str, checkpoint: str | None
               ) -> tuple[list[str], list[str] | None, list]:
    """(prompts, references or None, validation records) for the A/B table."""
    limit = max(1, min(int(limit or 1), AB_MAX_PROMPTS))
    if source == "pasted":
        return [line.strip() for line in (pasted or "").splitlines() if line.strip()][:limit], None, []
    cfg = g.checkpoint_config(checkpoint) if checkpoint else None
    data = cfg.data if cfg else DataConfig()
    records = load_source(data_source, data.val_fraction, data.seed).val[:limit]  # the run's own hold-out rule
    return [r.instruction for r in records], [r.output for r in records], records


def ab_dataframe(rows: list[dict], lang: str):
    import pandas as pd

    headers = [t(f"compare.col_{c}", lang) for c in ("prompt", "reference", "base", "tuned", "base_len", "tuned_len")]
    return pd.DataFrame([[r[c] for c in g.AB_COLUMNS] for r in rows], columns=headers)


def run_ab(base_spec: str, checkpoint: str | None, trust_remote_code: bool, system_prompt: str, data_source: str,
           source: str, limit, pasted: str, max_new_tokens, repetition_penalty, runs_root: str, lang: str,
           request: gr.Request = None):
    """Yield (loss markdown, table, csv path or None) as rows finish; the CSV is written at the end."""
    try:
        prompts, references, records = ab_prompts(source, limit, pasted, data_source, checkpoint)
        gen = gen_config_from_widgets(max_new_tokens, False, 1.0, 1.0, 0, repetition_penalty)
    except RuozhiError as e:
        raise _ui_error(e, lang) from None
    if not prompts:
        raise gr.Error(t("compare.err_no_prompts", lang))
    base, tuned = load_pair(base_spec, checkpoint, trust_remote_code, lang)
    cancel = _register(request)
    try:
        if records:
            cfg = g.checkpoint_config(checkpoint)
            data = cfg.data if cfg else DataConfig()
            losses = [g.validation_loss(m, records, system_prompt, data.max_source_length, data.max_target_length)
                      for m in (base, tuned)]
            loss_md = t("compare.ab_loss", lang, n=len(records), base=losses[0], tuned=losses[1])
        else:
            loss_md = t("compare.ab_no_loss", lang)
        rows = []
        yield loss_md + "\n\n" + t("compare.ab_progress", lang, done=0, total=len(prompts)), ab_dataframe(rows, lang), None
        for row in g.iter_batch_ab(base, tuned, prompts, references, system_prompt, gen, cancel):
            rows.append(row)
            progress = t("compare.ab_progress", lang, done=len(rows), total=len(prompts))
            yield loss_md + "\n\n" + progress, ab_dataframe(rows, lang), None
        csv = g.ab_table_csv(rows, Path(runs_root) / "_compare" / f"ab-{time.strftime('%Y%m%d-%H%M%S')}.csv")
        yield loss_md, ab_dataframe(rows, lang), str(csv)
    except RuozhiError as e:
        raise _ui_error(e, lang) from None
    finally:
        cancel.set()
        _unregister(request, cancel)


# ---------------------------------------------------------------- layout + wiring

def _i18n(key: str) -> I18nData:
    return I18nData(key)  # translated in the browser by the gr.I18n given to launch()


def build(ctx: AppContext) -> CompareHandles:
    defaults = GenConfig()
    runs_root = gr.State(str(ctx.runs_root))
    choices = checkpoint_choices(ctx.runs_root)
    with gr.Row(equal_height=True):
        checkpoint = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None, label=_i18n("compare.checkpoint"),
                                 allow_custom_value=True, scale=5, elem_id="compare-checkpoint")
        refresh = gr.Button(_i18n("compare.refresh"), scale=1, elem_id="compare-refresh")
    system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label=_i18n("compare.system_prompt"), lines=1,
                               elem_id="compare-system-prompt")
    with gr.Accordion(_i18n("compare.gen_params"), open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, label=_i18n("compare.max_new_tokens"))
            do_sample = gr.Checkbox(value=defaults.do_sample, label=_i18n("compare.do_sample"))
            repetition_penalty = gr.Slider(0.8, 2.0, value=defaults.repetition_penalty, step=0.01,
                                           label=_i18n("compare.repetition_penalty"))
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, step=0.05, label=_i18n("compare.temperature"))
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label=_i18n("compare.top_p"))
            top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label=_i18n("compare.top_k"))
    with gr.Row(equal_height=True):
        with gr.Column():
            base_label = gr.Markdown(elem_id="compare-base-label")
            base_chat = gr.Chatbot(label=_i18n("compare.base_chat"), height=420, buttons=["copy", "copy_all"],
                                   elem_id="compare-base-chat")
        with gr.Column():
            tuned_label = gr.Markdown(elem_id="compare-tuned-label")
            tuned_chat = gr.Chatbot(label=_i18n("compare.tuned_chat"), height=420, buttons=["copy", "copy_all"],
                                    elem_id="compare-tuned-chat")
    message = gr.Textbox(label=_i18n("compare.input"), placeholder=_i18n("compare.input_placeholder"), lines=1,
                         elem_id="compare-input")
    gr.Examples([[p] for p in REFERENCE_PROMPTS], inputs=[message], label=_i18n("compare.examples"))
    with gr.Row():
        send = gr.Button(_i18n("compare.send"), variant="primary", elem_id="compare-send")
        stop = gr.Button(_i18n("compare.stop"), variant="stop", elem_id="compare-stop")
        clear = gr.Button(_i18n("compare.clear"), elem_id="compare-clear")
    with gr.Accordion(_i18n("compare.ab_title"), open=False):
        with gr.Row():
            ab_source = gr.Radio([(_i18n("compare.ab_source_val"), "validation"), (_i18n("compare.ab_source_pasted"), "pasted")],
                                 value="validation", label=_i18n("compare.ab_source"))
            ab_limit = gr.Number(50, minimum=1, maximum=AB_MAX_PROMPTS, precision=0, label=_i18n("compare.ab_limit"))
            ab_run = gr.Button(_i18n("compare.ab_run"), variant="primary", elem_id="compare-ab-run")
        ab_prompts_box = gr.Textbox(label=_i18n("compare.ab_prompts"), lines=4, elem_id="compare-ab-prompts")
        ab_loss = gr.Markdown(elem_id="compare-ab-loss")
        ab_table = gr.Dataframe(label=_i18n("compare.ab_table"), wrap=True, interactive=False, elem_id="compare-ab-table")
        ab_csv = gr.File(label=_i18n("compare.ab_csv"), interactive=False, elem_id="compare-ab-csv")

    h = CompareHandles(checkpoint, refresh, system_prompt, max_new_tokens, do_sample, temperature, top_p, top_k,
                       repetition_penalty, message, send, stop, clear, base_label, tuned_label, base_chat, tuned_chat,
                       ab_source, ab_limit, ab_prompts_box, ab_run, ab_loss, ab_table, ab_csv, runs_root)
    _wire(h, ctx)
    return h


def _wire(h: CompareHandles, ctx: AppContext) -> None:
    refresh_io = dict(fn=refresh_checkpoints, inputs=[h.runs_root, h.checkpoint], outputs=[h.checkpoint],
                      queue=False, api_visibility="private")
    h.refresh.click(**refresh_io)
    titles_io = dict(fn=on_checkpoint_change, inputs=[h.checkpoint, h.system_prompt, ctx.lang],
                     outputs=[h.system_prompt, h.tuned_label], queue=False, api_visibility="private")
    h.checkpoint.change(**titles_io)
    base_io = dict(fn=on_base_change, inputs=[ctx.model_spec, ctx.lang], outputs=[h.base_label], queue=False,
                   api_visibility="private")
    ctx.model_spec.change(**base_io)
    ctx.lang.change(**base_io).then(fn=tuned_title, inputs=[h.checkpoint, ctx.lang], outputs=[h.tuned_label],
                                    queue=False, api_visibility="private")

    respond_inputs = [h.base_chat, h.tuned_chat, ctx.model_spec, h.checkpoint, ctx.trust_remote_code, h.system_prompt,
                      h.max_new_tokens, h.do_sample, h.temperature, h.top_p, h.top_k, h.repetition_penalty, ctx.lang]
    respond_outputs = [h.base_chat, h.tuned_chat, h.base_label, h.tuned_label]
    append_io = dict(fn=append_user, inputs=[h.message, h.base_chat, h.tuned_chat, ctx.lang],
                     outputs=[h.message, h.base_chat, h.tuned_chat], queue=False, api_visibility="private")
    fetch_io = dict(fn=fetch_base_model, inputs=[ctx.model_spec, h.checkpoint, ctx.lang], outputs=[h.base_chat],
                    api_visibility="private")
    fetch_submitted = h.message.submit(**append_io).success(**fetch_io)
    submitted = fetch_submitted.success(respond, respond_inputs, respond_outputs, api_name="compare_respond")
    fetch_clicked = h.send.click(**append_io).success(**fetch_io)
    clicked = fetch_clicked.success(respond, respond_inputs, respond_outputs, api_visibility="private")
    ab = h.ab_run.click(run_ab, [ctx.model_spec, h.checkpoint, ctx.trust_remote_code, h.system_prompt, ctx.data_source,
                                 h.ab_source, h.ab_limit, h.ab_prompts, h.max_new_tokens, h.repetition_penalty,
                                 h.runs_root, ctx.lang], [h.ab_loss, h.ab_table, h.ab_csv], api_name="compare_ab")
    h.stop.click(stop_generation, None, None, cancels=[fetch_submitted, submitted, fetch_clicked, clicked, ab],
                 queue=False, api_visibility="private")
    h.clear.click(clear_chats, None, [h.base_chat, h.tuned_chat], queue=False, api_visibility="private")


def wire_page_load(demo: gr.Blocks, tab: gr.Tab, ctx: AppContext, h: CompareHandles) -> None:
    """Re-list checkpoints when the tab is shown and when the page loads, so a run
    that finished while the user was elsewhere appears without a click."""
    refresh_io = dict(fn=refresh_checkpoints, inputs=[h.runs_root, h.checkpoint], outputs=[h.checkpoint],
                      queue=False, api_visibility="private")
    tab.select(**refresh_io)
    demo.load(**refresh_io).then(
        on_checkpoint_change, [h.checkpoint, h.system_prompt, ctx.lang], [h.system_prompt, h.tuned_label],
        queue=False, api_visibility="private").then(
        on_base_change, [ctx.model_spec, ctx.lang], [h.base_label], queue=False, api_visibility="private")
