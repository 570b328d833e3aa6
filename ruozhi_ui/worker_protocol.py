"""How a supervisor in the app process and a training worker in another process talk: a control folder.

A torchrun rank (train/worker.py, watched by launcher.py) and a ZeroGPU lease (zerogpu/, watched by
zerogpu/supervisor.py) are the same shape: the supervisor writes `config.json` into a control folder
and never touches CUDA; the worker appends its events to `events.jsonl`, one JSON object a line,
flushed at once; Stop is the `stop` file the supervisor creates; the worker's output goes to `logs/`.
This leaf knows only the events' JSON form and the standard library.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from .events import event_from_json, event_to_json

EVENTS, STOP, CONFIG, LOGS = "events.jsonl", "stop", "config.json", "logs"


class StopFile:
    """The worker's stop request: set here (`set`), or by the supervisor creating the file."""

    def __init__(self, path: Path):
        self.path, self.requested = Path(path), False

    def set(self) -> None:
        self.requested = True

    def is_set(self) -> bool:
        self.requested = self.requested or self.path.exists()
        return self.requested


class EventLines:
    """The worker's events, one JSON object a line, flushed at once (the supervisor tails the file)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, event) -> None:
        self.file.write(json.dumps(event_to_json(event), ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class EventTail:
    """New complete lines of a JSON-lines file, as events (a line still being written waits for its end)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = Path(path), 0, b""

    def read(self) -> list:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return [event_from_json(json.loads(line)) for line in lines if line.strip()]


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
