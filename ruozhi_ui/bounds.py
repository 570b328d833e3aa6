"""Dataset size bounds checked after parsing and before anything tokenises or measures the records.

A file within the upload byte limit can still hold one record of 45 MB, which the
tokenizer and the statistics then chew on for minutes and gigabytes. `check_records`
counts characters (a cheap pass over strings already in memory) and refuses a record
over `record_chars` or a dataset over `file_chars` with a message naming them. The
bounds are the process's policy (`configure`, called when the app is built);
unconfigured, only absurd sizes are refused. Knows nothing of Gradio.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DataFormatError


@dataclass(frozen=True)
class RecordBounds:
    record_chars: int = 10**7
    file_chars: int = 10**9


_bounds = RecordBounds()


def configure(record_chars: int, file_chars: int) -> None:
    global _bounds
    _bounds = RecordBounds(record_chars, file_chars)


def current() -> RecordBounds:
    return _bounds


def record_size(record) -> int:
    return (len(record.instruction) + len(record.output) + len(record.system or "")
            + sum(len(u) + len(a) for u, a in record.history))


def check_records(records, name: str) -> None:
    """DataFormatError naming the first record over the bound, or the dataset's total over its bound."""
    bounds, total = _bounds, 0
    for i, record in enumerate(records):
        size = record_size(record)
        if size > bounds.record_chars:
            raise DataFormatError(key="err.data.record_chars", name=name, index=i, n=f"{size:,}",
                                  max=f"{bounds.record_chars:,}")
        total += size
        if total > bounds.file_chars:
            raise DataFormatError(key="err.data.file_chars", name=name, max=f"{bounds.file_chars:,}")
