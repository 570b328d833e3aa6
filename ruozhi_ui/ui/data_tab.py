"""The Data tab: load a dataset, page and search it, see token-length statistics, inspect one example.

Loaded data (records + the model's tokenizer) and statistics live in the app
context's caches, keyed by what identifies them (an upload by its visitor's file),
so switching tabs or re-clicking Load does not re-read a file or re-download a Hub
dataset. Every source and model goes through the policy first. Handlers are
module-level functions of plain values; `build` lays the tab out and `wire`
connects events once the Train tab's max-length inputs exist.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .. import plots, specs
from ..config import DataConfig
from ..data import DatasetSplits, Record, load_source
from ..errors import DataFormatError, PolicyError
from ..i18n import t
from ..policy import Visitor, safe_file_name
from .boundary import bind, md_code, md_text, user_errors
from .context import AppContext
from .texts import T

PAGE_SIZES = (10, 20, 50, 100)
SOURCE_KINDS = ("hub", "upload", "sample")
TRAINED_COLORS = {t("data.inspect_trained", lang): "#bbf7d0" for lang in ("zh", "en")}


@dataclass(frozen=True)
class DataKey:
    """What identifies loaded data: the source, the tokenizer's model, and where uploads are read from."""
    source: str
    model_spec: str
    trust_remote_code: bool
    uploads: str  # the visitor's uploads folder ('' unless the source is an upload)


@dataclass(frozen=True)
class LoadedData:
    key: DataKey
    splits: DatasetSplits
    tokenizer: object  # the model's tokenizer: statistics and the inspector count with it
    rows: tuple[tuple[str, Record], ...]  # ("train" | "val", record) in preview order


# --- plain handlers (no Gradio) ---------------------------------------------------------
def data_key(ctx: AppContext, visitor: Visitor, source: str, model_spec: str, trust_remote_code: bool) -> DataKey:
    """The policy's verdict on a (source, model) pair, as a cache key."""
    source = ctx.policy.check_data_source(source, visitor)
    spec = ctx.policy.check_model(model_spec)
    uploads = str(visitor.uploads) if specs.data_kind(source, look_at_disk=False) == "upload" else ""
    return DataKey(source, spec, ctx.policy.trust_remote_code(spec, trust_remote_code), uploads)


def load_data(ctx: AppContext, key: DataKey) -> LoadedData:
    """Records and the model's tokenizer for `key`, loaded once per app."""
    def load() -> LoadedData:
        from ..models import load_tokenizer  # torch/transformers load on the first Load, not at start-up

        defaults = DataConfig()
        splits = load_source(key.source, defaults.val_fraction, defaults.seed,
                             uploads_dir=Path(key.uploads) if key.uploads else None,
                             max_hub_bytes=ctx.policy.limits.upload_mb * 2**20 if ctx.policy.public else None)
        tokenizer = load_tokenizer(key.model_spec, trust_remote_code=key.trust_remote_code)
        rows = tuple(("train", r) for r in splits.train) + tuple(("val", r) for r in splits.val)
        return LoadedData(key=key, splits=splits, tokenizer=tokenizer, rows=rows)

    return ctx.data.get(key, load)


def data_stats(ctx: AppContext, loaded: LoadedData, max_source_length: int, max_target_length: int):
    """TokenStats of the training split at the given limits (cached per limits)."""
    from ..stats import compute_stats

    limits = (int(max_source_length), int(max_target_length))
    return ctx.stats.get((loaded.key, *limits), lambda: compute_stats(
        loaded.splits.train, loaded.tokenizer, DataConfig().system_prompt, *limits))


def save_upload(ctx: AppContext, visitor: Visitor, temp_path: str) -> str:
    """Move a file Gradio just received into the visitor's uploads folder; returns its source `upload:<name>`.

    The visitor's folder is the only place the app reads uploads from, so an upload
    is only ever seen by the session that sent it, counts against its quota, and is
    named in messages by its file name, never by a server path.
    """
    temp = Path(temp_path)
    name = safe_file_name(temp.name)
    if not name.lower().endswith(specs.DATA_SUFFIXES):
        raise DataFormatError(f"{name or 'the file'}: unsupported file type; upload a .json (a list) or .jsonl "
                              "(one object per line) file")
    size, limit = temp.stat().st_size, ctx.policy.limits.upload_mb * 2**20
    if size > limit:
        raise PolicyError(f"{name}: the file is {size / 2**20:.0f} MB, over this app's {limit // 2**20} MB upload limit")
    visitor.uploads.mkdir(parents=True, exist_ok=True)
    ctx.policy.make_room(visitor)
    target = visitor.uploads / name
    shutil.copyfile(temp, target)  # a new upload of the same name replaces the old one
    if ctx.policy.public:
        temp.unlink(missing_ok=True)  # Gradio's copy would otherwise be served by its file route
    ctx.data.clear()  # a cached dataset of the old file must not survive its replacement
    return specs.UPLOAD_PREFIX + name


def filter_rows(rows, query: str) -> list[int]:
    """Indices of rows whose instruction or output contains `query` (case-insensitive)."""
    q = (query or "").strip().lower()
    if not q:
        return list(range(len(rows)))
    return [i for i, (_, r) in enumerate(rows) if q in r.instruction.lower() or q in r.output.lower()]


def preview_page(rows, query: str, page: int, page_size: int) -> tuple[list[list], int, int, int]:
    """One page of [index, split, instruction, output]; page is clamped to 1..n_pages."""
    matches = filter_rows(rows, query)
    page_size = max(1, int(page_size))
    n_pages = max(1, math.ceil(len(matches) / page_size))
    page = min(max(1, int(page or 1)), n_pages)
    chosen = matches[(page - 1) * page_size: page * page_size]
    table = [[i, rows[i][0], rows[i][1].instruction, rows[i][1].output] for i in chosen]
    return table, page, n_pages, len(matches)


def token_segments(tokenizer, input_ids: list[int], labels: list[int], trained: str) -> list[tuple[str, str | None]]:
    """(text, category) per token, category `trained` where the label is not IGNORE_INDEX.

    A byte-level BPE token can hold part of a UTF-8 character; such tokens are joined
    with the next ones until they decode to whole characters (never across a change
    of category, which only happens at the prompt/answer boundary).
    """
    from ..encoding import IGNORE_INDEX

    segments, pending, pending_cat = [], [], None
    for tok, lab in zip(input_ids, labels):
        cat = trained if lab != IGNORE_INDEX else None
        if pending and cat != pending_cat:
            segments.append((tokenizer.decode(pending), pending_cat))
            pending = []
        pending.append(tok)
        pending_cat = cat
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd"):
            segments.append((text, cat))
            pending = []
    if pending:
        segments.append((tokenizer.decode(pending), pending_cat))
    return segments


def inspect_record(loaded: LoadedData, index: int, max_source_length: int, max_target_length: int,
                   lang: str = "zh") -> tuple[str, list[tuple[str, str | None]], str]:
    """What the model is trained on for row `index`: the exact text, tokens (trained ones marked), summary."""
    from ..encoding import encode_record

    if not 0 <= int(index) < len(loaded.rows):
        raise DataFormatError(t("errors.row_index", lang, n=len(loaded.rows) - 1))
    _, record = loaded.rows[int(index)]
    ex = encode_record(loaded.tokenizer, record, DataConfig().system_prompt, int(max_source_length),
                       int(max_target_length))
    text = loaded.tokenizer.decode(ex.input_ids)  # after truncation: exactly what is fed
    segments = token_segments(loaded.tokenizer, ex.input_ids, ex.labels, t("data.inspect_trained", lang))
    n_trained = sum(1 for lab in ex.labels if lab != -100)
    summary = t("data.inspect_summary", lang, n=len(ex), n_trained=n_trained, n_prompt=ex.prompt_len)
    if ex.prompt_truncated:
        summary += " " + t("data.inspect_prompt_cut", lang, n=int(max_source_length))
    if ex.answer_truncated:
        summary += " " + t("data.inspect_answer_cut", lang, n=int(max_target_length))
    return text, segments, summary


def truncation_markdown(stats, lang: str) -> str:
    return t("data.truncation", lang, src=stats.max_source_length, tgt=stats.max_target_length,
             prompt=stats.prompt_truncated_share, output=stats.output_truncated_share,
             any=stats.any_truncated_share, waste_ref=stats.padding_waste_reference,
             waste_grouped=stats.padding_waste_grouped, n=stats.n, n_total=stats.n_total)


def copy_suggested(suggested_source, suggested_target):
    """The 'use suggested lengths' button: copy both suggestions, or change nothing when absent."""
    if suggested_source is None or suggested_target is None:
        return gr.skip(), gr.skip()
    return int(suggested_source), int(suggested_target)


def source_for_kind(kind: str, current: str) -> tuple[str, bool]:
    """The source textbox value and upload-box visibility for a picked source kind."""
    if kind == "sample":
        return "sample", False
    if kind == "upload":
        return current, True
    hub_like = "/" in current and not current.lower().endswith((".json", ".jsonl")) and current != "sample"
    return (current if hub_like else DataConfig().source), False


# --- Gradio handlers ------------------------------------------------------------------------
def _loaded(ctx: AppContext, key: DataKey | None, lang: str) -> LoadedData:
    if not key:
        raise DataFormatError(t("errors.load_data_first", lang))
    return load_data(ctx, key)


@user_errors("errors.load_failed")
def on_load(ctx: AppContext, source, model_spec, trust_remote_code, page_size, lang, token=None,
            request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
    progress(0, desc=t("data.loading", lang))
    key = data_key(ctx, ctx.visitor_of(token, request), source, model_spec, trust_remote_code)
    loaded = load_data(ctx, key)  # a failure leaves the outputs untouched: the earlier data stays on screen
    s = loaded.splits
    summary = t("data.summary", lang, origin=md_text(s.origin), n_train=len(s.train), n_val=len(s.val))
    if s.notes:
        summary += "\n\n" + "\n".join(f"- {md_text(n)}" for n in s.notes)
    table, page, n_pages, n_matches = preview_page(loaded.rows, "", 1, page_size)
    return (loaded.key, len(s.train), summary, _table(table, lang), page,
            t("data.page_info", lang, page=page, n_pages=n_pages, n=n_matches), "")


@user_errors()
def on_stats(ctx: AppContext, key, max_source_length, max_target_length, lang):
    loaded = _loaded(ctx, key, lang)
    ctx.policy.check_train_lengths(max_source_length, max_target_length)
    stats = data_stats(ctx, loaded, max_source_length, max_target_length)
    from ..stats import reference_table

    headers = [t(f"data.col_{c}", lang) for c in ("field", "min", "max", "mean", "p95")]
    rows = [[t(f"data.hist_{r[0]}", lang), r[1], r[2], round(r[3], 2), round(r[4], 1)] for r in reference_table(stats)]
    fig = plots.length_histograms(stats, int(max_source_length), int(max_target_length), lang)
    return ({"headers": headers, "data": rows}, fig, truncation_markdown(stats, lang),
            stats.suggested_max_source_length, stats.suggested_max_target_length)


def _table(rows, lang):
    return {"headers": [t(f"data.col_{c}", lang) for c in ("index", "split", "instruction", "output")], "data": rows}


@user_errors()
def on_preview(ctx: AppContext, key, query, page, page_size, lang, delta=0):
    loaded = _loaded(ctx, key, lang)
    page_size = page_size if page_size in PAGE_SIZES else PAGE_SIZES[0]
    query = ctx.policy.check_text(query, "search", max_chars=200)
    table, page, n_pages, n_matches = preview_page(loaded.rows, query, int(page or 1) + delta, page_size)
    return _table(table, lang), page, t("data.page_info", lang, page=page, n_pages=n_pages, n=n_matches)


def on_search(ctx: AppContext, key, query, page, page_size, lang):
    return on_preview(ctx, key, query, 1, page_size, lang)  # a new query starts at its first page


def on_prev_page(ctx: AppContext, key, query, page, page_size, lang):
    return on_preview(ctx, key, query, page, page_size, lang, delta=-1)


def on_next_page(ctx: AppContext, key, query, page, page_size, lang):
    return on_preview(ctx, key, query, page, page_size, lang, delta=1)


@user_errors()
def on_inspect(ctx: AppContext, key, index, max_source_length, max_target_length, lang):
    loaded = _loaded(ctx, key, lang)
    ctx.policy.check_train_lengths(max_source_length, max_target_length)
    return inspect_record(loaded, int(index or 0), max_source_length, max_target_length, lang)


def on_row_select(evt: gr.SelectData):
    """Clicking a preview row puts its index into the inspector."""
    row = evt.row_value or []
    return int(row[0]) if row else gr.skip()


def on_source_kind(kind, current):
    value, show_upload = source_for_kind(kind, current or "")
    return value, gr.update(visible=show_upload)


@user_errors("errors.load_failed")
def on_upload(ctx: AppContext, path, token=None, request: gr.Request = None):
    if not path:
        return gr.skip(), gr.skip()
    return save_upload(ctx, ctx.visitor_of(token, request), path), "upload"


# --- layout and wiring -------------------------------------------------------------------
@dataclass
class DataHandles:
    tab: gr.Tab
    loaded_key: gr.State  # (source, spec, trust) of what is on screen, or None
    n_train: gr.State  # training examples loaded (0 = nothing yet): the Train tab's step estimate
    source_kind: gr.Radio
    upload: gr.File
    load_button: gr.Button
    summary: gr.Markdown
    search: gr.Textbox
    page: gr.Number
    page_size: gr.Dropdown
    prev_button: gr.Button
    next_button: gr.Button
    page_info: gr.Markdown
    preview: gr.Dataframe
    stats_table: gr.Dataframe
    histograms: gr.Plot
    truncation: gr.Markdown
    suggested_source: gr.Number
    suggested_target: gr.Number
    use_suggested: gr.Button
    inspect_index: gr.Number
    inspect_button: gr.Button
    inspect_text: gr.Textbox
    inspect_tokens: gr.HighlightedText
    inspect_summary: gr.Markdown
    load_event: object = None  # the Load click's dependency, for .failure() in the shell


def build(ctx: AppContext) -> DataHandles:
    """Lay the tab out; events are connected by `wire` once the Train tab exists."""
    with gr.Tab(T("data.tab"), id="data", elem_id="tab-data") as tab:
        loaded_key, n_train = gr.State(None), gr.State(0)
        with gr.Row():
            source_kind = gr.Radio([(T(f"data.kind_{k}"), k) for k in SOURCE_KINDS], value="hub",
                                   label=T("data.source_kind"), elem_id="data-source-kind", scale=3)
            load_button = gr.Button(T("data.load"), variant="primary", elem_id="data-load", scale=1)
        upload = gr.File(label=T("data.upload"), file_types=[".json", ".jsonl"], type="filepath",
                         visible=False, elem_id="data-upload")
        summary = gr.Markdown(elem_id="data-summary")
        with gr.Accordion(T("data.preview_title"), open=True):
            with gr.Row():
                search = gr.Textbox(label=T("data.search"), placeholder="…", scale=3, elem_id="data-search")
                page = gr.Number(value=1, precision=0, minimum=1, label=T("data.page"), scale=1, elem_id="data-page")
                page_size = gr.Dropdown(list(PAGE_SIZES), value=PAGE_SIZES[0], label=T("data.page_size"),
                                        scale=1, elem_id="data-page-size")
            with gr.Row():
                prev_button = gr.Button("◀", size="sm", elem_id="data-prev")
                page_info = gr.Markdown(elem_id="data-page-info")
                next_button = gr.Button("▶", size="sm", elem_id="data-next")
            preview = gr.Dataframe(interactive=False, wrap=True, max_height=420, elem_id="data-preview",
                                   column_widths=["8%", "8%", "34%", "50%"])
        with gr.Accordion(T("data.stats_title"), open=True):
            stats_table = gr.Dataframe(interactive=False, elem_id="data-stats")
            histograms = gr.Plot(label=T("data.histograms"), elem_id="data-histograms")
            truncation = gr.Markdown(elem_id="data-truncation")
            with gr.Row():
                suggested_source = gr.Number(label=T("data.suggested_source"), interactive=False, precision=0,
                                             elem_id="data-suggested-source")
                suggested_target = gr.Number(label=T("data.suggested_target"), interactive=False, precision=0,
                                             elem_id="data-suggested-target")
                use_suggested = gr.Button(T("data.use_suggested"), elem_id="data-use-suggested")
        with gr.Accordion(T("data.inspect_title"), open=False):
            with gr.Row():
                inspect_index = gr.Number(value=0, precision=0, minimum=0, label=T("data.inspect_index"),
                                          elem_id="data-inspect-index")
                inspect_button = gr.Button(T("data.inspect"), elem_id="data-inspect")
            inspect_summary = gr.Markdown(elem_id="data-inspect-summary")
            inspect_text = gr.Textbox(label=T("data.inspect_text"), lines=8, interactive=False,
                                      elem_id="data-inspect-text")
            inspect_tokens = gr.HighlightedText(label=T("data.inspect_tokens"), color_map=TRAINED_COLORS,
                                                show_legend=True, show_inline_category=False,
                                                elem_id="data-inspect-tokens")
    return DataHandles(
        tab=tab, loaded_key=loaded_key, n_train=n_train, source_kind=source_kind, upload=upload,
        load_button=load_button, summary=summary, search=search, page=page, page_size=page_size,
        prev_button=prev_button, next_button=next_button, page_info=page_info, preview=preview,
        stats_table=stats_table, histograms=histograms, truncation=truncation, suggested_source=suggested_source,
        suggested_target=suggested_target, use_suggested=use_suggested, inspect_index=inspect_index,
        inspect_button=inspect_button, inspect_text=inspect_text, inspect_tokens=inspect_tokens,
        inspect_summary=inspect_summary)


def wire(ctx: AppContext, h: DataHandles, max_source_length: gr.Number, max_target_length: gr.Number) -> DataHandles:
    """Connect the tab's events; the max-length inputs belong to the Train tab."""
    private = dict(api_visibility="private")
    stats_io = dict(fn=bind(on_stats, ctx), inputs=[h.loaded_key, max_source_length, max_target_length, ctx.lang],
                    outputs=[h.stats_table, h.histograms, h.truncation, h.suggested_source, h.suggested_target])
    load_io = dict(fn=bind(on_load, ctx),
                   inputs=[ctx.data_source, ctx.model_spec, ctx.trust_remote_code, h.page_size, ctx.lang, ctx.visitor],
                   outputs=[h.loaded_key, h.n_train, h.summary, h.preview, h.page, h.page_info, h.search])
    h.load_event = h.load_button.click(**load_io, api_name="load_data")
    h.load_event.success(**stats_io, api_name="data_stats")
    h.source_kind.input(on_source_kind, [h.source_kind, ctx.data_source], [ctx.data_source, h.upload], **private)
    (h.upload.upload(bind(on_upload, ctx), [h.upload, ctx.visitor], [ctx.data_source, h.source_kind], **private)
        .success(**load_io, **private).success(**stats_io, **private))

    page_io = dict(inputs=[h.loaded_key, h.search, h.page, h.page_size, ctx.lang],
                   outputs=[h.preview, h.page, h.page_info])
    h.search.input(bind(on_search, ctx), **page_io, trigger_mode="always_last", **private)
    h.page.submit(bind(on_preview, ctx), **page_io, api_name="preview_page")
    h.page_size.input(bind(on_preview, ctx), **page_io, **private)
    h.prev_button.click(bind(on_prev_page, ctx), **page_io, **private)
    h.next_button.click(bind(on_next_page, ctx), **page_io, **private)

    inspect_io = dict(fn=bind(on_inspect, ctx),
                      inputs=[h.loaded_key, h.inspect_index, max_source_length, max_target_length, ctx.lang],
                      outputs=[h.inspect_text, h.inspect_tokens, h.inspect_summary])
    h.inspect_button.click(**inspect_io, api_name="inspect_record")
    h.preview.select(on_row_select, None, [h.inspect_index], **private).success(**inspect_io, **private)

    (h.use_suggested.click(copy_suggested, [h.suggested_source, h.suggested_target],
                           [max_source_length, max_target_length], api_name="use_suggested_lengths")
        .success(**stats_io, **private))
    return h
