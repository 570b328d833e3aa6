"""Dataset sources -> validated records, split into train and validation.

One source string selects where records come from: "sample" (bundled in assets/), a local
file (.json list, .jsonl, .csv, .tsv or .parquet), an upload, or a Hugging Face dataset id
("owner/name", optionally "owner/name@file.json"), with a config (subset) and splits to take.
Each file becomes (record object, where) rows; `formats.py` detects the format (alpaca with
input/history, OpenAI messages, ShareGPT, or a table's columns under any names, with a
`ColumnMap` saying which is which) and reads every row into the same `Record`s. Files are parsed
as data only (json, csv, parquet), never executed or unpickled. Every bad record is reported
with its file, index or line, and field.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .. import specs
from ..errors import DataFormatError, first_line
from ..bounds import check_records
from .formats import FORMATS, ROLES, ColumnMap, parse_columns, parse_record, read_records
from .records import (DatasetSplits, Record, Where, count_duplicates, join_instruction, split_records,
                      string_field)

__all__ = ["ASSETS", "SAMPLE_DIR", "MAX_FILE_BYTES", "ROLES", "FORMATS", "TABLE_SUFFIXES", "ColumnMap", "DatasetSplits",
           "Record", "Where", "count_duplicates", "hub_dataset_bytes", "join_instruction", "load_source",
           "parse_columns", "parse_record", "read_records_file", "read_source_file", "split_records", "string_field"]

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
SAMPLE_DIR = ASSETS / "sample"
SAMPLE_ORIGIN = "bundled sample (assets/sample)"  # the Data tab shows it in the page's language (i18n)
MAX_FILE_BYTES = 200 * 1024 * 1024  # uploads above this are refused before parsing
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataFormatError(key="err.data.too_big", name=path.name, mb=f"{size / 2**20:.0f}",
                              limit=MAX_FILE_BYTES // 2**20)


def _read_text(path: Path) -> str:
    _check_size(path)
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


def _json_rows(path: Path, suffix: str):
    text = _read_text(path)
    if suffix == ".jsonl":
        return [(_parse_json(line, path.name, n), Where(path.name, line=n))
                for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    data = _parse_json(text, path.name)
    if not isinstance(data, list):
        raise DataFormatError(key="err.data.top_level", name=path.name, type=type(data).__name__)
    return [(obj, Where(path.name, record=i)) for i, obj in enumerate(data)]


def _delimited_rows(path: Path, delimiter: str):
    """CSV / TSV with a header row; each row is named by the line it starts on (the header is line 1)."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    rows, line = [], reader.line_num + 1
    try:
        for row in reader:
            rows.append(({k: v for k, v in row.items() if k is not None}, Where(path.name, line=line)))
            line = reader.line_num + 1
    except csv.Error as e:
        raise DataFormatError(key="err.data.bad_table", where=Where(path.name, line=reader.line_num),
                              detail=first_line(e)) from None
    return rows


def _parquet_rows(path: Path):
    _check_size(path)
    import pyarrow.parquet as pq  # pyarrow comes with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - not a parquet file, a truncated one: all one message
        raise DataFormatError(key="err.data.bad_table", where=Where(path.name), detail=first_line(e)) from None
    return [(row, Where(path.name, record=i)) for i, row in enumerate(table.to_pylist())]


def read_source_file(path: str | Path, columns: ColumnMap | None = None, shown_name: str | None = None
                     ) -> tuple[list[Record], ColumnMap, bool, tuple[str, ...]]:
    """A .json / .jsonl / .csv / .tsv / .parquet file -> (records, the mapping used, guessed?, its columns)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(key="err.data.no_file", name=shown_name or str(path))
    suffix = path.suffix.lower()
    if suffix not in specs.DATA_SUFFIXES:
        raise DataFormatError(key="err.data.file_type", name=path.name, suffix=suffix)
    if suffix in (".json", ".jsonl"):
        rows = _json_rows(path, suffix)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        rows = _delimited_rows(path, "\t" if suffix == ".tsv" else ",")
    records, mapping, guessed = read_records(rows, columns or ColumnMap())
    if not records:
        raise DataFormatError(key="err.data.no_records", name=path.name)
    first = rows[0][0]
    return records, mapping, guessed, tuple(str(k) for k in first) if isinstance(first, dict) else ()


def read_records_file(path: str | Path, shown_name: str | None = None, columns: ColumnMap | None = None
                      ) -> list[Record]:
    """The records of one file (see `read_source_file`); messages name it `shown_name`."""
    return read_source_file(path, columns, shown_name)[0]


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


def hub_subsets(repo: str) -> tuple[str, ...]:
    """A Hub dataset's configs (subsets); () when it has one or the Hub cannot say."""
    import datasets

    try:
        names = tuple(datasets.get_dataset_config_names(repo))
    except Exception:  # noqa: BLE001 - offline or one unnamed config: load_dataset decides
        return ()
    return names if len(names) > 1 else ()


def _load_hub(source: str, max_bytes: int | None, subset: str, columns: ColumnMap):
    """Load a Hub dataset with `datasets`: ({split: records}, mapping, guessed, columns, subsets, origin).
    `max_bytes` refuses a bigger download; `subset` picks a config ("" = its default, else the first)."""
    import datasets  # heavy: only when the Hub path is taken

    repo, data_file = specs.split_hub_dataset(source)
    if max_bytes is not None:
        size = hub_dataset_bytes(repo, data_file)
        if size is not None and size > max_bytes:
            raise DataFormatError(key="err.data.hub_too_big", source=source, mb=f"{size / 2**20:.0f}",
                                  limit=max_bytes // 2**20)
    subsets = () if data_file else hub_subsets(repo)
    name = subset or (subsets[0] if subsets else None)
    try:
        ds = datasets.load_dataset(repo, name, data_files=data_file)
    except Exception as e:  # offline, missing repo, gated, bad files: all end here
        cause = f"{type(e).__name__}: {first_line(e)}"
        raise DataFormatError(key="err.data.hub_failed", source=source, cause=cause) from None
    splits, mapping, guessed, names = {}, columns, False, ()
    for split_name, split in ds.items():
        shown = f"{source} [{name}/{split_name}]" if name else f"{source} [{split_name}]"
        splits[split_name], mapping, guessed = read_records(
            ((obj, Where(shown, record=i)) for i, obj in enumerate(split)), mapping)
        names = names or tuple(split.column_names)
    label = f"{repo} {name}" if name else repo
    return splits, mapping, guessed, names, subsets, f"{label} ({', '.join(f'{k}: {len(v)}' for k, v in splits.items())})"


def load_source(source: str, val_fraction: float = 0.05, seed: int = 42, uploads_dir: Path | None = None,
                max_hub_bytes: int | None = None, columns: str | ColumnMap = "", subset: str = "",
                train_split: str = "", val_split: str = "") -> DatasetSplits:
    """Resolve a source string to train/validation records (raises DataFormatError).

    `columns` maps fields (see formats.ColumnMap); `subset`, `train_split` and `val_split` choose a Hub
    dataset's config and splits ("" = its default config, 'train' or the first split, and a split named
    validation/valid/val/test if there is one, else a seeded hold-out of `val_fraction`).
    `upload:<name>` reads `uploads_dir/<name>`; who may name which source is the policy's
    business (policy.check_data_source), done before this is called.
    """
    source = source.strip()
    if not source:
        raise DataFormatError(key="err.data.no_source")
    given = columns if isinstance(columns, ColumnMap) else parse_columns(columns)
    kind = specs.data_kind(source)
    names, subsets, split_names, guessed = (), (), (), False
    if kind == "sample":
        train, mapping, _, names = read_source_file(SAMPLE_DIR / "train.json", given)
        val = read_records_file(SAMPLE_DIR / "val.json", columns=mapping)
        origin, val_from_source = SAMPLE_ORIGIN, True
    elif kind in ("upload", "path"):
        name = specs.upload_name(source) if kind == "upload" else Path(source).name
        if kind == "upload" and (uploads_dir is None or Path(name).name != name):
            raise DataFormatError(key="err.data.no_upload", name=name)
        path = Path(uploads_dir) / name if kind == "upload" else Path(source).expanduser()
        records, mapping, guessed, names = read_source_file(path, given, shown_name=name if kind == "upload" else None)
        train, val = split_records(records, val_fraction, seed)
        origin, val_from_source = name, False
    elif kind == "hub":
        splits, mapping, guessed, names, subsets, origin = _load_hub(source, max_hub_bytes, subset, given)
        split_names = tuple(splits)
        for wanted in (train_split, val_split):
            if wanted and wanted not in splits:
                raise DataFormatError(key="err.data.no_split", source=source, split=wanted,
                                      splits=", ".join(split_names))
        train = splits.get(train_split or "train") or next(iter(splits.values()), [])
        val_name = val_split or next((n for n in VAL_SPLIT_NAMES if n in splits and n != train_split), None)
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
    notes = [f"{duplicates} duplicate record(s) found (same instruction and output)"] if duplicates else []
    return DatasetSplits(train=train, val=val, source=source, origin=origin, val_from_source=val_from_source,
                         duplicates=duplicates, notes=notes, detected=str(mapping), guessed=guessed, columns=names,
                         subsets=subsets, splits=split_names)
