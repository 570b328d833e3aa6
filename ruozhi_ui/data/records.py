"""The records every reader produces, where a problem in a source is, and the checks every text field passes.

Knows nothing of formats or files: a `Record` is one dialogue to learn the last answer of (its earlier
turns as history), whichever format it was read from.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from ..errors import DataFormatError


@dataclass(frozen=True)
class Record:
    instruction: str  # the user turn to answer (alpaca `input` already joined in)
    output: str  # the answer to learn
    system: str | None = None  # the record's own system prompt, if it has one
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) turns, not trained on


@dataclass(frozen=True)
class DatasetSplits:
    train: list[Record]
    val: list[Record]
    source: str  # what the user asked for
    origin: str  # where it actually came from (file path, hub id + split names)
    val_from_source: bool  # True when the source had its own validation split
    duplicates: int = 0  # records whose (instruction, output) appeared earlier
    notes: list[str] = field(default_factory=list)
    detected: str = ""  # the format and column mapping the records were read with ("format=sharegpt,...")
    guessed: bool = False  # the mapping was guessed from column names: the Data tab asks to check it
    columns: tuple[str, ...] = ()  # the source's column (field) names, to choose a mapping from
    subsets: tuple[str, ...] = ()  # a Hub dataset's configs, when it has several
    splits: tuple[str, ...] = ()  # the splits of the source (Hub), to choose train / validation from


@dataclass(frozen=True)
class Where:
    """Where in a source a problem is, said in the reader's language: 'x.json: record 3, messages[1]'."""
    name: str
    line: int | None = None
    record: int | None = None
    message: int | None = None
    list_name: str = "messages"  # the field holding the conversation (ShareGPT: 'conversations')

    def localized(self, lang: str) -> str:
        zh = lang == "zh"
        text = self.name
        if self.line is not None:
            text += f"：第 {self.line} 行" if zh else f": line {self.line}"
        if self.record is not None:
            text += f"：第 {self.record} 条记录" if zh else f": record {self.record}"
        if self.message is not None:
            text += f"，{self.list_name}[{self.message}]" if zh else f", {self.list_name}[{self.message}]"
        return text

    def __str__(self) -> str:
        return self.localized("en")

    def at_message(self, index: int, list_name: str = "messages") -> "Where":
        return dataclasses.replace(self, message=index, list_name=list_name)


def join_instruction(instruction: str, extra_input: str) -> str:
    """Alpaca convention: a non-empty `input` follows the instruction on a new line."""
    return f"{instruction}\n{extra_input}" if extra_input.strip() else instruction


def string_field(obj: dict, key: str, where, required: bool = True) -> str:
    """obj[key] as a checked string: present (unless optional), a string, not empty, valid Unicode, no NUL."""
    if key not in obj:
        if required:
            raise DataFormatError(key="err.data.missing_field", where=where, field=key)
        return ""
    value = obj[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(key="err.data.not_string", where=where, field=key, type=type(value).__name__)
    if required and not value.strip():
        raise DataFormatError(key="err.data.empty_field", where=where, field=key)
    bad = next((c for c in value if "\ud800" <= c <= "\udfff" or c == "\x00"), None)
    if bad is not None:  # a lone surrogate cannot be encoded as UTF-8: the tokenizer and every page would fail later
        if bad == "\x00":
            raise DataFormatError(key="err.data.nul", where=where, field=key)
        raise DataFormatError(key="err.data.surrogate", where=where, field=key, code=f"{ord(bad):04X}")
    return value


def split_records(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded hold-out: the same seed always holds out the same records."""
    if val_fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(records) * val_fraction)), len(records) - 1)
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx]


def count_duplicates(records: list[Record]) -> int:
    seen, dup = set(), 0
    for r in records:
        key = (r.instruction, r.output, r.system, r.history)
        dup += key in seen
        seen.add(key)
    return dup
