"""The Data tab: load a dataset, page and search it, see token-length statistics, inspect one example.

What is shown (pages, tables, the inspector, summaries) is made by `data_views`.
Loaded data (records + the model's tokenizer) and statistics live in the app
context's caches, keyed by what identifies them (an upload by its visitor's file),
so switching tabs or re-clicking Load does not re-read a file or re-download a Hub
dataset. Every source and model goes through the policy first. Handlers are
module-level functions of plain values; `build` lays the tab out and `wire`
connects events once the Train tab's max-length inputs exist.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from .. import plots, specs
from ..config import DataConfig
from ..data import DatasetSplits, Record, load_source, parse_columns
from ..errors import DataFormatError, PolicyError
from ..i18n import DEFAULT_LANG, t
from ..policy import Visitor, safe_file_name
from .boundary import bind, show_errors_beside, user_errors
from .context import AppContext
from .data_views import (empty_stats_table, filter_rows, inspect_record, preview_page, preview_table, split_choices,
                         stats_table, summary_markdown, token_segments, truncation_markdown)
from .texts import T

__all__ = ["DataKey", "LoadedData", "build", "wire", "data_stats", "empty_stats_table", "filter_rows", "inspect_record",
           "load_data", "preview_page", "preview_table", "stats_table", "summary_markdown", "token_segments",
           "truncation_markdown", "split_choices"]

PAGE_SIZES = (10, 20, 50, 100)
SOURCE_KINDS = ("hub", "upload", "sample")
TRAINED_COLOR = "#bbf7d0"


@dataclass(frozen=True)
class DataKey:
    """What identifies loaded data: the source, how it is read, the tokenizer's model, where uploads are read from."""
    source: str
    model_spec: str
    trust_remote_code: bool
    uploads: str  # the visitor's uploads folder ('' unless the source is an upload)
    columns: str = ""  # the column mapping ('' = detect), as DataConfig.columns
    subset: str = ""  # a Hub dataset's config
    train_split: str = ""
    val_split: str = ""

    def options(self) -> dict:
        """The DataConfig fields this load chose: the Train tab's run is read the same way."""
        return {"columns": self.columns, "subset": self.subset, "train_split": self.train_split,
                "val_split": self.val_split}

    def run_options(self) -> dict:
        """`options()` with the source they belong to: a run of another source does not take them."""
        return {"source": self.source, **self.options()}


@dataclass(frozen=True)
class LoadedData:
    key: DataKey
    splits: DatasetSplits
    tokenizer: object  # the model's tokenizer: statistics and the inspector count with it
    rows: tuple[tuple[str, Record], ...]  # ("train" | "val", record) in preview order


# --- plain handlers (no Gradio) ---------------------------------------------------------
def data_key(ctx: AppContext, visitor: Visitor, source: str, model_spec: str, trust_remote_code: bool,
             columns: str = "", subset: str = "", train_split: str = "", val_split: str = "") -> DataKey:
    """The policy's verdict on a (source, model) pair and how to read it, as a cache key."""
    source = ctx.policy.check_data_source(source, visitor)
    spec = ctx.policy.check_model(model_spec)
    uploads = str(visitor.uploads) if specs.data_kind(source, look_at_disk=False) == "upload" else ""
    options = [(ctx.policy.check_text(v or "", name, max_chars=500) or "").strip() for name, v in
               (("column mapping", columns), ("subset", subset), ("train split", train_split), ("val split", val_split))]
    str(parse_columns(options[0]))  # a bad mapping is refused here, naming the part, before anything loads
    return DataKey(source, spec, ctx.policy.trust_remote_code(spec, trust_remote_code), uploads, *options)


def load_data(ctx: AppContext, key: DataKey) -> LoadedData:
    """Records and the model's tokenizer for `key`, loaded once per app."""
    def load() -> LoadedData:
        from ..models import load_tokenizer  # torch/transformers load on the first Load, not at start-up

        defaults = DataConfig()
        splits = load_source(key.source, defaults.val_fraction, defaults.seed,
                             uploads_dir=Path(key.uploads) if key.uploads else None,
                             max_hub_bytes=ctx.policy.limits.upload_mb * 2**20 if ctx.policy.public else None,
                             **key.options())
        tokenizer = load_tokenizer(key.model_spec, trust_remote_code=key.trust_remote_code)
        rows = tuple(("train", r) for r in splits.train) + tuple(("val", r) for r in splits.val)
        return LoadedData(key=key, splits=splits, tokenizer=tokenizer, rows=rows)

    return ctx.data.get(key, load)


STATS_SPLITS = ("all", "train")  # the whole file (the reference's table), or what trains


def data_stats(ctx: AppContext, loaded: LoadedData, max_source_length: int, max_target_length: int,
               split: str = "all", system_prompt: str | None = None):
    """TokenStats of the whole file or the training split, with the Train form's system prompt, at the
    given limits (cached per choice)."""
    from ..stats import compute_stats

    records = loaded.splits.train + (loaded.splits.val if split == "all" else [])
    prompt = DataConfig().system_prompt if system_prompt is None else system_prompt
    limits = (int(max_source_length), int(max_target_length))
    return ctx.stats.get((loaded.key, split, prompt, *limits), lambda: compute_stats(
        records, loaded.tokenizer, prompt, *limits))


def save_upload(ctx: AppContext, visitor: Visitor, temp_path: str) -> str:
    """Move a file Gradio just received into the visitor's uploads folder; returns its source `upload:<name>`.

    The visitor's folder is the only place the app reads uploads from, so an upload
    is only ever seen by the session that sent it, counts against its quota, and is
    named in messages by its file name, never by a server path.
    """
    temp = Path(temp_path)
    name = safe_file_name(temp.name)
    if not name.lower().endswith(specs.DATA_SUFFIXES):
        raise DataFormatError(key="err.upload.type", name=name or "?")
    size, limit = temp.stat().st_size, ctx.policy.limits.upload_mb * 2**20
    if size > limit:
        raise PolicyError(key="err.upload.size", name=name, mb=f"{size / 2**20:.0f}", limit=limit // 2**20)
    visitor.uploads.mkdir(parents=True, exist_ok=True)
    ctx.policy.make_room(visitor)
    target = visitor.uploads / name
    shutil.copyfile(temp, target)  # a new upload of the same name replaces the old one
    if ctx.policy.public:
        temp.unlink(missing_ok=True)  # Gradio's copy would otherwise be served by its file route
    ctx.data.clear()  # a cached dataset of the old file must not survive its replacement
    return specs.UPLOAD_PREFIX + name


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
    hub_like = "/" in current and not current.lower().endswith(specs.DATA_SUFFIXES) and current != "sample"
    return (current if hub_like else DataConfig().source), False


# --- Gradio handlers ------------------------------------------------------------------------
def _loaded(ctx: AppContext, key: DataKey | None) -> LoadedData:
    if not key:
        raise DataFormatError(key="errors.load_data_first")
    return load_data(ctx, key)


@user_errors("errors.load_failed")
def on_load(ctx: AppContext, source, model_spec, trust_remote_code, page_size, lang, token=None,
            columns="", subset="", train_split="", val_split="", request: gr.Request = None,
            progress=gr.Progress(track_tqdm=True)):
    progress(0, desc=t("data.loading", lang))
    key = data_key(ctx, ctx.visitor_of(token, request), source, model_spec, trust_remote_code, columns, subset,
                   train_split, val_split)
    loaded = load_data(ctx, key)  # a failure leaves the outputs untouched: the earlier data stays on screen
    table, page, n_pages, n_matches = preview_page(loaded.rows, "", 1, page_size, lang)
    s = loaded.splits
    return (loaded.key, len(s.train), summary_markdown(loaded, lang), preview_table(table, lang), page,
            t("data.page_info", lang, page=page, n_pages=n_pages, n=n_matches), "", key.run_options())


def on_source_choices(ctx: AppContext, key, lang):
    """After a load: the subset and split dropdowns list what the source has (a Hub dataset), the choice kept."""
    if not key:
        return gr.skip(), gr.skip(), gr.skip()
    s = load_data(ctx, key).splits
    return (gr.update(choices=[(n, n) for n in s.subsets], value=key.subset or (s.subsets[0] if s.subsets else "")),
            gr.update(choices=split_choices(s.splits, lang), value=key.train_split),
            gr.update(choices=split_choices(s.splits, lang), value=key.val_split))


def _checked(ctx: AppContext, key, system_prompt, max_source_length, max_target_length):
    """The loaded data, after the policy has passed the form values that measure it."""
    loaded = _loaded(ctx, key)
    ctx.policy.check_train_lengths(max_source_length, max_target_length)
    return loaded, ctx.policy.check_text(system_prompt, "system_prompt", multiline=True)


@user_errors()
def on_stats(ctx: AppContext, key, split, system_prompt, max_source_length, max_target_length, lang,
             request: gr.Request = None):
    loaded, system_prompt = _checked(ctx, key, system_prompt, max_source_length, max_target_length)
    stats = data_stats(ctx, loaded, max_source_length, max_target_length,
                       split if split in STATS_SPLITS else "all", system_prompt)
    fig = plots.length_histograms(stats, int(max_source_length), int(max_target_length), lang)
    return (stats_table(stats, lang), fig, truncation_markdown(stats, lang),
            stats.suggested_max_source_length, stats.suggested_max_target_length)


@user_errors()
def on_preview(ctx: AppContext, key, query, page, page_size, lang, delta=0, request: gr.Request = None):
    loaded = _loaded(ctx, key)
    page_size = page_size if page_size in PAGE_SIZES else PAGE_SIZES[0]
    query = ctx.policy.check_text(query, "search", max_chars=200)
    try:
        page = int(page or 1) + delta
    except (TypeError, ValueError, OverflowError):
        page = 1
    table, page, n_pages, n_matches = preview_page(loaded.rows, query, page, page_size, lang)
    return preview_table(table, lang), page, t("data.page_info", lang, page=page, n_pages=n_pages, n=n_matches)


def on_search(ctx: AppContext, key, query, page, page_size, lang, request: gr.Request = None):
    return on_preview(ctx, key, query, 1, page_size, lang, request=request)  # a new query starts at page 1


def on_prev_page(ctx: AppContext, key, query, page, page_size, lang, request: gr.Request = None):
    return on_preview(ctx, key, query, page, page_size, lang, delta=-1, request=request)


def on_next_page(ctx: AppContext, key, query, page, page_size, lang, request: gr.Request = None):
    return on_preview(ctx, key, query, page, page_size, lang, delta=1, request=request)


def inspector_tokens(segments, lang: str) -> gr.HighlightedText:
    """The tokens with the legend in the page's language only (one category, one colour)."""
    return gr.HighlightedText(value=segments, color_map={t("data.inspect_trained", lang): TRAINED_COLOR})


@user_errors()
def on_inspect(ctx: AppContext, key, index, system_prompt, max_source_length, max_target_length, lang,
               request: gr.Request = None):
    loaded, system_prompt = _checked(ctx, key, system_prompt, max_source_length, max_target_length)
    try:
        index = int(index or 0)
    except (TypeError, ValueError, OverflowError):
        raise DataFormatError(key="errors.row_index", n=len(loaded.rows) - 1) from None
    text, segments, summary = inspect_record(loaded, index, max_source_length, max_target_length, lang, system_prompt)
    return text, inspector_tokens(segments, lang), summary


def on_relabel(ctx: AppContext, key, query, page, page_size, split, system_prompt, max_source_length,
               max_target_length, index, inspected, lang, request: gr.Request = None):
    """A language switch: the data on screen re-rendered in the new language; before a load, the empty tables'
    headers and the inspector's legend. The inspector's summary is redone only if a row was inspected."""
    if not key:
        return (gr.skip(), preview_table([], lang), gr.skip(), empty_stats_table(lang), gr.skip(), gr.skip(),
                inspector_tokens([], lang), gr.skip())
    loaded = load_data(ctx, key)
    table, page_info = on_preview(ctx, key, query, page, page_size, lang, request=request)[::2]
    stats = on_stats(ctx, key, split, system_prompt, max_source_length, max_target_length, lang, request)
    tokens, summary = inspector_tokens([], lang), gr.skip()
    if inspected:
        _, tokens, summary = on_inspect(ctx, key, index, system_prompt, max_source_length, max_target_length, lang,
                                        request)
    return summary_markdown(loaded, lang), table, page_info, stats[0], stats[1], stats[2], tokens, summary


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
    loaded_key: gr.State  # DataKey of what is on screen, or None
    n_train: gr.State  # training examples loaded (0 = nothing yet): the Train tab's step estimate
    source_kind: gr.Radio
    upload: gr.File
    load_button: gr.Button
    status: gr.Markdown  # the last failed action's error, beside the actions
    summary: gr.Markdown
    search: gr.Textbox
    page: gr.Number
    page_size: gr.Dropdown
    prev_button: gr.Button
    next_button: gr.Button
    page_info: gr.Markdown
    preview: gr.Dataframe
    stats_split: gr.Radio
    stats_table: gr.Dataframe
    histograms: gr.Plot
    truncation: gr.Markdown
    suggested_source: gr.Number
    suggested_target: gr.Number
    use_suggested: gr.Button
    inspect_index: gr.Number
    inspect_button: gr.Button
    inspect_status: gr.Markdown
    inspect_text: gr.Textbox
    inspect_tokens: gr.HighlightedText
    inspect_summary: gr.Markdown
    columns: gr.Textbox  # the column mapping ('' = detect)
    subset: gr.Dropdown  # a Hub dataset's config, listed after a load
    train_split: gr.Dropdown
    val_split: gr.Dropdown
    options: gr.State  # the loaded data's DataConfig options (columns, subset, splits): the Train tab's run uses them
    load_event: object = None  # the Load click's dependency, for .failure() in the shell


def build(ctx: AppContext) -> DataHandles:
    """Lay the tab out; events are connected by `wire` once the Train tab exists."""
    lang = DEFAULT_LANG
    with gr.Tab(T("data.tab"), id="data", elem_id="tab-data") as tab:
        loaded_key, n_train = gr.State(None), gr.State(0)
        with gr.Row():
            source_kind = gr.Radio([(T(f"data.kind_{k}"), k) for k in SOURCE_KINDS], value="hub",
                                   label=T("data.source_kind"), elem_id="data-source-kind", scale=3)
            load_button = gr.Button(T("data.load"), variant="primary", elem_id="data-load", scale=1)
        upload = gr.File(label=T("data.upload"), file_types=list(specs.DATA_SUFFIXES), type="filepath",
                         visible=False, elem_id="data-upload")
        with gr.Row():
            columns = gr.Textbox("", label=T("data.columns"), info=T("data.columns_info"), scale=3, max_length=500,
                                 elem_id="data-columns")
            subset = gr.Dropdown([], value="", label=T("data.subset"), info=T("data.hub_choices_info"),
                                 allow_custom_value=True, scale=1, elem_id="data-subset")
            train_split = gr.Dropdown([(T("data.split_auto"), "")], value="", label=T("data.train_split"),
                                      allow_custom_value=True, scale=1, elem_id="data-train-split")
            val_split = gr.Dropdown([(T("data.split_auto"), "")], value="", label=T("data.val_split"),
                                    allow_custom_value=True, scale=1, elem_id="data-val-split")
        options = gr.State({})
        ctx.data_options = options
        status = gr.Markdown(elem_id="data-status")
        summary = gr.Markdown(elem_id="data-summary")
        with gr.Accordion(T("data.preview_title"), open=True):
            with gr.Row():
                search = gr.Textbox(label=T("data.search"), info=T("data.search_info"), placeholder="…", scale=3,
                                    elem_id="data-search")
                page = gr.Number(value=1, precision=0, minimum=1, label=T("data.page"), scale=1, elem_id="data-page")
                page_size = gr.Dropdown(list(PAGE_SIZES), value=PAGE_SIZES[0], label=T("data.page_size"),
                                        scale=1, elem_id="data-page-size")
            with gr.Row(equal_height=True):
                prev_button = gr.Button("◀", size="sm", scale=0, min_width=60, elem_id="data-prev")
                page_info = gr.Markdown(elem_id="data-page-info")
                next_button = gr.Button("▶", size="sm", scale=0, min_width=60, elem_id="data-next")
            preview = gr.Dataframe(value=preview_table([], lang), interactive=False, wrap=True, max_height=420,
                                   elem_id="data-preview", column_widths=["8%", "8%", "34%", "50%"])
        with gr.Accordion(T("data.stats_title"), open=True):
            stats_split = gr.Radio([(T("data.split_all"), "all"), (T("data.split_train"), "train")], value="all",
                                   label=T("data.stats_split"), elem_id="data-stats-split")
            stats_table = gr.Dataframe(value=empty_stats_table(lang), interactive=False, elem_id="data-stats")
            histograms = gr.Plot(show_label=False, elem_id="data-histograms")
            truncation = gr.Markdown(elem_id="data-truncation")
            with gr.Row(equal_height=True):
                suggested_source = gr.Number(value=None, label=T("data.suggested_source"), interactive=False,
                                             precision=0, elem_id="data-suggested-source")
                suggested_target = gr.Number(value=None, label=T("data.suggested_target"), interactive=False,
                                             precision=0, elem_id="data-suggested-target")
                use_suggested = gr.Button(T("data.use_suggested"), elem_id="data-use-suggested")
        with gr.Accordion(T("data.inspect_title"), open=False):
            with gr.Row(equal_height=True):
                inspect_index = gr.Number(value=0, precision=0, minimum=0, label=T("data.inspect_index"),
                                          elem_id="data-inspect-index")
                inspect_button = gr.Button(T("data.inspect"), elem_id="data-inspect")
            inspect_status = gr.Markdown(elem_id="data-inspect-status")
            inspect_summary = gr.Markdown(elem_id="data-inspect-summary")
            inspect_text = gr.Textbox(label=T("data.inspect_text"), lines=8, interactive=False,
                                      elem_id="data-inspect-text")
            inspect_tokens = gr.HighlightedText(label=T("data.inspect_tokens"),
                                                color_map={t("data.inspect_trained", lang): TRAINED_COLOR},
                                                show_legend=True, show_inline_category=False,
                                                elem_id="data-inspect-tokens")
    return DataHandles(
        tab=tab, loaded_key=loaded_key, n_train=n_train, source_kind=source_kind, upload=upload,
        load_button=load_button, status=status, summary=summary, search=search, page=page, page_size=page_size,
        prev_button=prev_button, next_button=next_button, page_info=page_info, preview=preview,
        stats_split=stats_split, stats_table=stats_table, histograms=histograms, truncation=truncation,
        suggested_source=suggested_source, suggested_target=suggested_target, use_suggested=use_suggested,
        inspect_index=inspect_index, inspect_button=inspect_button, inspect_status=inspect_status,
        inspect_text=inspect_text, inspect_tokens=inspect_tokens, inspect_summary=inspect_summary,
        columns=columns, subset=subset, train_split=train_split, val_split=val_split, options=options)


def wire(ctx: AppContext, h: DataHandles, form: dict) -> DataHandles:
    """Connect the tab's events; the system prompt and max-length inputs belong to the Train form."""
    private = dict(api_visibility="private")
    src, tgt, system_prompt = form["max_source_length"], form["max_target_length"], form["system_prompt"]
    stats_io = dict(fn=bind(on_stats, ctx), inputs=[h.loaded_key, h.stats_split, system_prompt, src, tgt, ctx.lang],
                    outputs=[h.stats_table, h.histograms, h.truncation, h.suggested_source, h.suggested_target],
                    show_progress_on=[h.histograms])
    load_io = dict(fn=bind(on_load, ctx),
                   inputs=[ctx.data_source, ctx.model_spec, ctx.trust_remote_code, h.page_size, ctx.lang, ctx.visitor,
                           h.columns, h.subset, h.train_split, h.val_split],
                   outputs=[h.loaded_key, h.n_train, h.summary, h.preview, h.page, h.page_info, h.search, h.options],
                   show_progress_on=[h.summary])
    h.load_event = h.load_button.click(**load_io, api_name="load_data")
    choices_io = dict(fn=bind(on_source_choices, ctx), inputs=[h.loaded_key, ctx.lang],
                      outputs=[h.subset, h.train_split, h.val_split], **private)
    h.load_event.success(**choices_io)
    stats_event = h.load_event.success(**stats_io, api_name="data_stats")
    h.source_kind.input(on_source_kind, [h.source_kind, ctx.data_source], [ctx.data_source, h.upload], **private)
    uploaded = h.upload.upload(bind(on_upload, ctx), [h.upload, ctx.visitor], [ctx.data_source, h.source_kind],
                               show_progress_on=[h.status], **private)
    loaded_upload = uploaded.success(**load_io, **private)
    loaded_upload.success(**choices_io)
    upload_stats = loaded_upload.success(**stats_io, **private)
    h.stats_split.input(**stats_io, **private)

    page_io = dict(inputs=[h.loaded_key, h.search, h.page, h.page_size, ctx.lang],
                   outputs=[h.preview, h.page, h.page_info], show_progress_on=[h.page_info])
    # .change, not .input: text typed through an input method (every Chinese user's) never fires .input;
    # always_last runs only the newest query while one is in flight, which is the debounce.
    paging = [h.search.change(bind(on_search, ctx), **page_io, trigger_mode="always_last", **private),
              h.page.submit(bind(on_preview, ctx), **page_io, api_name="preview_page"),
              h.page_size.input(bind(on_preview, ctx), **page_io, **private),
              h.prev_button.click(bind(on_prev_page, ctx), **page_io, **private),
              h.next_button.click(bind(on_next_page, ctx), **page_io, **private)]

    inspect_io = dict(fn=bind(on_inspect, ctx),
                      inputs=[h.loaded_key, h.inspect_index, system_prompt, src, tgt, ctx.lang],
                      outputs=[h.inspect_text, h.inspect_tokens, h.inspect_summary], show_progress_on=[h.inspect_status])
    inspected = [h.inspect_button.click(**inspect_io, api_name="inspect_record"),
                 h.preview.select(on_row_select, None, [h.inspect_index], **private).success(**inspect_io, **private)]

    suggested = h.use_suggested.click(copy_suggested, [h.suggested_source, h.suggested_target], [src, tgt],
                                      api_name="use_suggested_lengths").success(**stats_io, **private)
    for event in (h.load_event, stats_event, uploaded, loaded_upload, upload_stats, suggested, *paging):
        show_errors_beside(ctx, event, h.status)
    for event in inspected:
        show_errors_beside(ctx, event, h.inspect_status)
    ctx.lang.change(bind(on_relabel, ctx),
                    [h.loaded_key, h.search, h.page, h.page_size, h.stats_split, system_prompt, src, tgt,
                     h.inspect_index, h.inspect_text, ctx.lang],
                    [h.summary, h.preview, h.page_info, h.stats_table, h.histograms, h.truncation, h.inspect_tokens,
                     h.inspect_summary], **private)
    return h
