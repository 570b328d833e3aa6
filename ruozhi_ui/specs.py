"""What a model spec or a dataset source string names: the one place that tells a Hub id from a path.

A model spec is `demo`, a Hub id (`owner/name`) or a local folder. A dataset source
is `sample`, `upload:<file name>` (a file uploaded into the visitor's uploads folder),
a Hub dataset (`owner/name` or `owner/name@file.json|.jsonl|.csv|.tsv|.parquet`) or a local
.json/.jsonl/.csv/.tsv/.parquet file. Pure string rules, except where the caller asks to look at the disk (local
mode: an existing folder named like a Hub id is a folder, as `from_pretrained` reads it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

DEMO = "demo"
SAMPLE = "sample"
UPLOAD_PREFIX = "upload:"
# The Hub's naming rule, a little stricter: letters, digits, '-', '_', '.', not starting with '.' or '-'.
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
HUB_ID = re.compile(rf"^{_NAME}/{_NAME}$")
# One plain file of a Hub dataset: no folder, no glob, no scheme.
HUB_DATA_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\.(json|jsonl|csv|tsv|parquet)$", re.IGNORECASE)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")  # the files data/ reads
ModelKind = Literal["demo", "path", "hub", "invalid"]
DataKind = Literal["sample", "upload", "hub", "path", "invalid"]


def is_hub_id(text: str) -> bool:
    """`owner/name`, and not a data file's name: `a/b.json` is always a path, never a repo."""
    return (bool(HUB_ID.match(text)) and ".." not in text and not text.endswith((".", "-"))
            and not text.lower().endswith(DATA_SUFFIXES))


def split_hub_dataset(source: str) -> tuple[str, str | None] | None:
    """`owner/name[@file.json]` -> (repo, file or None); None when it is not that shape."""
    repo, at, data_file = source.partition("@")
    if not is_hub_id(repo):
        return None
    if at and not (HUB_DATA_FILE.match(data_file) and ".." not in data_file):
        return None
    return repo, (data_file or None)


def model_kind(spec: str, look_at_disk: bool = True) -> ModelKind:
    """'demo', 'path' (a local folder or file) or 'hub'; 'invalid' when it is none of them."""
    spec = spec.strip()
    if spec.lower() == DEMO:
        return "demo"
    if look_at_disk and spec and Path(spec).expanduser().exists():
        return "path"
    if is_hub_id(spec):
        return "hub"
    return "path" if look_at_disk and spec else "invalid"


def data_kind(source: str, look_at_disk: bool = True) -> DataKind:
    """'sample', 'upload', 'hub', 'path' (a local file) or 'invalid'."""
    source = source.strip()
    if source == SAMPLE:
        return "sample"
    if source.startswith(UPLOAD_PREFIX):
        return "upload"
    if look_at_disk and source and (source.lower().endswith(DATA_SUFFIXES) and "@" not in source
                                    or Path(source).expanduser().exists()):
        return "path"
    if split_hub_dataset(source) is not None:
        return "hub"
    return "invalid"


def upload_name(source: str) -> str:
    """The file name inside `upload:<name>`."""
    return source.strip()[len(UPLOAD_PREFIX):]
