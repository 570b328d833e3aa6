"""The run folder: its layout (the one place its file names are written), where runs live, their names,
what makes a folder a checkpoint or resumable, reading its event log, and atomic checkpoint folders.

Layout of one run:
    <runs_root>/<run_name>/config.json      the TrainConfig as JSON                    (RUN_CONFIG)
                           metrics.jsonl    one JSON object per engine event (events)  (METRICS)
                           tb/              TensorBoard event files (Loss/train, Loss/val)
                           checkpoints/epoch-1, epoch-2, ..., final[, final-merged]
A checkpoint is a `save_pretrained` folder (safetensors + tokenizer) plus `run_config.json`
(CHECKPOINT_CONFIG) and `metrics.json`; the newest also holds `training_state.pt` (optimizer,
scheduler, RNG, step) for resuming. Folders are written under a temporary name and renamed, so a
checkpoint is never half-written. Knows nothing of torch: writing the weights is train/checkpointing.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import unicodedata
from pathlib import Path

from .errors import ConfigError
from .events import Event, event_from_json

MAX_RUN_NAME = 64
# a run folder
RUN_CONFIG = "config.json"  # the run's TrainConfig
METRICS = "metrics.jsonl"  # the run's events, one JSON object a line
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
FINAL = "final"  # the last checkpoint of a finished or stopped run
FINAL_MERGED = "final-merged"  # LoRA merged into the base (save_merged)
# a checkpoint folder
CHECKPOINT_CONFIG = "run_config.json"  # the TrainConfig it was trained with
CHECKPOINT_METRICS = "metrics.json"  # validation losses and the step it was saved at
TRAINING_STATE = "training_state.pt"  # what resuming needs besides the weights (the newest checkpoint only)
MODEL_CONFIG = "config.json"  # transformers' own: a full model's weights are here
ADAPTER_CONFIG = "adapter_config.json"  # peft's own: a LoRA adapter is here
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
    """A folder of loadable weights: a model (transformers' config.json) or a LoRA adapter. What the runs
    folder lists and public mode lets a visitor pick."""
    return (path / MODEL_CONFIG).is_file() or (path / ADAPTER_CONFIG).is_file()


def is_run_checkpoint(path: Path) -> bool:
    """A folder a run wrote, to load as tuned weights: the TrainConfig beside them (or a LoRA adapter, which
    names its base). A plain model folder is not one: it loads as a base model."""
    return path.is_dir() and ((path / CHECKPOINT_CONFIG).is_file() or (path / ADAPTER_CONFIG).is_file())


def is_resumable(path: Path) -> bool:
    """A checkpoint a run can continue from: its TrainConfig and its training state (the newest one only)."""
    return (path / TRAINING_STATE).is_file() and (path / CHECKPOINT_CONFIG).is_file()


def read_events(run_dir: Path) -> list[Event]:
    """The events of a run's metrics.jsonl, in order; a line cut by a crash mid-write, or one this version
    cannot read, is skipped."""
    path = Path(run_dir) / METRICS
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []:
        try:
            events.append(event_from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    return events


def list_checkpoints(root: Path | None = None) -> list[Path]:
    """Every complete checkpoint under the runs root, newest first."""
    root = root or runs_root()
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"*/{CHECKPOINTS}/*")
             if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
