"""The one training job of the process: its thread, its state, its stop switch.

`JobRunner.start(cfg)` validates the config and runs `engine.train` in a daemon
thread; engine events are folded into an append-only history under a lock, and
`snapshot()` hands the UI an immutable `JobSnapshot` whose `version` changes with
every update (so a timer tick can skip when nothing changed). The UI never
touches the thread, so a page reload or a second tab re-attaches to the same job.
Each job has an owner (a public visitor, or "local"): `snapshot_for(owner)` shows a
visitor only their own jobs, `stop(owner)` stops only theirs, and `busy_for(owner)`
tells another visitor that the machine is busy and for how long, nothing more.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from .checkpoints import runs_root as default_runs_root
from .config import TrainConfig, config_to_dict, validate
from .errors import JobConflict, RuozhiError, first_line
from .events import (CheckpointSaved, EvalDone, Event, JobFailed, JobFinished, Phase, PhaseChanged, PrecisionChanged,
                     RunStarted, SampleGenerated, StepLogged)
from .policy import safe_text

JobStatus = Literal["idle", "starting", "running", "stopping", "finished", "stopped", "failed"]
ACTIVE: tuple[JobStatus, ...] = ("starting", "running", "stopping")
LOCAL = "local"
REMEMBERED_OWNERS = 64  # visitors whose last finished job stays on their page after another visitor starts


@dataclass(frozen=True)
class JobSnapshot:
    version: int  # bumps on every change
    status: JobStatus
    config: dict = field(default_factory=dict)
    run_dir: str = ""
    started: RunStarted | None = None
    steps: tuple[StepLogged, ...] = ()
    evals: tuple[EvalDone, ...] = ()
    samples: tuple[SampleGenerated, ...] = ()
    checkpoints: tuple[CheckpointSaved, ...] = ()
    error: str = ""
    hint: str = ""
    started_at: float = 0.0  # time.time() when Start was accepted
    finished_at: float = 0.0
    owner: str = LOCAL  # who started it: "local" or a public visitor's id
    phase: Phase | Literal[""] = ""  # while it runs
    last_step_at: float = 0.0  # time.time() when the last StepLogged arrived: the ETA counts down from it

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def last_step(self) -> StepLogged | None:
        return self.steps[-1] if self.steps else None


IDLE = JobSnapshot(version=0, status="idle")


def _default_train(cfg, emit, stop_event, runs_root):
    from .launcher import train  # in this process, or several under torchrun

    return train(cfg, emit, stop_event, runs_root)


class JobRunner:
    """Holds at most one running job; finished jobs stay visible until the next start."""

    def __init__(self, runs_root: Path | None = None, train_fn: Callable | None = None):
        self.runs_root = Path(runs_root) if runs_root else default_runs_root()
        self._train_fn = train_fn or _default_train
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snap = IDLE
        self._last_by_owner: OrderedDict[str, JobSnapshot] = OrderedDict()  # each owner's latest job
        self.max_seconds = 0.0  # the policy's wall-time bound of one run, then it is stopped and saved (0 = none)
        self.cooldown_s = 0.0  # the policy's pause between one owner's runs (0 = none)

    # --- called from UI / CLI threads -------------------------------------------------
    def start(self, cfg: TrainConfig, owner: str = LOCAL, runs_root: Path | None = None) -> JobSnapshot:
        """Start `cfg` for `owner`, its run folder under `runs_root` (default: the runner's)."""
        validate(cfg)
        with self._lock:
            if self._snap.status in ACTIVE:
                if self._snap.owner == owner:
                    raise JobConflict(key="err.job.running")
                raise busy_error(self._snap)
            last = self._last_by_owner.get(owner)
            if self.cooldown_s and last is not None and last.finished_at:
                wait = last.finished_at + self.cooldown_s - time.time()
                if wait > 0:
                    raise JobConflict(key="err.job.cooldown", minutes=max(1, round(wait / 60)))
            self._stop = threading.Event()
            self._snap = JobSnapshot(version=self._snap.version + 1, status="starting",
                                     config=config_to_dict(cfg), started_at=time.time(), owner=owner)
            self._remember()
            root = Path(runs_root) if runs_root else self.runs_root
            # the run sees the caller's context: on ZeroGPU the visitor's request, whose quota pays each lease
            self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run, cfg, self._stop, root),
                                            name="ruozhi-train", daemon=True)
            self._thread.start()
            return self._snap

    def stop(self, owner: str | None = None) -> bool:
        """Ask the running job (only `owner`'s, when given) to finish its step, save and stop.
        False when nothing of theirs runs."""
        with self._lock:
            if self._snap.status not in ("starting", "running") or owner not in (None, self._snap.owner):
                return False
            self._stop.set()
            self._replace(status="stopping")
            return True

    def snapshot(self) -> JobSnapshot:
        """The machine's current (or last) job, whoever owns it: for local mode, the CLI and tests."""
        with self._lock:
            return self._snap

    def snapshot_for(self, owner: str) -> JobSnapshot:
        """What `owner` may see: their current or latest job, else idle. Never another owner's."""
        with self._lock:
            return self._last_by_owner.get(owner, IDLE)

    def busy_for(self, owner: str) -> JobConflict | None:
        """None when `owner` may start a run; otherwise why not, without a word about whose run it is."""
        with self._lock:
            if self._snap.status not in ACTIVE or self._snap.owner == owner:
                return None
            return busy_error(self._snap)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job's thread ends (tests, CLI). True if it ended."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # --- called from the training thread ----------------------------------------------
    def _replace(self, **changes) -> None:
        fields = {**self._snap.__dict__, **changes, "version": self._snap.version + 1}
        self._snap = JobSnapshot(**fields)
        self._remember()

    def _remember(self) -> None:
        self._last_by_owner[self._snap.owner] = self._snap
        self._last_by_owner.move_to_end(self._snap.owner)
        while len(self._last_by_owner) > REMEMBERED_OWNERS:
            self._last_by_owner.popitem(last=False)

    def _on_event(self, event: Event) -> None:
        with self._lock:
            s = self._snap
            if isinstance(event, RunStarted):
                status = "stopping" if s.status == "stopping" else "running"
                self._replace(status=status, started=event, run_dir=event.run_dir)
            elif isinstance(event, StepLogged):
                self._replace(steps=s.steps + (event,), last_step_at=time.time())
                if self.max_seconds and time.time() - s.started_at > self.max_seconds and not self._stop.is_set():
                    self._stop.set()  # over the policy's time: the engine saves and stops after this step
                    self._replace(status="stopping")
            elif isinstance(event, PhaseChanged):
                self._replace(phase=event.phase)
            elif isinstance(event, PrecisionChanged) and s.started is not None:  # fast layers were dropped
                self._replace(started=dataclasses.replace(s.started, precision=event.precision,
                                                          steps_code=event.steps_code))
            elif isinstance(event, EvalDone):
                self._replace(evals=s.evals + (event,))
            elif isinstance(event, SampleGenerated):
                self._replace(samples=s.samples + (event,))
            elif isinstance(event, CheckpointSaved):
                self._replace(checkpoints=s.checkpoints + (event,))
            elif isinstance(event, JobFinished):
                self._replace(status=event.status, run_dir=event.run_dir, finished_at=time.time())
            elif isinstance(event, JobFailed):  # whatever a job reports must serialise, surrogates and all
                self._replace(status="failed", error=safe_text(event.error), hint=safe_text(event.hint),
                              run_dir=event.run_dir or s.run_dir, finished_at=time.time())

    def _run(self, cfg: TrainConfig, stop_event: threading.Event, runs_root: Path) -> None:
        try:
            self._train_fn(cfg, self._on_event, stop_event, runs_root)
        except RuozhiError as e:
            self._on_event(JobFailed(error=str(e), hint=""))
        except BaseException as e:  # the thread must never die silently: the UI would spin forever
            traceback.print_exc()
            self._on_event(JobFailed(error=f"{type(e).__name__}: {first_line(e)}",
                                     hint="See the server log for the traceback."))
        finally:
            with self._lock:
                if self._snap.status in ACTIVE:  # engine returned without a final event
                    self._replace(status="stopped" if stop_event.is_set() else "finished", finished_at=time.time())


def busy_error(snap: JobSnapshot) -> JobConflict:
    """What another visitor is told: the machine is busy, and roughly for how long."""
    last = snap.last_step
    if last is None:
        return JobConflict(key="err.job.busy_starting")
    return JobConflict(key="err.job.busy", minutes=max(1, round(last.eta_s / 60)))
