"""The runs folder: where runs live, their names, and atomic checkpoint folders.

Layout of one run:
    <runs_root>/<run_name>/config.json      the TrainConfig as JSON
                           metrics.jsonl    one JSON object per engine event
                           tb/              TensorBoard event files (Loss/train, Loss/val)
                           checkpoints/epoch-1, epoch-2, ..., final
A checkpoint is a `save_pretrained` folder (safetensors + tokenizer) plus
`run_config.json` and `metrics.json`; the newest also holds `training_state.pt`
(optimizer, scheduler, RNG, step) for resuming. Folders are written under a
temporary name and renamed, so a checkpoint is never half-written.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import unicodedata
from pathlib import Path

from .errors import ConfigError

MAX_RUN_NAME = 64
TRAINING_STATE = "training_state.pt"
UPLOADS_DIR = ".uploads"  # a runs folder's uploaded data files (a run name never starts with '.')
VISITORS_DIR = ".visitors"  # public mode: one runs folder per visitor under here
EXPORTS_DIR = ".exports"  # a runs folder's export files (zips, GGUF, Hub staging), replaced by the next export


def runs_root() -> Path:
    """The app's runs folder; RUOZHI_RUNS overrides (tests, Spaces)."""
    return Path(os.environ.get("RUOZHI_RUNS", Path.cwd() / "runs")).resolve()


def sanitize_run_name(name: str) -> str:
    """A single safe folder name: no separators, dots-only, control chars or absolute paths."""
    name = unicodedata.normalize("NFKC", name or "")
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")  # control/format chars
    name = re.sub(r"[^\w\-.]+", "-", name).strip("-.")  # \w keeps CJK letters
    name = name[:MAX_RUN_NAME].strip("-.")
    if not name:
        raise ConfigError(key="err.run_name.empty")
    return name


def run_dir_for(root: Path, run_name: str) -> Path:
    path = (root / sanitize_run_name(run_name)).resolve()
    if path.parent != root.resolve():  # belt and braces: must be a direct child of the root
        raise ConfigError(f"run_name '{run_name}' would write outside the runs folder")
    return path


def unique_run_dir(root: Path, run_name: str) -> Path:
    """A fresh folder for a new run: name, name-2, name-3, ... so nothing is overwritten."""
    base = run_dir_for(root, run_name)
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def begin_checkpoint(final_path: Path) -> Path:
    """A temporary sibling folder to write a checkpoint into before `commit_checkpoint`."""
    tmp = final_path.with_name(f".tmp-{final_path.name}-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, final_path: Path) -> Path:
    """Swap the finished temporary folder into place (a rename is atomic on one file system). A crash
    between the two renames leaves `.old-<name>-*` and no `<name>`: `recover_checkpoints` puts it back."""
    if final_path.exists():
        old = final_path.with_name(f".old-{final_path.name}-{time.monotonic_ns()}")
        final_path.rename(old)
        tmp.rename(final_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final_path)
    return final_path


def recover_checkpoints(checkpoints_dir: Path) -> list[str]:
    """Clean up after a crash mid-save: half-written `.tmp-*` folders go; an `.old-<name>-*` folder whose
    `<name>` is missing (the crash came between the two renames) is renamed back, so the last good
    `final` is never lost; one whose `<name>` exists is the replaced copy and goes. Returns what it did."""
    done = []
    if not Path(checkpoints_dir).is_dir():
        return done
    for path in sorted(Path(checkpoints_dir).iterdir()):
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}")
        elif path.name.startswith(".old-"):
            name = path.name[len(".old-"):].rsplit("-", 1)[0]
            target = path.with_name(name)
            if target.exists():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path.name}")
            else:
                path.rename(target)
                done.append(f"recovered {name}")
    return done


def is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def list_checkpoints(root: Path | None = None) -> list[Path]:
    """Every complete checkpoint under the runs root, newest first."""
    root = root or runs_root()
    if not root.is_dir():
        return []
    found = [p for p in root.glob("*/checkpoints/*") if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
