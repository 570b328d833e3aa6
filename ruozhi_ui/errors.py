"""The app's error types, in one place.

Every message names the field or file at fault and says how to fix it. The UI
turns these into `gr.Error`, the CLI into a one-line message and a non-zero exit;
neither shows a traceback for them.
"""


class RuozhiError(Exception):
    """Base class: an error the user can act on.

    Raised either with a plain English message, or with an i18n key and its fields
    (`ConfigError(key="err.epochs_min")`): then `str(e)` is the English text (the CLI's
    line) and `localized(lang)` the page's, so one language switch covers errors too.
    """

    def __init__(self, message: str = "", *, key: str | None = None, **params):
        from .i18n import t  # pure module; imported late to keep this one dependency-free at import

        self.key, self.params = key, params
        super().__init__(t(key, "en", **params) if key else message)

    def localized(self, lang: str) -> str:
        """The message in `lang`; a field that can say itself in a language (data.Where) does so."""
        from .i18n import t

        if not self.key:
            return str(self)
        return t(self.key, lang, **{k: v.localized(lang) if hasattr(v, "localized") else v
                                    for k, v in self.params.items()})


class ConfigError(RuozhiError):
    """A setting is out of range or contradicts another."""


class DataFormatError(RuozhiError):
    """A dataset source could not be read or a record is malformed."""


class ModelLoadError(RuozhiError):
    """A model or tokenizer could not be loaded from the given spec."""


class JobConflict(RuozhiError):
    """A training job is already running."""


class GenerationError(RuozhiError):
    """A prompt or checkpoint cannot be used for generation."""


class PolicyError(RuozhiError):
    """The app's mode does not allow this (a server path, a model off the allowlist, a limit)."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name: what a one-line report shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
