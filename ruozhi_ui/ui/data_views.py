"""What the Data tab shows, as plain functions of loaded data: preview pages, the statistics table and notes,
the inspector's tokens and summary, the load summary, each in the page's language.

No Gradio here (the tab module lays out and wires); `data_tab` re-exports these names.
"""

from __future__ import annotations

import math

from ..config import DataConfig
from ..errors import DataFormatError
from ..i18n import DEFAULT_LANG, t
from .boundary import md_code, md_text


def filter_rows(rows, query: str) -> list[int]:
    """Indices of rows whose instruction or output contains `query` (case-insensitive)."""
    q = (query or "").strip().lower()
    if not q:
        return list(range(len(rows)))
    return [i for i, (_, r) in enumerate(rows) if q in r.instruction.lower() or q in r.output.lower()]


def preview_page(rows, query: str, page: int, page_size: int, lang: str = DEFAULT_LANG
                 ) -> tuple[list[list], int, int, int]:
    """One page of [index, split, instruction, output]; page is clamped to 1..n_pages."""
    matches = filter_rows(rows, query)
    page_size = max(1, int(page_size))
    n_pages = max(1, math.ceil(len(matches) / page_size))
    page = min(max(1, int(page or 1)), n_pages)
    chosen = matches[(page - 1) * page_size: page * page_size]
    table = [[i, t(f"data.split_value_{rows[i][0]}", lang), rows[i][1].instruction, rows[i][1].output] for i in chosen]
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


def inspect_record(loaded, index: int, max_source_length: int, max_target_length: int,
                   lang: str = "zh", system_prompt: str | None = None) -> tuple[str, list[tuple[str, str | None]], str]:
    """What the model is trained on for row `index`: the exact text, tokens (trained ones marked), summary."""
    from ..encoding import encode_record

    if not 0 <= int(index) < len(loaded.rows):
        raise DataFormatError(key="errors.row_index", n=len(loaded.rows) - 1)
    _, record = loaded.rows[int(index)]
    prompt = DataConfig().system_prompt if system_prompt is None else system_prompt
    ex = encode_record(loaded.tokenizer, record, prompt, int(max_source_length), int(max_target_length))
    text = loaded.tokenizer.decode(ex.input_ids)  # after truncation: exactly what is fed
    segments = token_segments(loaded.tokenizer, ex.input_ids, ex.labels, t("data.inspect_trained", lang))
    n_trained = sum(1 for lab in ex.labels if lab != -100)
    summary = t("data.inspect_summary", lang, n=len(ex), n_trained=n_trained, n_prompt=ex.prompt_len)
    if ex.history_len:  # the encoder bounds the last turn only: say which part is which
        summary += " " + t("data.inspect_history", lang, n_history=ex.history_len,
                           n_last=ex.prompt_len - ex.history_len, src=int(max_source_length))
    if ex.prompt_truncated:
        summary += " " + t("data.inspect_prompt_cut", lang, n=int(max_source_length))
    if ex.answer_truncated:
        summary += " " + t("data.inspect_answer_cut", lang, n=int(max_target_length))
    return text, segments, summary


def truncation_markdown(stats, lang: str) -> str:
    text = t("data.truncation", lang, src=stats.max_source_length, tgt=stats.max_target_length,
             prompt=stats.prompt_truncated_share, output=stats.output_truncated_share,
             n_prompt=stats.prompt_truncated_count, n_output=stats.output_truncated_count,
             any=stats.any_truncated_share, waste_ref=stats.padding_waste_reference,
             waste_grouped=stats.padding_waste_grouped, n=stats.n, n_total=stats.n_total)
    notes = []
    if stats.history is not None:
        notes.append(t("data.history_note", lang, mean=stats.history.mean, max=stats.history.max))
    if stats.question_lost_count:
        notes.append(t("data.question_lost", lang, n=stats.question_lost_count, src=stats.max_source_length))
    if stats.control_token_count:
        notes.append(t("data.control_tokens", lang, n=stats.control_token_count))
    return "\n\n".join([text, *notes])


def summary_markdown(loaded, lang: str) -> str:
    s = loaded.splits
    origin = t("data.origin_sample", lang) if s.source == "sample" else s.origin
    summary = t("data.summary", lang, origin=md_text(origin), n_train=len(s.train), n_val=len(s.val))
    if s.detected:
        summary += "\n\n" + t("data.detected", lang, detected=md_code(s.detected))
        summary += " " + t("data.detected_guess", lang) if s.guessed else ""
    return summary + ("\n\n" + "\n".join(f"- {md_text(n)}" for n in s.notes) if s.notes else "")


def split_choices(names, lang: str) -> list[tuple[str, str]]:
    """A split dropdown's choices: 'auto' (the default rule) and the source's own split names."""
    return [(t("data.split_auto", lang), "")] + [(n, n) for n in names]


def stats_table(stats, lang: str) -> dict:
    from ..stats import reference_table

    headers = [t(f"data.col_{c}", lang) for c in ("field", "min", "max", "mean", "p95")]
    rows = [[t(f"data.hist_{r[0]}", lang), r[1], r[2], round(r[3], 2), round(r[4], 1)] for r in reference_table(stats)]
    return {"headers": headers, "data": rows}


def empty_stats_table(lang: str) -> dict:
    return {"headers": [t(f"data.col_{c}", lang) for c in ("field", "min", "max", "mean", "p95")], "data": []}


def preview_table(rows, lang):
    return {"headers": [t(f"data.col_{c}", lang) for c in ("index", "split", "instruction", "output")], "data": rows}
