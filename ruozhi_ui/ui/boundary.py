"""The boundary between handlers and the page: user errors, escaping, the visitor a request is from.

`user_errors(key)` is the one decorator that turns a RuozhiError raised inside a
handler into a `gr.Error` in the page: in the chosen language, HTML-escaped (a
toast renders HTML) and, in public mode, without server paths. Anything else is a
bug and propagates to Gradio's generic error. `md_text`/`md_code` make user or
model text safe inside Markdown: images and links show as text and fetch nothing.
"""

from __future__ import annotations

import functools
import html
import inspect
import re
import sys
import threading
import typing
from collections import OrderedDict

import gradio as gr

from ..errors import RuozhiError, first_line
from ..i18n import DEFAULT_LANG, t
from ..safelog import escape_controls

_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def md_text(text) -> str:
    """Plain text inside Markdown: HTML escaped, Markdown punctuation backslash-escaped."""
    return _MD_PUNCT.sub(r"\\\1", html.escape(str(text), quote=False))


# What could end an inline code span or the line it is on: backticks, and every line break a Markdown parser
# (or a browser) honours, \r and the Unicode separators included; other controls go too.
_CODE_BREAKS = re.compile("[`\x00-\x1f\x7f-\x9f\u2028\u2029]")


def md_code(text) -> str:
    """Inline code (paths, ids): shown literally on one line; nothing inside can close the span."""
    return "`" + _CODE_BREAKS.sub(lambda m: "'" if m.group() == "`" else " ", str(text)) + "`"


def _lang_of(arguments: dict) -> str:
    lang = arguments.get("lang")
    if lang is None:
        ctx = arguments.get("ctx")
        for value in arguments.values():  # handlers fed a dict of components carry the language in it
            if isinstance(value, dict) and ctx is not None and ctx.lang in value:
                lang = value[ctx.lang]
    return lang if lang in ("zh", "en") else DEFAULT_LANG


class LastErrors:
    """Each session's last user error, so the event's `.failure` step can show it beside the action
    (a toast alone goes away, and the outputs keep their earlier results)."""

    def __init__(self, size: int = 1000):
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock, self.size = threading.Lock(), size

    def record(self, session: str, text: str) -> None:
        with self._lock:
            self._items[session] = text
            self._items.move_to_end(session)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def pop(self, session: str) -> str:
        with self._lock:
            return self._items.pop(session, "")


def split_cause(error: RuozhiError, lang: str) -> tuple[str, str]:
    """(the message in `lang`, its raw cause or ''). A cause is a library's own words (English, an exception
    name): the message points to "details" in the page's language, the raw text goes into a fold."""
    params = getattr(error, "params", None) or {}
    if not getattr(error, "key", None) or "cause" not in params:
        return (error.localized(lang) if hasattr(error, "localized") else str(error)), ""
    plain = type(error)(key=error.key, **{**params, "cause": t("errors.cause_in_details", lang)})
    return plain.localized(lang), str(params["cause"])


def details_html(cause: str, lang: str) -> str:
    """The raw cause folded away under "details", escaped (a toast renders HTML)."""
    if not cause:
        return ""
    return (f"<details class='rz-details'><summary>{html.escape(t('errors.details', lang))}</summary>"
            f"<code>{html.escape(cause)}</code></details>")


def error_message(error: RuozhiError, arguments: dict, key: str | None) -> str:
    """The message a user sees, in their language, without server paths (public mode); plain text."""
    ctx = arguments.get("ctx")
    lang = _lang_of(arguments)
    text, _ = split_cause(error, lang)
    text = ctx.policy.redact(text) if ctx is not None else text
    print(f"user error: {type(error).__name__}: {escape_controls(first_line(error))}", file=sys.stderr)  # one line
    text = t(key, lang, error=text) if key else text
    if ctx is not None and getattr(ctx, "errors", None) is not None:
        ctx.errors.record(session_of(arguments.get("request")), text)
    return text


def show_last_error(ctx, request: gr.Request = None) -> str:
    """An event's `.failure` step: its error as a line beside the action that failed."""
    text = ctx.errors.pop(session_of(request))
    return f"<span class='rz-error'>⚠️ {md_text(text)}</span>" if text else ""


def resolved_hints(fn) -> dict:
    """`fn`'s annotations evaluated in its own module. Gradio reads a handler's hints to inject gr.Request;
    a wrapper defined elsewhere would have them evaluated in the wrong module (or not at all)."""
    try:
        return typing.get_type_hints(inspect.unwrap(fn))
    except (NameError, TypeError):
        return {}


def bind(fn, *bound):
    """`fn` with its first arguments bound, as a Gradio handler. Unlike functools.partial (which Gradio
    reads as an opaque callable), the handler keeps its remaining parameters' signature and resolved
    annotations, so Gradio injects gr.Request, and a generator stays a generator (streams)."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())[len(bound):]
    if inspect.isgeneratorfunction(fn):
        def handler(*args, **kwargs):
            yield from fn(*bound, *args, **kwargs)
    else:
        def handler(*args, **kwargs):
            return fn(*bound, *args, **kwargs)
    functools.update_wrapper(handler, fn)
    names = {p.name for p in params} | {"return"}
    handler.__signature__ = signature.replace(parameters=params)
    handler.__annotations__ = {k: v for k, v in resolved_hints(fn).items() if k in names}
    return handler


def user_errors(key: str | None = None):
    """Decorate a handler (function or generator): RuozhiError -> gr.Error(t(key, error=...))."""
    def wrap(fn):
        signature = inspect.signature(fn)

        def raise_for(error, args, kwargs):
            arguments = signature.bind_partial(*args, **kwargs).arguments
            lang, ctx = _lang_of(arguments), arguments.get("ctx")
            message = html.escape(error_message(error, arguments, key), quote=False)  # a toast renders HTML
            cause = split_cause(error, lang)[1]
            cause = ctx.policy.redact(cause) if ctx is not None else cause
            raise gr.Error(message + details_html(cause, lang), title=t("errors.toast_error", lang),
                           print_exception=False) from None

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def generator(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except RuozhiError as e:
                    raise_for(e, args, kwargs)
            generator.__annotations__ = resolved_hints(fn)
            return generator

        @functools.wraps(fn)
        def function(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RuozhiError as e:
                raise_for(e, args, kwargs)
        function.__annotations__ = resolved_hints(fn)
        return function
    return wrap


def session_of(request) -> str:
    """The Gradio session of a request ('' outside a request, e.g. in tests)."""
    return getattr(request, "session_hash", None) or ""


def show_errors_beside(ctx, event, slot, clear_on_success: bool = True) -> None:
    """An event's error (after its toast) stays as a line in `slot`; its success clears the line (unless the
    slot also shows the event's own result)."""
    private = dict(api_visibility="private", queue=False, show_progress="hidden")
    event.failure(bind(show_last_error, ctx), None, [slot], **private)
    if clear_on_success:
        event.success(lambda: "", None, [slot], **private)
