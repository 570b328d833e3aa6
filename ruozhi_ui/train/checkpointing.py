"""Checkpoints of a run: written atomically (or in the background), pruned, recovered, resumed.

A checkpoint is a `save_pretrained` folder (safetensors + tokenizer) plus `run_config.json` and
`metrics.json`; the newest also holds `training_state.pt` (optimizer moments, position in the
data, RNG states) for resuming. That file holds tensors and plain values only and is read with
`torch.load(weights_only=True)`: no pickle is ever run. Folder layout and the temp-folder/rename
dance live in `checkpoints.py`; this module knows the model, the optimizer and the run's state.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import threading
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoints as ckpt
from ..config import TrainConfig, save_config
from ..errors import ConfigError


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    epoch: int = 0  # epochs fully done
    step_in_epoch: int = 0  # steps done within the current epoch


def training_state_blob(optimizer_state: dict, state: TrainState) -> dict:
    """What resuming needs besides the weights, as tensors and plain values (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    return {
        "state": dataclasses.asdict(state),
        "optimizer": optimizer_state,
        "rng_torch": torch.random.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }


def restore_training_state(path: Path, load_optimizer: Callable[[dict], None]) -> TrainState:
    """Load a checkpoint's training state (tensors only: a crafted pickle is refused, never run); the
    optimizer's part goes to `load_optimizer` (a one-process optimizer's load_state_dict, or the ranks')."""
    try:
        blob = torch.load(Path(path) / ckpt.TRAINING_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling refusal, a damaged file
        raise ConfigError(f"resume_from: '{path}' has a training state that is not plain tensors "
                          f"({type(e).__name__}); it cannot be resumed safely") from None
    load_optimizer(blob["optimizer"])
    torch.random.set_rng_state(blob["rng_torch"])
    if blob["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    rng = blob["rng_python"]
    if isinstance(rng, dict):
        random.setstate((rng["version"], tuple(int(x) for x in rng["state"].tolist()), rng["gauss"]))
    else:  # a checkpoint from before RNG states were stored as tensors: a plain (version, ints, gauss) tuple
        random.setstate((rng[0], tuple(rng[1]), rng[2]))
    return TrainState(**blob["state"])


def cpu_snapshot(obj, memo: dict | None = None):
    """A CPU copy of every tensor in nested dicts/lists/tuples; tensors shared before (tied weights) stay shared."""
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        key = (obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.device)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return {k: cpu_snapshot(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v, memo) for v in obj)
    return obj


def save_checkpoint(model, tokenizer, cfg: TrainConfig, run_dir: Path, name: str, metrics: dict,
                    weights: dict | None = None, training_blob: dict | None = None) -> Path:
    """Write a loadable checkpoint folder atomically (temp folder, then rename); only the newest keeps the
    (large) training state. `weights`: a state dict to write instead of the live one (a background save)."""
    final_path = run_dir / ckpt.CHECKPOINTS / name
    tmp = ckpt.begin_checkpoint(final_path)
    try:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / ckpt.CHECKPOINT_CONFIG)
        (tmp / ckpt.CHECKPOINT_METRICS).write_text(json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8")
        if training_blob is not None:
            torch.save(training_blob, tmp / ckpt.TRAINING_STATE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder must never look like a checkpoint
        raise
    path = ckpt.commit_checkpoint(tmp, final_path)
    for other in (run_dir / ckpt.CHECKPOINTS).iterdir():
        if other != path and (other / ckpt.TRAINING_STATE).exists():
            (other / ckpt.TRAINING_STATE).unlink()
    return path


def prune_epoch_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the `keep` newest `epoch-N` checkpoints (0 = all); `final` is never pruned."""
    if keep <= 0:
        return
    epochs = sorted((p for p in (run_dir / ckpt.CHECKPOINTS).glob("epoch-*") if p.name.split("-")[-1].isdigit()),
                    key=lambda p: int(p.name.split("-")[-1]))
    for old in epochs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_merged(model, tokenizer, cfg: TrainConfig, run_dir: Path) -> Path:
    """LoRA: base + adapter merged into a plain transformers model folder."""
    final_path = run_dir / ckpt.CHECKPOINTS / ckpt.FINAL_MERGED
    tmp = ckpt.begin_checkpoint(final_path)
    model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_config(cfg, tmp / ckpt.CHECKPOINT_CONFIG)
    return ckpt.commit_checkpoint(tmp, final_path)


class BackgroundSaver:
    """Writes one checkpoint at a time on a thread while training goes on.

    Writing a 0.5B model takes about a second, mostly file I/O that releases the GIL, so the
    GPU keeps stepping meanwhile. The caller hands over a CPU snapshot, so later steps cannot
    change what is written. Finished saves come back on the training thread through
    `finished()`, which also re-raises a failed save.
    """

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.outcome: tuple = ()

    def submit(self, write: Callable[[], Path], *info) -> list[tuple]:
        """Start `write` after any previous save; returns that previous save's (path, *info), if any."""
        done = self.finished(block=True)

        def run() -> None:
            try:
                self.outcome = (write(), *info)
            except BaseException as e:  # handed to the training thread
                self.outcome = (e, *info)

        self.thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self.thread.start()
        return done

    def finished(self, block: bool = False) -> list[tuple]:
        if self.thread is None or (self.thread.is_alive() and not block):
            return []
        self.thread.join()
        self.thread = None
        if isinstance(self.outcome[0], BaseException):
            raise self.outcome[0]
        return [self.outcome]
