"""What runs inside one ZeroGPU lease: the same `train()`, from a checkpoint of the run, up to a step.

`run_lease(spec)` is the body the `@spaces.GPU` function (gpu.py) and the stand-in runner call in
the GPU process. Its argument and result are small frozen dataclasses of strings and numbers (the
platform pickles both). Events go out as JSON lines into the control folder, Stop comes in as its
`stop` file (worker_protocol.py), exactly as for a torchrun rank. The lease stops itself, saving a
resumable checkpoint, at its planned step or when its time is nearly up; every error is reported as
an event (the platform would reduce an exception to its class name).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..events import JobFailed, JobFinished, PhaseChanged, RunStarted, StepLogged
from ..worker_protocol import EVENTS, STOP, EventLines, StopFile


@dataclass(frozen=True)
class LeaseSpec:
    control: str  # the control folder (worker_protocol.py)
    runs_root: str
    config_file: str  # this lease's TrainConfig: the run's, or the run's resumed from its last checkpoint
    continue_in: str  # "" for the first lease; else the run folder it goes on in
    until_step: int  # stop (and save) once this many optimiser steps are done
    duration_s: int  # what the lease asked for; the platform ends it then
    reserve_s: float  # time kept at the end for the checkpoint the next lease resumes from


@dataclass(frozen=True)
class LeaseResult:
    status: str  # "finished" | "stopped" (at its step, its time, or Stop) | "failed"
    step: int  # optimiser steps done when it ended
    checkpoint: str  # the checkpoint it left ("" if none)
    elapsed_s: float


class LeaseStop:
    """The lease's stop switch: Stop (the file), its planned step, or its time nearly spent.

    The planned step is seen through the events: at a step inside an epoch at once; at an epoch's last
    step only once the epoch end (validation, probes, its checkpoint) is done, so the next lease starts
    a fresh epoch and the run does exactly what one uninterrupted run would."""

    def __init__(self, stop_file: StopFile, until_step: int, deadline: float):
        self.file, self.until_step, self.deadline = stop_file, until_step, deadline
        self.step, self.steps_per_epoch, self.reached = 0, 0, False

    def watch(self, event) -> None:
        if isinstance(event, RunStarted):
            self.step, self.steps_per_epoch = event.start_step, max(1, event.steps_per_epoch)
        elif isinstance(event, StepLogged):
            self.step = event.step
            self.reached = self.step >= self.until_step and self.step % self.steps_per_epoch != 0
        elif isinstance(event, PhaseChanged) and event.phase == "training" and self.step >= self.until_step:
            self.reached = True  # the next epoch is about to begin: the epoch end is done

    def set(self) -> None:
        self.file.set()

    def is_set(self) -> bool:
        return self.file.is_set() or self.reached or time.monotonic() > self.deadline


def run_lease(spec: LeaseSpec) -> LeaseResult:
    """Train from `spec.config_file` until the lease's step or time; the result says where it got to."""
    t0 = time.monotonic()
    control = Path(spec.control)
    out = EventLines(control / EVENTS)
    stop = LeaseStop(StopFile(control / STOP), spec.until_step, t0 + spec.duration_s - spec.reserve_s)
    seen: dict = {"end": None, "checkpoint": ""}

    def emit(event) -> None:
        stop.watch(event)
        if isinstance(event, (JobFinished, JobFailed)):
            seen["end"] = event
        seen["checkpoint"] = getattr(event, "final_checkpoint", "") or getattr(event, "last_checkpoint", "") \
            or seen["checkpoint"]
        out(event)

    try:
        from ..config import load_config
        from ..errors import RuozhiError, first_line
        from ..train import train

        try:
            train(load_config(Path(spec.config_file)), emit, stop, Path(spec.runs_root),
                  continue_in=Path(spec.continue_in) if spec.continue_in else None)
        except RuozhiError as e:  # a bad setting or data, before the run folder exists: one line
            emit(JobFailed(error=str(e), hint=""))
        except Exception as e:  # noqa: BLE001 - said as an event: the platform passes on only the class name
            emit(JobFailed(error=f"{type(e).__name__}: {first_line(e)}", hint=""))
    finally:
        out.close()
    end = seen["end"]
    status = end.status if isinstance(end, JobFinished) else "failed"
    return LeaseResult(status=status, step=stop.step, checkpoint=seen["checkpoint"],
                       elapsed_s=time.monotonic() - t0)


def lease_duration(spec: LeaseSpec) -> int:
    """`@spaces.GPU(duration=...)` takes a callable of the function's own arguments: the lease's own request."""
    return spec.duration_s
