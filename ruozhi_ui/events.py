"""The small, frozen event objects through which progress leaves the engine.

The engine calls `emit(event)` with these; `jobs.py` folds them into a snapshot
for the UI, the CLI prints them, tests record them, `metrics.jsonl` keeps them as JSON
(`event_to_json` / `event_from_json`). The string choices they carry are typed here
(`Phase`, `EndStatus`, ...): the same strings go to JSON. Nothing here knows about
threads, Gradio or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Union

Phase = Literal["training", "validating", "probing", "saving"]
EndStatus = Literal["finished", "stopped"]  # how a run that did not fail ended
PrecisionCode = Literal["fp32", "bf16", "bf16-autocast"]  # bf16: bf16 weights, stochastic rounding
StepsCode = Literal["eager", "graphs", "graphs+fused", "graphs+compile"]
EventKind = Literal["RunStarted", "StepLogged", "PhaseChanged", "PrecisionChanged", "EvalDone", "SampleGenerated",
                    "CheckpointSaved", "JobFinished", "JobFailed"]  # the "event" of a JSON line: the class's name


@dataclass(frozen=True)
class RunStarted:
    run_dir: str
    num_steps: int  # optimiser steps in the whole run
    steps_per_epoch: int
    num_train: int  # training examples
    num_val: int
    params_trained: int
    params_total: int
    device: str  # e.g. "cuda (NVIDIA H100)" or "cpu"
    precision: str  # e.g. "bf16 weights, fp32 AdamW moments, stochastic rounding; CUDA graphs" (CLI, logs)
    start_step: int = 0  # > 0 when resumed
    precision_code: PrecisionCode | Literal[""] = ""  # the page says it in plain words ("": an older run's log)
    steps_code: StepsCode | Literal[""] = ""
    resumed_from: str = ""  # the checkpoint a resumed run continues


@dataclass(frozen=True)
class StepLogged:
    step: int  # optimiser steps done, 1-based
    epoch: float  # fractional epoch, e.g. 1.25
    loss: float  # mean over the step's label tokens
    lr: float
    tok_per_s: float  # input tokens (pads excluded) per second over the last log window
    elapsed_s: float
    eta_s: float
    mem_gib: float  # peak accelerator memory so far (0 on CPU)
    num_steps: int


@dataclass(frozen=True)
class PhaseChanged:
    step: int
    phase: Phase


@dataclass(frozen=True)
class PrecisionChanged:
    """The run changed how it computes mid-way (fast layers failed and were dropped): the page updates its line."""
    step: int
    precision: str  # the new description, as RunStarted.precision
    steps_code: StepsCode  # the new RunStarted.steps_code
    reason: str  # what failed, one line


@dataclass(frozen=True)
class EvalDone:
    step: int
    epoch: int  # 1-based epoch that just ended (or is in progress, when max_steps ends a run mid-epoch)
    val_loss: float
    val_ppl: float


@dataclass(frozen=True)
class SampleGenerated:
    step: int
    epoch: int
    answers: tuple[tuple[str, str], ...]  # (probe prompt, greedy answer)


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    epoch: int
    path: str
    final: bool  # the last checkpoint of the run (finished or stopped)


@dataclass(frozen=True)
class JobFinished:
    status: EndStatus
    run_dir: str
    final_checkpoint: str
    elapsed_s: float
    finished_at: float = 0.0  # time.time() once the final checkpoint is on disk (Compare and Runs order by it)


@dataclass(frozen=True)
class JobFailed:
    error: str  # what went wrong, one line
    hint: str  # what to try next ("" when there is nothing better to say)
    run_dir: str = ""
    last_checkpoint: str = ""
    finished_at: float = 0.0


Event = Union[RunStarted, StepLogged, PhaseChanged, PrecisionChanged, EvalDone, SampleGenerated, CheckpointSaved,
              JobFinished, JobFailed]
EVENT_TYPES: dict[EventKind, type] = {cls.__name__: cls for cls in (
    RunStarted, StepLogged, PhaseChanged, PrecisionChanged, EvalDone, SampleGenerated, CheckpointSaved, JobFinished,
    JobFailed)}


def event_to_json(event: Event) -> dict:
    """{"event": <type name>, **fields}: a line of metrics.jsonl, or of a torchrun child's stdout."""
    from dataclasses import asdict

    return {"event": type(event).__name__, **asdict(event)}


def event_from_json(data: dict) -> Event:
    """The inverse of `event_to_json` (tuples come back from JSON lists)."""
    cls = EVENT_TYPES[data["event"]]
    fields = {k: v for k, v in data.items() if k != "event"}
    if cls is SampleGenerated:
        fields["answers"] = tuple(tuple(pair) for pair in fields["answers"])
    return cls(**fields)
EmitFn = Callable[[Event], None]


class NullSink:
    """An emit that drops everything (nanochat's DummyWandb idea)."""

    def __call__(self, event: Event) -> None:
        pass


class ListSink:
    """An emit that keeps every event, for tests and the CLI summary."""

    def __init__(self):
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]
