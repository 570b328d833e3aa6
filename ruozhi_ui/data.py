"""Dataset sources -> validated records, split into train and validation.

One source string selects where records come from: "sample" (bundled in
assets/), a local .json (list) or .jsonl file in alpaca or chat format, or a
Hugging Face dataset id ("owner/name", optionally "owner/name@file.json").
Files are parsed as data only (json), never executed or unpickled. Every bad
record is reported with its file, index or line, and field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataFormatError

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


def join_instruction(instruction: str, extra_input: str) -> str:
    """Alpaca convention: a non-empty `input` follows the instruction on a new line."""
    return f"{instruction}\n{extra_input}" if extra_input.strip() else instruction


def _string_field(obj: dict, key: str, where: str, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise DataFormatError(f"{where}: missing field '{key}'")
        return ""
    value = obj[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataFormatError(f"{where}: field '{key}' is empty")
    return value


def _chat_record(messages, where: str) -> Record:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    system, turns = None, []
    for j, m in enumerate(messages):
        at = f"{where}, messages[{j}]"
        if not isinstance(m, dict):
            raise DataFormatError(f"{at}: must be an object with 'role' and 'content'")
        role = _string_field(m, "role", at)
        if role not in ROLES:
            raise DataFormatError(f"{at}: field 'role' must be one of {', '.join(ROLES)}, got '{role}'")
        content = _string_field(m, "content", at)
        if role == "system":
            if j != 0:
                raise DataFormatError(f"{at}: a system message may only come first")
            system = content
        else:
            turns.append((role, content))
    expected = ["user", "assistant"] * (len(turns) // 2)
    if len(turns) < 2 or [r for r, _ in turns] != expected:
        raise DataFormatError(f"{where}: field 'messages' must alternate user/assistant and end with an assistant answer")
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
    return Record(instruction=pairs[-1][0], output=pairs[-1][1], system=system, history=tuple(pairs[:-1]))


def parse_record(obj, where: str) -> Record:
    """One alpaca ({instruction, input?, output}) or chat ({messages}) object -> Record."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: each record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _chat_record(obj["messages"], where)
    instruction = _string_field(obj, "instruction", where)
    extra = _string_field(obj, "input", where, required=False)
    output = _string_field(obj, "output", where)
    return Record(instruction=join_instruction(instruction, extra), output=output)


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataFormatError(
            f"{path.name}: file is {size / 2**20:.0f} MB, over the {MAX_FILE_BYTES // 2**20} MB limit; split it or load it from the Hub")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataFormatError(f"{path.name}: line {line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    if not text.strip():
        raise DataFormatError(f"{path.name}: the file is empty")
    return text


def read_records_file(path: str | Path) -> list[Record]:
    """Parse a .json (a list of records) or .jsonl (one record per line) file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataFormatError(f"{path.name}: unsupported file type '{suffix}'; use .json (a list) or .jsonl (one object per line)")
    text = _read_text(path)
    records = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path.name}: line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
            records.append(parse_record(obj, f"{path.name}: line {n}"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path.name}: line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(data, list):
            raise DataFormatError(f"{path.name}: the top level must be a list of records, got {type(data).__name__}; for one record per line use .jsonl")
        records = [parse_record(obj, f"{path.name}: record {i}") for i, obj in enumerate(data)]
    if not records:
        raise DataFormatError(f"{path.name}: no records found")
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


def _load_hub(source: str) -> tuple[dict[str, list[Record]], str]:
    """Load a Hub dataset with `datasets`; returns {split: records}."""
    import datasets  # heavy: only when the Hub path is taken

    repo, _, data_file = source.partition("@")
    try:
        ds = datasets.load_dataset(repo, data_files=data_file or None)
    except Exception as e:  # offline, missing repo, gated, bad files: all end here
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise DataFormatError(
            f"Could not load the Hub dataset '{source}' ({cause}). If this machine is offline or the id is wrong, "
            "use the bundled sample ('sample') or upload a .json/.jsonl file.") from None
    splits = {}
    for name, split in ds.items():
        splits[name] = [parse_record(obj, f"{source} [{name}] record {i}") for i, obj in enumerate(split)]
    return splits, f"{repo} ({', '.join(f'{k}: {len(v)}' for k, v in splits.items())})"


def load_source(source: str, val_fraction: float = 0.05, seed: int = 42) -> DatasetSplits:
    """Resolve a source string to train/validation records (raises DataFormatError)."""
    source = source.strip()
    if not source:
        raise DataFormatError("No dataset source given: use 'sample', a .json/.jsonl file, or a Hub id")
    notes = []
    if source == "sample":
        train = read_records_file(SAMPLE_DIR / "train.json")
        val = read_records_file(SAMPLE_DIR / "val.json")
        origin, val_from_source = "bundled sample (assets/sample)", True
    elif source.lower().endswith((".json", ".jsonl")) or Path(source).exists():
        records = read_records_file(source)
        train, val = split_records(records, val_fraction, seed)
        origin, val_from_source = str(Path(source).name), False
    elif "/" in source and not source.startswith((".", "/")):
        splits, origin = _load_hub(source)
        train = splits.get("train") or next(iter(splits.values()), [])
        val_name = next((n for n in ("validation", "valid", "val", "test") if n in splits), None)
        if val_name:
            val, val_from_source = splits[val_name], True
        else:
            train, val = split_records(train, val_fraction, seed)
            val_from_source = False
    else:
        raise DataFormatError(
            f"'{source}' is neither 'sample', an existing .json/.jsonl file, nor a Hub id like 'owner/name'")
    if not train:
        raise DataFormatError(f"{source}: no training records")
    duplicates = count_duplicates(train + val)
    if duplicates:
        notes.append(f"{duplicates} duplicate record(s) found (same instruction and output)")
    return DatasetSplits(train=train, val=val, source=source, origin=origin, val_from_source=val_from_source,
                         duplicates=duplicates, notes=notes)
