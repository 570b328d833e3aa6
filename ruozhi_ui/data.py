"""Dataset sources -> validated records, split into train and validation.

One source string selects where records come from: "sample" (bundled in
assets/), a local .json (list) or .jsonl file in alpaca or chat format, or a
Hugging Face dataset id ("owner/name", optionally "owner/name@file.json").
Files are parsed as data only (json), never executed or unpickled. Every bad
record is reported with its file, index or line, and field: malformed JSON, nesting
too deep, numbers too long, strings that are not valid Unicode (lone surrogates).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import specs
from .bounds import check_records
from .errors import DataFormatError, first_line

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_DIR = ASSETS / "sample"
MAX_FILE_BYTES = 200 * 1024 * 1024  # uploads above this are refused before parsing
ROLES = ("system", "user", "assistant")


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


@dataclass(frozen=True)
class Where:
    """Where in a source a problem is, said in the reader's language: 'x.json: record 3, messages[1]'."""
    name: str
    line: int | None = None
    record: int | None = None
    message: int | None = None

    def localized(self, lang: str) -> str:
        zh = lang == "zh"
        text = self.name
        if self.line is not None:
            text += f"：第 {self.line} 行" if zh else f": line {self.line}"
        if self.record is not None:
            text += f"：第 {self.record} 条记录" if zh else f": record {self.record}"
        if self.message is not None:
            text += f"，messages[{self.message}]" if zh else f", messages[{self.message}]"
        return text

    def __str__(self) -> str:
        return self.localized("en")

    def at_message(self, index: int) -> "Where":
        return dataclasses.replace(self, message=index)


def join_instruction(instruction: str, extra_input: str) -> str:
    """Alpaca convention: a non-empty `input` follows the instruction on a new line."""
    return f"{instruction}\n{extra_input}" if extra_input.strip() else instruction


def _string_field(obj: dict, key: str, where: str, required: bool = True) -> str:
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


def _chat_record(messages, where: str) -> Record:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(key="err.data.messages_list", where=where)
    system, turns = None, []
    for j, m in enumerate(messages):
        at = where.at_message(j)
        if not isinstance(m, dict):
            raise DataFormatError(key="err.data.message_object", where=at)
        role = _string_field(m, "role", at)
        if role not in ROLES:
            raise DataFormatError(key="err.data.role", where=at, roles=", ".join(ROLES), role=role)
        content = _string_field(m, "content", at)
        if role == "system":
            if j != 0:
                raise DataFormatError(key="err.data.system_first", where=at)
            system = content
        else:
            turns.append((role, content))
    expected = ["user", "assistant"] * (len(turns) // 2)
    if len(turns) < 2 or [r for r, _ in turns] != expected:
        raise DataFormatError(key="err.data.alternate", where=where)
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
    return Record(instruction=pairs[-1][0], output=pairs[-1][1], system=system, history=tuple(pairs[:-1]))


def parse_record(obj, where: str) -> Record:
    """One alpaca ({instruction, input?, output}) or chat ({messages}) object -> Record."""
    if not isinstance(obj, dict):
        raise DataFormatError(key="err.data.record_object", where=where, type=type(obj).__name__)
    if "messages" in obj:
        return _chat_record(obj["messages"], where)
    instruction = _string_field(obj, "instruction", where)
    extra = _string_field(obj, "input", where, required=False)
    output = _string_field(obj, "output", where)
    return Record(instruction=join_instruction(instruction, extra), output=output)


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataFormatError(key="err.data.too_big", name=path.name, mb=f"{size / 2**20:.0f}",
                              limit=MAX_FILE_BYTES // 2**20)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataFormatError(key="err.data.not_utf8", where=Where(path.name, line=line), byte=e.start) from None
    if not text.strip():
        raise DataFormatError(key="err.data.empty_file", name=path.name)
    return text


def _parse_json(text: str, name: str, line: int | None = None):
    """json.loads with every way it can fail reported as one DataFormatError line."""
    at = Where(name, line=line)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(key="err.data.invalid_json", where=Where(name, line=line or e.lineno), msg=e.msg,
                              column=e.colno) from None
    except RecursionError:
        raise DataFormatError(key="err.data.too_deep", where=at) from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise DataFormatError(key="err.data.bad_value", where=at, detail=first_line(e)) from None


def read_records_file(path: str | Path, shown_name: str | None = None) -> list[Record]:
    """Parse a .json (a list of records) or .jsonl (one record per line) file; messages name it `shown_name`."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(key="err.data.no_file", name=shown_name or str(path))
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataFormatError(key="err.data.file_type", name=path.name, suffix=suffix)
    text = _read_text(path)
    records = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(parse_record(_parse_json(line, path.name, n), Where(path.name, line=n)))
    else:
        data = _parse_json(text, path.name)
        if not isinstance(data, list):
            raise DataFormatError(key="err.data.top_level", name=path.name, type=type(data).__name__)
        records = [parse_record(obj, Where(path.name, record=i)) for i, obj in enumerate(data)]
    if not records:
        raise DataFormatError(key="err.data.no_records", name=path.name)
    return records


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


def hub_dataset_bytes(repo: str, data_file: str | None) -> int | None:
    """The bytes `load_dataset` would download (that one file, or the repo's data files), or None when the
    Hub cannot say (offline: the cache decides)."""
    try:
        from huggingface_hub import HfApi

        info = HfApi().dataset_info(repo, files_metadata=True, timeout=10)
    except Exception:  # noqa: BLE001 - offline, gated: load_dataset reports it, or the cache serves it
        return None
    files = [f for f in info.siblings or [] if (f.rfilename == data_file if data_file else not f.rfilename.startswith("."))]
    return sum(f.size or 0 for f in files)


def _load_hub(source: str, max_bytes: int | None = None) -> tuple[dict[str, list[Record]], str]:
    """Load a Hub dataset with `datasets`; returns {split: records}. `max_bytes` refuses a bigger download."""
    import datasets  # heavy: only when the Hub path is taken

    repo, data_file = specs.split_hub_dataset(source)
    if max_bytes is not None:
        size = hub_dataset_bytes(repo, data_file)
        if size is not None and size > max_bytes:
            raise DataFormatError(key="err.data.hub_too_big", source=source, mb=f"{size / 2**20:.0f}",
                                  limit=max_bytes // 2**20)
    try:
        ds = datasets.load_dataset(repo, data_files=data_file)
    except Exception as e:  # offline, missing repo, gated, bad files: all end here
        cause = f"{type(e).__name__}: {first_line(e)}"
        raise DataFormatError(key="err.data.hub_failed", source=source, cause=cause) from None
    splits = {}
    for name, split in ds.items():
        splits[name] = [parse_record(obj, Where(f"{source} [{name}]", record=i)) for i, obj in enumerate(split)]
    return splits, f"{repo} ({', '.join(f'{k}: {len(v)}' for k, v in splits.items())})"


def load_source(source: str, val_fraction: float = 0.05, seed: int = 42, uploads_dir: Path | None = None,
                max_hub_bytes: int | None = None) -> DatasetSplits:
    """Resolve a source string to train/validation records (raises DataFormatError).

    `upload:<name>` reads `uploads_dir/<name>`; who may name which source is the policy's
    business (policy.check_data_source), done before this is called.
    """
    source = source.strip()
    if not source:
        raise DataFormatError(key="err.data.no_source")
    notes = []
    kind = specs.data_kind(source)
    if kind == "sample":
        train = read_records_file(SAMPLE_DIR / "train.json")
        val = read_records_file(SAMPLE_DIR / "val.json")
        origin, val_from_source = "bundled sample (assets/sample)", True
    elif kind in ("upload", "path"):
        name = specs.upload_name(source) if kind == "upload" else Path(source).name
        if kind == "upload" and (uploads_dir is None or Path(name).name != name):
            raise DataFormatError(key="err.data.no_upload", name=name)
        path = Path(uploads_dir) / name if kind == "upload" else Path(source).expanduser()
        records = read_records_file(path, shown_name=name if kind == "upload" else None)
        train, val = split_records(records, val_fraction, seed)
        origin, val_from_source = name, False
    elif kind == "hub":
        splits, origin = _load_hub(source, max_hub_bytes)
        train = splits.get("train") or next(iter(splits.values()), [])
        val_name = next((n for n in ("validation", "valid", "val", "test") if n in splits), None)
        if val_name:
            val, val_from_source = splits[val_name], True
        else:
            train, val = split_records(train, val_fraction, seed)
            val_from_source = False
    else:
        raise DataFormatError(key="err.data.unknown_source", source=source)
    if not train:
        raise DataFormatError(key="err.data.no_train", source=source)
    check_records(train + val, origin)  # sizes bounded before anything tokenises them (bounds.py)
    duplicates = count_duplicates(train + val)
    if duplicates:
        notes.append(f"{duplicates} duplicate record(s) found (same instruction and output)")
    return DatasetSplits(train=train, val=val, source=source, origin=origin, val_from_source=val_from_source,
                         duplicates=duplicates, notes=notes)
