"""The Compare panes' titles: which weights each pane answers with, how they were trained, how they decode.

Presentation only, in the page's language; every name a visitor chose (a model spec, a checkpoint) lands in
inline code. The Compare tab (compare_tab.py) calls these when a pane's model changes or an answer starts.
"""

from __future__ import annotations

from .. import generation as g
from ..checkpoints import ADAPTER_CONFIG
from ..config import GenConfig
from ..errors import RuozhiError
from ..i18n import t
from ..policy import Visitor
from .boundary import md_code, md_text
from .context import AppContext


def base_title(spec: str, lang: str) -> str:
    """The base pane's title, in the page's language; the spec (a visitor's text) as inline code."""
    if not spec:
        return ""
    name = t("compare.demo_model", lang) if spec.strip().lower() == "demo" else spec
    return t("compare.pane_base", lang, label=md_code(name))


def tuned_title(ctx: AppContext, visitor: Visitor, checkpoint: str | None, lang: str) -> str:
    """The tuned pane's title: the checkpoint's name as the visitor picked it, and how it was trained."""
    if not checkpoint:
        return t("compare.tuned_none", lang)
    try:
        path = ctx.policy.resolve_checkpoint(checkpoint, visitor)
        cfg = g.checkpoint_config(path)
    except RuozhiError:
        path = cfg = None
    how = ""
    if cfg is not None:
        base = md_code(t("compare.demo_model", lang) if cfg.model.spec == "demo" else cfg.model.spec)
        kind = ("how_lora" if (path / ADAPTER_CONFIG).is_file()
                else "how_merged" if cfg.method == "lora" else "how_full")
        how = t(f"compare.{kind}", lang, r=cfg.lora_rank, base=base)
    return t("compare.pane_tuned", lang, label=md_code(checkpoint), how=how)


def settings_line(settings, lang: str) -> str:
    """How a model decodes (decoding.DecodeSettings), in the page's language; '(model)' marks its own values."""
    def mark(name: str) -> str:
        return t("compare.dec_model", lang) if name in settings.from_model else ""

    if settings.do_sample:
        how = t("compare.dec_sampling", lang, mark=mark("do_sample"), temperature=f"{settings.temperature:g}",
                t_mark=mark("temperature"), top_p=f"{settings.top_p:g}", p_mark=mark("top_p"), top_k=settings.top_k,
                k_mark=mark("top_k"))
    else:
        how = t("compare.dec_greedy", lang, mark=mark("do_sample"))
    penalty = (t("compare.dec_penalty", lang, value=f"{settings.repetition_penalty:g}",
                 mark=mark("repetition_penalty")) if settings.repetition_penalty != 1.0
               else t("compare.dec_no_penalty", lang, mark=mark("repetition_penalty")))
    ends = ", ".join(settings.eos_tokens or map(str, settings.eos_token_ids))
    stops = (t("compare.dec_stops", lang, ends=ends, mark=mark("eos_token_ids")) if settings.eos_token_ids
             else t("compare.dec_never_stops", lang))
    return " · ".join((how, penalty, stops, t("compare.dec_at_most", lang, n=settings.max_new_tokens)))


def with_settings(title: str, loaded, gen: GenConfig, lang: str) -> str:
    """A pane's title and, under it, how that model decodes (its own generation_config unless overridden)."""
    line = md_text(settings_line(g.settings_for(loaded, gen), lang))
    return f"{title}  \n<small>{t('compare.decoding', lang, settings=line)}</small>"
