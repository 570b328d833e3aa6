"""Server log lines that data cannot forge: control characters written as escapes.

A dataset or a visitor's text can hold terminal escapes (ESC [ ...), a carriage
return that overwrites the start of a line, or a lone surrogate. `escape_controls`
writes every control character other than newline and tab as `\\xNN`/`\\uNNNN`,
and a lone surrogate as `\\udNNN`; `install()` wraps the process's stdout and stderr
so that every line anything prints (Gradio's and uvicorn's logs included) goes
through it. Progress bars that redraw with a carriage return print as lines.
"""

from __future__ import annotations

import re
import sys

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii")
                        if not "\ud800" <= m.group() <= "\udfff" else f"\\u{ord(m.group()):04x}", str(text))


class SafeStream:
    """A text stream whose writes are escaped; everything else is the wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text) -> int:
        self._stream.write(escape_controls(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def install() -> None:
    if not isinstance(sys.stdout, SafeStream):
        sys.stdout = SafeStream(sys.stdout)
    if not isinstance(sys.stderr, SafeStream):
        sys.stderr = SafeStream(sys.stderr)
