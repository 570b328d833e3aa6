"""Compare tab: base vs fine-tuned side by side, streaming, plus a batch A/B table.

Layout and wiring only; every handler is a module-level function of plain values
(testable without a browser) that calls `generation`. A checkpoint is named by its
path relative to the visitor's runs folder and resolved by the policy, so a public
visitor reaches only their own. Each pane is titled with the exact weights it used, in
the page's language. The conversation lives on the server (`chats.ChatStore`, per
session): Send stores the turn, the answer reads it from there, and the panes only
show what the server built, so no event ever takes a chat pane as input. Answers and
A/B tables share one global concurrency limit and one slot per visitor. Stop both
cancels the streaming event and sets the session's cancel events, so `generate()`
itself stops, not just the UI.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .. import chats
from .. import generation as g
from ..config import DEFAULT_SYSTEM_PROMPT, REFERENCE_PROMPTS, GenConfig
from ..data import load_source
from ..errors import ConfigError, GenerationError, RuozhiError
from ..i18n import t
from ..models import fetch_model_files
from ..policy import Visitor
from ..runs import checkpoint_names, newest_final
from .boundary import bind, md_text, user_errors
from .compare_titles import base_title, tuned_title, with_settings
from .context import AppContext
from .texts import T

AB_DEFAULT_PROMPTS = 50
# The table as CSV, built in the browser: no file is written on the server and no server path is sent.
# Numbers are written as they are (a negative length is not a formula); every text cell is neutralised.
CSV_DOWNLOAD_JS = """(table) => {
    const rows = [table.headers, ...table.data];
    // A cell a spreadsheet would run as a formula (=, +, -, @, tab, CR first) starts with a quote instead.
    const text = (v) => { const s = String(v ?? ''); return /^[=+\\-@\\t\\r]/.test(s) ? "'" + s : s; };
    const cell = (v) => '"' + text(v).replaceAll('"', '""') + '"';
    const csv = '\\ufeff' + rows.map(r => r.map(cell).join(',')).join('\\n');
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([csv], {type: 'text/csv;charset=utf-8'}));
    a.download = 'ab-table.csv';
    a.click();
    URL.revokeObjectURL(a.href);
}"""


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
    notice: gr.Markdown
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
    ab_csv: gr.Button


# ---------------------------------------------------------------- pure helpers

def gen_config_from_widgets(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty) -> GenConfig:
    """A repetition penalty of 0 (the slider's left end, its default) means the model's own."""
    try:
        penalty = float(repetition_penalty)
        gen = GenConfig(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), temperature=float(temperature),
                        top_p=float(top_p), top_k=int(top_k), repetition_penalty=None if penalty == 0 else penalty)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(key="err.gen.numbers") from None
    if not all(x == x and abs(x) != float("inf") for x in (gen.temperature, gen.top_p, penalty)):
        raise ConfigError(key="err.gen.finite")
    if gen.max_new_tokens < 1:
        raise ConfigError(key="err.gen.max_new_tokens")
    if gen.do_sample and not (gen.temperature > 0 and 0 < gen.top_p <= 1 and gen.top_k >= 0):
        raise ConfigError(key="err.gen.sampling")
    if penalty < 0:
        raise ConfigError(key="err.gen.repetition")
    return gen


def checkpoint_choices(runs_root: Path) -> list[tuple[str, str]]:
    """(run/checkpoints/name, the same) for the dropdown: names relative to the visitor's runs folder,
    which is all a page ever sends back; the last finished run's `final` first."""
    return [(name, name) for name in checkpoint_names(Path(runs_root))]


# ---------------------------------------------------------------- cancel registry

_active: dict[str, set[threading.Event]] = {}  # session -> events of its running generations
_active_lock = threading.Lock()


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


def _slot(ctx: AppContext, visitor: Visitor, request) -> str:
    """Whose slot long work takes: a public visitor's (all their tabs share one), a local session's (the one
    trusted user may chat in two tabs)."""
    return visitor.id if ctx.policy.public else _session(request)


def _register(request) -> threading.Event:
    event = threading.Event()
    with _active_lock:
        _active.setdefault(_session(request), set()).add(event)
    return event


def _unregister(request, event: threading.Event) -> None:
    with _active_lock:
        _active.get(_session(request), set()).discard(event)


# ---------------------------------------------------------------- handlers

def refresh_checkpoints(ctx: AppContext, current: str | None, token=None, request: gr.Request = None) -> gr.Dropdown:
    """Re-list; keep the user's pick, else preselect the newest finished run's `final` (not whichever
    folder was touched last)."""
    root = ctx.visitor_of(token, request).runs_root
    choices = checkpoint_choices(root)
    names = [name for _, name in choices]
    preselect = newest_final(root) or (names[0] if names else None)
    return gr.Dropdown(choices=choices, value=current if current in names else preselect)


def on_run_finished(ctx: AppContext, final: str | None, token=None, request: gr.Request = None):
    """A run of this visitor finished while the page was open: Compare switches to its `final`."""
    if not final:
        return gr.skip()
    root = ctx.visitor_of(token, request).runs_root
    return gr.Dropdown(choices=checkpoint_choices(root), value=final)


def on_checkpoint_change(ctx: AppContext, checkpoint: str | None, system_prompt: str, lang: str, token=None,
                         request: gr.Request = None) -> tuple[str, str]:
    """(system prompt, tuned title): the checkpoint's training system prompt replaces the box."""
    visitor = ctx.visitor_of(token, request)
    try:
        path = ctx.policy.resolve_checkpoint(checkpoint, visitor) if checkpoint else None
        trained_with = g.checkpoint_system_prompt(path) if path else None
    except RuozhiError:
        trained_with = None  # a damaged run_config must not block picking; loading reports it
    return (trained_with if trained_with is not None else system_prompt), tuned_title(ctx, visitor, checkpoint, lang)


def on_base_change(spec: str, lang: str) -> str:
    return base_title(spec, lang)


def append_user(ctx: AppContext, message: str, lang: str, request: gr.Request = None):
    """Send: the message becomes the session's pending turn on the server; the panes show the stored chat.
    (box, base pane, tuned pane, notice). A refusal is one line in the notice, never an error over the panes."""
    if not isinstance(message, str) or not message.strip():
        return gr.skip(), gr.skip(), gr.skip(), notice_line(t("compare.err_empty", lang))
    try:
        text = ctx.policy.check_text(message, "message", multiline=True)
        turns = ctx.chats.add_user(_session(request), text)
    except RuozhiError as e:
        return gr.skip(), gr.skip(), gr.skip(), notice_line(ctx.policy.redact(e.localized(lang)))
    return "", chats.messages(turns, "base"), chats.messages(turns, "tuned"), ""


def notice_line(text: str) -> str:
    return f"<span class='rz-error'>{md_text(text)}</span>"


def load_pair(ctx: AppContext, visitor: Visitor, base_spec: str, checkpoint: str | None, trust_remote_code: bool,
              lang: str):
    """(base, tuned) LoadedModels for a visitor, after the policy has passed both."""
    if not checkpoint:
        raise GenerationError(key="compare.err_no_checkpoint")
    spec = ctx.policy.check_model(base_spec)
    path = ctx.policy.resolve_checkpoint(checkpoint, visitor)
    base = ctx.models.get(spec, trust_remote_code=ctx.policy.trust_remote_code(spec, trust_remote_code))
    tuned_from = g.checkpoint_config(path)
    tuned_spec = tuned_from.model.spec if tuned_from else spec
    tuned = ctx.models.get(str(path), trust_remote_code=ctx.policy.trust_remote_code(tuned_spec, trust_remote_code))
    g.check_pair(base, tuned)
    return base, tuned


@user_errors("compare.error")
def fetch_base_model(ctx: AppContext, base_spec: str, checkpoint: str | None, lang: str, request: gr.Request = None,
                     progress=gr.Progress(track_tqdm=True)):
    """Before the first answer: download a Hub base model in its own event, so the base pane shows the
    download's progress instead of a silent wait. A no-op once cached, for `demo` and for folders, and when
    Send added nothing to answer."""
    if chats.pending(ctx.chats.turns_of(_session(request))) is None:
        return gr.skip()
    if not checkpoint:  # say so before a 1 GB download, not after
        raise GenerationError(key="compare.err_no_checkpoint")
    fetch_model_files(ctx.policy.check_model(base_spec or ""))
    return gr.skip()


@user_errors("compare.error")
def respond(ctx: AppContext, base_spec: str, checkpoint: str | None, trust_remote_code: bool, system_prompt: str,
            max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, lang: str, token=None,
            request: gr.Request = None):
    """Answer the session's pending turn (chats.ChatStore) with both models, streaming into both panes;
    yields (base pane, tuned pane, base title, tuned title). The history is the server's, never the page's."""
    session = _session(request)
    turns = ctx.chats.turns_of(session)
    message = chats.pending(turns)
    if message is None:  # Send added nothing (empty, refused): nothing to answer
        return
    policy, visitor = ctx.policy, ctx.visitor_of(token, request)
    policy.check_text(system_prompt, "system prompt", multiline=True)
    gen = gen_config_from_widgets(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty)
    policy.check_generation(gen.max_new_tokens)
    with ctx.long_work.hold(_slot(ctx, visitor, request)):
        base, tuned = load_pair(ctx, visitor, base_spec, checkpoint, trust_remote_code, lang)
        titles = (with_settings(base_title(base_spec, lang), base, gen, lang),
                  with_settings(tuned_title(ctx, visitor, checkpoint, lang), tuned, gen, lang))

        def panes(base_text: str, tuned_text: str):
            return (chats.messages(turns, "base", base_text), chats.messages(turns, "tuned", tuned_text), *titles)

        yield panes("", "")
        cancel = _register(request)
        texts = ("", "")
        try:
            for texts in g.stream_pair(base, tuned, message, chats.pairs(turns, "base"), chats.pairs(turns, "tuned"),
                                       system_prompt, gen, cancel):
                yield panes(*texts)
            empty = t("train.probe_empty", lang)
            if not all(texts):  # a model that answers nothing at once gets a visible note, not an empty bubble
                texts = (texts[0] or empty, texts[1] or empty)
                yield panes(*texts)
        finally:
            cancel.set()  # a cancelled event closes this generator: generate() must stop too
            _unregister(request, cancel)
            ctx.chats.answer(session, *texts)  # what the panes show, partial after a Stop


def stop_generation(request: gr.Request = None) -> None:
    """Set every cancel event of this session (chat and A/B)."""
    with _active_lock:
        for event in _active.get(_session(request), ()):
            event.set()


def clear_chats(ctx: AppContext, request: gr.Request = None) -> tuple[list, list, str]:
    ctx.chats.clear(_session(request))
    return [], [], ""


def ab_prompts(ctx: AppContext, visitor: Visitor, source: str, limit, pasted: str, checkpoint: str | None
               ) -> tuple[list[str], list[str] | None, list]:
    """(prompts, references or None, validation records) for the A/B table. The validation prompts are
    the checkpoint's own run's: its data source and hold-out rule, whatever the top bar says now."""
    try:
        limit = max(1, int(limit or 1))
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(key="err.form.whole", name="the number of A/B prompts") from None
    ctx.policy.check_generation(1, limit)
    if source == "pasted":
        text = ctx.policy.check_text(pasted, "pasted prompts", multiline=True)
        return [line.strip() for line in (text or "").splitlines() if line.strip()][:limit], None, []
    if not checkpoint:
        raise GenerationError(key="err.ab.no_checkpoint")
    cfg = g.checkpoint_config(ctx.policy.resolve_checkpoint(checkpoint, visitor))
    if cfg is None:
        raise GenerationError(key="err.ab.no_run_config")
    data = cfg.data
    source = ctx.policy.check_data_source(data.source, visitor)
    records = load_source(source, data.val_fraction, data.seed, uploads_dir=visitor.uploads,
                          max_hub_bytes=ctx.policy.limits.upload_mb * 2**20 if ctx.policy.public else None,
                          columns=data.columns, subset=data.subset, train_split=data.train_split,
                          val_split=data.val_split).val[:limit]
    return [r.instruction for r in records], [r.output for r in records], records


def ab_dataframe(rows: list[dict], lang: str):
    import pandas as pd

    headers = [t(f"compare.col_{c}", lang) for c in ("prompt", "reference", "base", "tuned", "base_len", "tuned_len")]
    return pd.DataFrame([[r[c] for c in g.AB_COLUMNS] for r in rows], columns=headers)


@user_errors("compare.error")
def run_ab(ctx: AppContext, base_spec: str, checkpoint: str | None, trust_remote_code: bool, system_prompt: str,
           source: str, limit, pasted: str, max_new_tokens, repetition_penalty, lang: str, token=None,
           request: gr.Request = None):
    """Yield (loss markdown, table) as rows finish."""
    visitor = ctx.visitor_of(token, request)
    with ctx.long_work.hold(_slot(ctx, visitor, request)):  # one A/B or answer at a time per visitor
        prompts, references, records = ab_prompts(ctx, visitor, source, limit, pasted, checkpoint)
        gen = gen_config_from_widgets(max_new_tokens, False, 1.0, 1.0, 0, repetition_penalty)
        ctx.policy.check_generation(gen.max_new_tokens, len(prompts))
        ctx.policy.check_text(system_prompt, "system prompt", multiline=True)
        if not prompts:
            raise ConfigError(key="compare.err_no_prompts")
        base, tuned = load_pair(ctx, visitor, base_spec, checkpoint, trust_remote_code, lang)
        cancel = _register(request)
        try:
            if records:
                data = g.checkpoint_config(ctx.policy.resolve_checkpoint(checkpoint, visitor)).data
                losses = [g.validation_loss(m, records, system_prompt, data.max_source_length, data.max_target_length,
                                            train_all_turns=data.train_all_turns,
                                            label_truncated_end=data.label_truncated_end) for m in (base, tuned)]
                loss_md = t("compare.ab_loss", lang, n=len(records), base=losses[0], tuned=losses[1])
            else:
                loss_md = t("compare.ab_no_loss", lang)
            rows = []
            yield loss_md + "\n\n" + t("compare.ab_progress", lang, done=0, total=len(prompts)), ab_dataframe(rows, lang)
            for row in g.iter_batch_ab(base, tuned, prompts, references, system_prompt, gen, cancel,
                                           records or None):
                rows.append(row)
                progress = t("compare.ab_progress", lang, done=len(rows), total=len(prompts))
                yield loss_md + "\n\n" + progress, ab_dataframe(rows, lang)
            yield loss_md, ab_dataframe(rows, lang)
        finally:
            cancel.set()
            _unregister(request, cancel)


# ---------------------------------------------------------------- layout + wiring

def build(ctx: AppContext) -> CompareHandles:
    defaults = GenConfig()
    with gr.Row(equal_height=True):
        checkpoint = gr.Dropdown(choices=[], value=None, label=T("compare.checkpoint"), allow_custom_value=True,
                                 scale=5, elem_id="compare-checkpoint")  # filled per visitor on page load
        refresh = gr.Button(T("compare.refresh"), scale=1, elem_id="compare-refresh")
    system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label=T("compare.system_prompt"), lines=1,
                               elem_id="compare-system-prompt")
    with gr.Accordion(T("compare.gen_params"), open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(1, ctx.policy.limits.max_new_tokens if ctx.policy.public else 1024,
                                       value=defaults.max_new_tokens, step=1, label=T("compare.max_new_tokens"))
            do_sample = gr.Checkbox(value=defaults.do_sample, label=T("compare.do_sample"))
            repetition_penalty = gr.Slider(0.0, 2.0, value=0.0, step=0.01,  # 0: the model's own (generation_config)
                                           label=T("compare.repetition_penalty"))
        with gr.Row():
            # Sampling only (greedy by default); they start at Qwen2.5-Instruct's own values.
            temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label=T("compare.temperature"))
            top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.01, label=T("compare.top_p"))
            top_k = gr.Slider(0, 200, value=20, step=1, label=T("compare.top_k"))
    # render_markdown=False: answers are shown as text, so an image or link a model writes fetches nothing
    chat = dict(height=420, buttons=["copy", "copy_all"], render_markdown=False)
    with gr.Row(equal_height=True):
        with gr.Column():
            base_label = gr.Markdown(elem_id="compare-base-label")
            base_chat = gr.Chatbot(label=T("compare.base_chat"), elem_id="compare-base-chat", **chat)
        with gr.Column():
            tuned_label = gr.Markdown(elem_id="compare-tuned-label")
            tuned_chat = gr.Chatbot(label=T("compare.tuned_chat"), elem_id="compare-tuned-chat", **chat)
    message = gr.Textbox(label=T("compare.input"), placeholder=T("compare.input_placeholder"), lines=1,
                         elem_id="compare-input")
    notice = gr.Markdown(elem_id="compare-notice")  # a refused Send, as one line (no error over the panes)
    gr.Examples([[p] for p in REFERENCE_PROMPTS], inputs=[message], label=T("compare.examples"))
    with gr.Row():
        send = gr.Button(T("compare.send"), variant="primary", elem_id="compare-send")
        stop = gr.Button(T("compare.stop"), variant="stop", elem_id="compare-stop")
        clear = gr.Button(T("compare.clear"), elem_id="compare-clear")
    with gr.Accordion(T("compare.ab_title"), open=False, elem_id="compare-ab"):
        with gr.Row():
            ab_source = gr.Radio([(T("compare.ab_source_val"), "validation"), (T("compare.ab_source_pasted"), "pasted")],
                                 value="validation", label=T("compare.ab_source"))
            ab_limit = gr.Number(AB_DEFAULT_PROMPTS, minimum=1, maximum=ctx.policy.limits.ab_prompts, precision=0,
                                 label=T("compare.ab_limit"), elem_id="compare-ab-limit")
            ab_run = gr.Button(T("compare.ab_run"), variant="primary", elem_id="compare-ab-run")
        ab_prompts_box = gr.Textbox(label=T("compare.ab_prompts"), lines=4, elem_id="compare-ab-prompts")
        ab_loss = gr.Markdown(elem_id="compare-ab-loss")
        # Wrapped text in fixed shares of the width: prompt and reference narrower, both answers side by side.
        ab_table = gr.Dataframe(label=T("compare.ab_table"), wrap=True, interactive=False, max_height=640,
                                column_widths=["17%", "17%", "29%", "29%", "4%", "4%"], elem_id="compare-ab-table")
        ab_csv = gr.Button(T("compare.ab_csv"), size="sm", elem_id="compare-ab-csv")

    h = CompareHandles(
        checkpoint=checkpoint, refresh=refresh, system_prompt=system_prompt, max_new_tokens=max_new_tokens,
        do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
        message=message, notice=notice, send=send, stop=stop, clear=clear, base_label=base_label, tuned_label=tuned_label,
        base_chat=base_chat, tuned_chat=tuned_chat, ab_source=ab_source, ab_limit=ab_limit, ab_prompts=ab_prompts_box,
        ab_run=ab_run, ab_loss=ab_loss, ab_table=ab_table, ab_csv=ab_csv)
    _wire(h, ctx)
    return h


def _wire(h: CompareHandles, ctx: AppContext) -> None:
    private = dict(api_visibility="private")
    h.refresh.click(bind(refresh_checkpoints, ctx), [h.checkpoint, ctx.visitor], [h.checkpoint], queue=False,
                    **private)
    h.checkpoint.change(bind(on_checkpoint_change, ctx), [h.checkpoint, h.system_prompt, ctx.lang, ctx.visitor],
                        [h.system_prompt, h.tuned_label], queue=False, **private)
    base_io = dict(fn=on_base_change, inputs=[ctx.model_spec, ctx.lang], outputs=[h.base_label], queue=False, **private)
    ctx.model_spec.change(**base_io)
    ctx.lang.change(**base_io).then(bind(on_checkpoint_change, ctx),
                                    [h.checkpoint, h.system_prompt, ctx.lang, ctx.visitor],
                                    [h.system_prompt, h.tuned_label], queue=False, **private)

    # No chat pane is ever an input: the history lives on the server (chats.ChatStore), so no client copy,
    # and none of the components a Chatbot message can name, is ever read or rebuilt.
    respond_inputs = [ctx.model_spec, h.checkpoint, ctx.trust_remote_code, h.system_prompt, h.max_new_tokens,
                      h.do_sample, h.temperature, h.top_p, h.top_k, h.repetition_penalty, ctx.lang, ctx.visitor]
    respond_outputs = [h.base_chat, h.tuned_chat, h.base_label, h.tuned_label]
    # Decoding for everyone at once is bounded by one shared limit (chat answers and A/B tables together).
    generation = dict(concurrency_limit=ctx.policy.limits.generation_concurrency, concurrency_id="compare-generation")
    append_io = dict(fn=bind(append_user, ctx), inputs=[h.message, ctx.lang],
                     outputs=[h.message, h.base_chat, h.tuned_chat, h.notice], queue=False, **private)
    fetch_io = dict(fn=bind(fetch_base_model, ctx), inputs=[ctx.model_spec, h.checkpoint, ctx.lang],
                    outputs=[h.base_chat], **private)
    respond_fn = bind(respond, ctx)
    fetch_submitted = h.message.submit(**append_io).success(**fetch_io)
    submitted = fetch_submitted.success(respond_fn, respond_inputs, respond_outputs, api_name="compare_respond",
                                        **generation)
    fetch_clicked = h.send.click(**append_io).success(**fetch_io)
    clicked = fetch_clicked.success(respond_fn, respond_inputs, respond_outputs, **private, **generation)
    ab = h.ab_run.click(bind(run_ab, ctx), [ctx.model_spec, h.checkpoint, ctx.trust_remote_code, h.system_prompt,
                                               h.ab_source, h.ab_limit, h.ab_prompts, h.max_new_tokens,
                                               h.repetition_penalty, ctx.lang, ctx.visitor],
                        [h.ab_loss, h.ab_table], api_name="compare_ab", **generation)
    h.ab_csv.click(None, [h.ab_table], None, js=CSV_DOWNLOAD_JS, **private)
    h.stop.click(stop_generation, None, None, cancels=[fetch_submitted, submitted, fetch_clicked, clicked, ab],
                 queue=False, **private)
    h.clear.click(bind(clear_chats, ctx), None, [h.base_chat, h.tuned_chat, h.notice], queue=False, **private)


def wire_page_load(load_event, tab: gr.Tab, ctx: AppContext, h: CompareHandles) -> None:
    """Re-list the visitor's checkpoints when the tab is shown and when the page loads, so a run
    that finished while the user was elsewhere appears without a click."""
    refresh_io = dict(fn=bind(refresh_checkpoints, ctx), inputs=[h.checkpoint, ctx.visitor],
                      outputs=[h.checkpoint], queue=False, api_visibility="private")
    tab.select(**refresh_io)
    load_event.then(**refresh_io).then(
        bind(on_checkpoint_change, ctx), [h.checkpoint, h.system_prompt, ctx.lang, ctx.visitor],
        [h.system_prompt, h.tuned_label], queue=False, api_visibility="private").then(
        on_base_change, [ctx.model_spec, ctx.lang], [h.base_label], queue=False, api_visibility="private")
