"""Past runs, read back from a runs folder: what the Runs view lists and what Compare preselects.

A run folder (its layout is checkpoints.py's) holds `config.json` and `metrics.jsonl`, one
JSON object per engine event, written by the app and the CLI alike. `read_run` folds those
events (read back as `events` objects) into a `RunRecord`: name, model, data, method, epochs,
status, final and best validation loss, duration, when it finished, and its loss curve.
Nothing here writes, except `delete_run`. Knows nothing of Gradio or torch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .checkpoints import CHECKPOINTS, FINAL, FINAL_MERGED, METRICS, RUN_CONFIG, list_checkpoints, read_events
from .errors import PolicyError
from .events import EvalDone, JobFailed, JobFinished, StepLogged

# incomplete: the process ended without a last event
RunStatus = Literal["finished", "stopped", "failed", "running", "incomplete"]


@dataclass(frozen=True)
class RunRecord:
    name: str  # the run folder's name, relative to the runs folder
    model: str
    data: str
    method: str
    epochs: int
    status: RunStatus
    final_val_loss: float | None
    best_val_loss: float | None
    duration_s: float | None
    finished_at: float  # when it ended (the run's own record; the metrics file's time for older runs); 0 if not
    steps: tuple[tuple[int, float], ...] = ()  # (step, train loss)
    evals: tuple[tuple[int, float], ...] = ()  # (step, validation loss)
    final_checkpoint: str = ""  # "<name>/checkpoints/final" when it exists
    resumed_from: str = ""  # the checkpoint a resumed run continued, as its config names it
    error: str = ""


def read_run(folder: Path, active: bool = False) -> RunRecord | None:
    """The record of one run folder, or None when it is not a run (no config.json)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    events = read_events(folder)
    steps = tuple((e.step, e.loss) for e in events if isinstance(e, StepLogged))
    evals = tuple((e.step, e.val_loss) for e in events if isinstance(e, EvalDone))
    end = next((e for e in reversed(events) if isinstance(e, (JobFinished, JobFailed))), None)
    status: RunStatus
    if end is None:
        status = "running" if active else "incomplete"
    else:
        status = end.status if isinstance(end, JobFinished) else "failed"
    finished_at = 0.0
    if end is not None:
        finished_at = end.finished_at or (folder / METRICS).stat().st_mtime
    losses = [v for _, v in evals if v == v]  # NaN-free
    final = folder / CHECKPOINTS / FINAL
    data = config.get("data", {})
    return RunRecord(
        name=folder.name, model=config.get("model", {}).get("spec", ""), data=data.get("source", ""),
        method=config.get("method", ""), epochs=int(config.get("epochs", 0)), status=status,
        final_val_loss=losses[-1] if losses else None, best_val_loss=min(losses) if losses else None,
        duration_s=end.elapsed_s if isinstance(end, JobFinished) else None,
        finished_at=float(finished_at), steps=steps, evals=evals,
        final_checkpoint=f"{folder.name}/{CHECKPOINTS}/{FINAL}" if final.is_dir() else "",
        resumed_from=config.get("resume_from", ""), error=end.error if isinstance(end, JobFailed) else "")


def list_runs(root: Path, active_run: str = "") -> list[RunRecord]:
    """Every run under `root`, the newest first (by when it finished; running ones on top)."""
    root = Path(root)
    if not root.is_dir():
        return []
    records = [read_run(p, active=p.name == active_run) for p in root.iterdir()
               if p.is_dir() and not p.name.startswith(".")]
    records = [r for r in records if r is not None]
    return sorted(records, key=lambda r: (r.status == "running", r.finished_at), reverse=True)


def newest_final(root: Path) -> str | None:
    """`<run>/checkpoints/final` of the run that finished last (what Compare preselects), or None."""
    done = [r for r in list_runs(root) if r.final_checkpoint and r.status in ("finished", "stopped")]
    return done[0].final_checkpoint if done else None


def delete_run(root: Path, name: str, active_run: str = "") -> None:
    """Remove a run folder under `root` (never the running one, never anything outside `root`)."""
    root = Path(root).resolve()
    folder = (root / name).resolve()
    if folder.parent != root or name.startswith(".") or not (folder / RUN_CONFIG).is_file():
        raise PolicyError(key="err.runs.not_yours", name=name)
    if name == active_run:
        raise PolicyError(key="err.runs.running", name=name)
    shutil.rmtree(folder)


def checkpoint_names(root: Path) -> list[str]:
    """Every complete checkpoint as `<run>/checkpoints/<name>`: the run that finished last first (not the
    folder that was touched last), and within a run `final` before its epochs, the latest epoch first."""
    root = Path(root)
    rank = {r.name: i for i, r in enumerate(list_runs(root))}

    def order(path: Path):
        name = path.name
        within = (0, 0) if name == FINAL else (1, 0) if name == FINAL_MERGED else \
            (2, -int(name.split("-")[-1])) if name.split("-")[-1].isdigit() else (3, 0)
        return rank.get(path.parent.parent.name, len(rank)), within, name

    return [str(p.relative_to(root)) for p in sorted(list_checkpoints(root), key=order)]
