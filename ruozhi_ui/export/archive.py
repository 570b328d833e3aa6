"""A zip of one checkpoint, streamed file by file into a file on disk (never built in memory).

Weights are stored as they are (safetensors and GGUF barely compress and deflating a gigabyte takes
minutes), text files deflated. `progress(fraction)` is called as bytes go in, so a caller can show it
and cancel (by raising); a cancelled or failed zip leaves no file behind.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable

CHUNK = 4 * 2**20
STORED = (".safetensors", ".gguf", ".png", ".bin")


def write_zip(entries: list[tuple[Path, str]], out_path: Path,
              progress: Callable[[float], None] = lambda done: None) -> Path:
    """Write `entries` ((file, name inside the zip)) to `out_path`; a later entry with the same name
    replaces an earlier one (the model card replaces a checkpoint's own README)."""
    chosen = dict((name, path) for path, name in entries)
    total = sum(Path(p).stat().st_size for p in chosen.values()) or 1
    out_path = Path(out_path)
    tmp = out_path.with_name(f".tmp-{out_path.name}-{os.getpid()}")
    done = 0
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for name, path in chosen.items():
                how = zipfile.ZIP_STORED if name.endswith(STORED) else zipfile.ZIP_DEFLATED
                info = zipfile.ZipInfo.from_file(path, arcname=name)
                info.compress_type = how
                with open(path, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                    while chunk := src.read(CHUNK):
                        dst.write(chunk)
                        done += len(chunk)
                        progress(done / total)
        tmp.replace(out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    progress(1.0)
    return out_path
