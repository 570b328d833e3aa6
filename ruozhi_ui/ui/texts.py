"""The page's one language switch: every fixed text is an i18n key, re-rendered server-side on a switch.

Layout code writes `T("data.load")` wherever Gradio takes text (a label, info, placeholder,
choice, tab or button text, a Markdown block). `T` returns the default-language text as a
`Key` (a str that remembers its key; for a Button's caption or a Markdown block, which
Gradio stores as a plain str, the key is found back from the text); `translations(demo)`
finds every such text in a built app, and `language_updates(...)` turns them into one
`gr.update` per component for a language. So labels, server-made texts, charts and errors all follow the same switch (no
second, browser-locale mechanism). The choice is kept in the browser's localStorage and
defaults to the browser's language (`PICK_LANGUAGE_JS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..i18n import DEFAULT_LANG, LANGS, t

STORAGE_KEY = "ruozhi-lang"
# Page load: the language stored by an earlier visit, else the browser's (zh for any Chinese locale).
# The page's <html lang> follows the choice (screen readers, and the CSS that titles Gradio's toasts).
PICK_LANGUAGE_JS = f"""() => {{
    const stored = window.localStorage.getItem('{STORAGE_KEY}');
    const lang = (stored === 'zh' || stored === 'en') ? stored
        : (navigator.language || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en';
    document.documentElement.lang = lang;
    return lang;
}}"""
# A switch: remember it for the next visit, then let the server re-render the page's texts.
STORE_LANGUAGE_JS = f"""(lang) => {{ window.localStorage.setItem('{STORAGE_KEY}', lang);
    document.documentElement.lang = lang; return lang; }}"""
TOAST_KINDS = ("error", "warning", "info")


def toast_title_css() -> str:
    """Gradio 6.31 titles a toast with its kind in English ("Error") whatever gr.Error(title=) says; this CSS
    writes the title in the page's language instead, keyed on <html lang>."""
    rules = [".toast-title { font-size: 0 !important; }",
             ".toast-title::before { font-size: var(--text-md, 14px); }"]
    for kind in TOAST_KINDS:
        for lang in LANGS:
            scope = "" if lang == DEFAULT_LANG else f'html[lang="{lang}"] '
            rules.append(f'{scope}.toast-title.{kind}::before {{ content: "{t(f"errors.toast_{kind}", lang)}"; }}')
    return "\n".join(rules)
TEXT_PROPS = ("label", "info", "placeholder")


class Key(str):
    """Text in the default language that remembers its i18n key."""

    key: str

    def __new__(cls, key: str):
        text = super().__new__(cls, t(key, DEFAULT_LANG))
        text.key = key
        return text

    def __reduce__(self):  # Gradio deep-copies components: a copy must be built from the key, not the text
        return Key, (self.key,)


def T(key: str) -> Key:
    return Key(key)


@dataclass(frozen=True)
class Translatable:
    component: object
    props: dict  # prop -> key (or, for "choices", a list of (key or text, value))


def translations(demo: gr.Blocks) -> list[Translatable]:
    """Every component of a built app with text to re-render on a language switch."""
    found = []
    for block in demo.blocks.values():
        props = {p: getattr(block, p).key for p in TEXT_PROPS if isinstance(getattr(block, p, None), Key)}
        choices = getattr(block, "choices", None)
        if isinstance(choices, list) and any(isinstance(c, (list, tuple)) and isinstance(c[0], Key) for c in choices):
            props["choices"] = [(c[0].key if isinstance(c[0], Key) else c[0], c[1]) for c in choices]
        if isinstance(block, (gr.Button, gr.Markdown)) and isinstance(block.value, str) and block.value in _keys_by_text():
            props["value"] = _keys_by_text()[block.value]  # Gradio keeps a fixed caption as a plain str
        if props:
            found.append(Translatable(block, props))
    return found


def language_updates(items: list[Translatable], lang: str) -> list:
    """One gr.update per translatable component, in `items` order."""
    lang = lang if lang in LANGS else DEFAULT_LANG
    updates = []
    for item in items:
        change = {}
        for prop, key in item.props.items():
            if prop == "choices":
                change["choices"] = [(t(k, lang) if isinstance(k, str) and _is_key(k) else k, v) for k, v in key]
            else:
                change[prop] = t(key, lang)
        updates.append(gr.update(**change))
    return updates


def _is_key(text: str) -> bool:
    from ..i18n import STRINGS

    return text in STRINGS


def _keys_by_text() -> dict[str, str]:
    """Default-language text -> its key (a test checks that no two keys share a text with different
    translations, so the lookup is exact)."""
    from ..i18n import STRINGS

    return {entry[DEFAULT_LANG]: key for key, entry in STRINGS.items()}
