"""Exports run as jobs: a thread each, progress as an immutable snapshot, cancel between chunks.

The same pattern as jobs.py's training runner, kept separate because exports differ: several owners
may export at once (each one at a time, at most MAX_ACTIVE on the machine, since each holds a model
in memory), and an export is cancelled by raising `Cancelled` from its progress callback. The runner
owns its threads: `shutdown()` cancels and joins them. Knows nothing of Gradio.
"""

from __future__ import annotations

import dataclasses
import threading
import traceback
from dataclasses import dataclass
from typing import Callable

from ..errors import JobConflict, RuozhiError, first_line

LOCAL = "local"
MAX_ACTIVE = 2
ACTIVE = ("running", "cancelling")


class Cancelled(Exception):
    """Raised inside an export when its owner pressed Cancel."""


@dataclass(frozen=True)
class ExportSnapshot:
    version: int = 0  # bumps on every change
    status: str = "idle"  # idle | running | cancelling | done | cancelled | failed
    format: str = ""
    stage: str = ""  # i18n key of the step in progress
    done: float = 0.0  # 0..1 within the stage
    files: tuple[str, ...] = ()
    url: str = ""
    error: RuozhiError | None = None  # shown in the page's language

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


IDLE = ExportSnapshot()


class ExportRunner:
    def __init__(self, max_active: int = MAX_ACTIVE):
        self.max_active = max_active
        self._lock = threading.Lock()
        self._snaps: dict[str, ExportSnapshot] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}

    def start(self, owner: str, fmt: str, work: Callable[[Callable[[str, float], None]], object]) -> ExportSnapshot:
        """Run `work(progress)` on a thread for `owner`; it returns an object with `files` and `url`."""
        with self._lock:
            if self._snaps.get(owner, IDLE).active:
                raise JobConflict(key="err.export.running")
            if sum(s.active for s in self._snaps.values()) >= self.max_active:
                raise JobConflict(key="err.export.busy")
            cancel = threading.Event()
            self._cancel[owner] = cancel
            self._set(owner, status="running", format=fmt, stage="export.stage_start", done=0.0, files=(), url="",
                      error=None)
            thread = threading.Thread(target=self._run, args=(owner, work, cancel), name=f"ruozhi-export-{fmt}",
                                      daemon=True)
            self._threads[owner] = thread
            thread.start()
            return self._snaps[owner]

    def cancel(self, owner: str) -> bool:
        with self._lock:
            if not self._snaps.get(owner, IDLE).active:
                return False
            self._cancel[owner].set()
            self._set(owner, status="cancelling")
            return True

    def snapshot_for(self, owner: str) -> ExportSnapshot:
        with self._lock:
            return self._snaps.get(owner, IDLE)

    def wait(self, owner: str, timeout: float | None = None) -> bool:
        thread = self._threads.get(owner)
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel every export and wait for its thread."""
        with self._lock:
            owners = [o for o, s in self._snaps.items() if s.active]
        for owner in owners:
            self.cancel(owner)
        for owner in list(self._threads):
            self.wait(owner, timeout)

    # --- on the export's thread ---------------------------------------------------------
    def _set(self, owner: str, **changes) -> None:
        old = self._snaps.get(owner, IDLE)
        self._snaps[owner] = dataclasses.replace(old, version=old.version + 1, **changes)

    def _run(self, owner: str, work, cancel: threading.Event) -> None:
        def progress(stage: str, done: float) -> None:
            if cancel.is_set():
                raise Cancelled()
            with self._lock:
                self._set(owner, stage=stage, done=max(0.0, min(1.0, float(done))))

        try:
            result = work(progress)
        except Cancelled:
            with self._lock:
                self._set(owner, status="cancelled")
            return
        except RuozhiError as e:
            with self._lock:
                self._set(owner, status="failed", error=e)
            return
        except BaseException as e:  # the thread never dies silently: the page would wait forever
            traceback.print_exc()
            with self._lock:
                self._set(owner, status="failed", error=RuozhiError(key="err.export.failed", cause=first_line(e)))
            return
        with self._lock:
            if cancel.is_set():
                self._set(owner, status="cancelled")
            else:
                self._set(owner, status="done", done=1.0, files=tuple(result.files), url=result.url)
