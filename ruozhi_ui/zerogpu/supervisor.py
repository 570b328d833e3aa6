"""The app side of a run on ZeroGPU: one lease after another until the run is done, as one run.

`train_in_leases` has `train()`'s shape (config, emit, stop event, runs folder -> final checkpoint),
so the job runner calls it as it calls a run under torchrun (launcher.py). Each lease (lease.py) runs
in the GPU process; this process never touches CUDA. Lease 1 starts the run; each next one resumes
from the checkpoint the previous left, in the same run folder, so the chart, the folder and the
events stay one run: the events are forwarded with the time counted from the run's start, the
in-between "stopped" of a lease is held back, and Stop is the control folder's `stop` file. A lease
the platform refuses (quota) or ends early (its duration) fails the run with what happened, in the
page's words, and the last checkpoint it left.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Literal

from ..checkpoints import UPLOADS_DIR
from ..config import TrainConfig, save_config, validate
from ..errors import RuozhiError
from ..events import CheckpointSaved, EmitFn, JobFailed, JobFinished, RunStarted, StepLogged
from ..i18n import t
from ..worker_protocol import EVENTS, STOP, EventTail
from . import max_lease_s
from .lease import LeaseResult, LeaseSpec
from .plan import LeaseCosts, LeasePlan, costs_for, plan_leases

POLL_S = 0.2
PlatformRefusal = Literal["quota", "duration", "queue", "aborted", "error"]
Runner = Callable[[LeaseSpec], LeaseResult]


def refusal_kind(error: BaseException) -> PlatformRefusal:
    """What a ZeroGPU error means, from its title (spaces' zero/client.py and wrappers.py name them so)."""
    title = str(getattr(error, "title", "") or "").lower()
    message = str(getattr(error, "message", "") or error).lower()
    if "quota" in title or "credits" in title:
        return "quota"
    if "illegal duration" in title:
        return "duration"
    if "queue" in title:
        return "queue"
    if "worker error" in title and "aborted" in message:
        return "aborted"
    return "error"


def first_plan(cfg: TrainConfig, limit: int, root: Path,
               costs: LeaseCosts | None = None) -> tuple[LeasePlan | None, LeaseCosts]:
    """Lease 1's share from the pre-flight estimate (the data's size, the model's); None when it cannot be
    had here: then lease 1 runs until its time is nearly up, and the run's own numbers plan the rest."""
    try:
        from ..data import load_source
        from ..preflight import estimate

        n_train = len(load_source(cfg.data.source, cfg.data.val_fraction, cfg.data.seed,
                                  uploads_dir=root / UPLOADS_DIR).train)
        est = estimate(cfg, n_train)
        tokens = cfg.batch_size * (cfg.data.max_source_length + cfg.data.max_target_length + 1)
        costs = costs or costs_for(est.params_total, tokens)
        return plan_leases(est.num_steps, max(1, math.ceil(n_train / cfg.batch_size)), costs, limit), costs
    except RuozhiError:
        raise  # bad settings or data: said now, before any lease is asked for
    except Exception:  # noqa: BLE001 - only the first lease's length depends on it
        return None, costs or LeaseCosts()


class LeaseWatch:
    """What this process learns from the leases' events on their way to `emit` (one run, many leases)."""

    def __init__(self, emit: EmitFn, t0: float):
        self.emit, self.t0, self.offset_s = emit, t0, 0.0
        self.started: RunStarted | None = None
        self.step, self.last_checkpoint, self.end = 0, "", None

    def forward(self, events) -> None:
        for event in events:
            if isinstance(event, (JobFinished, JobFailed)):
                self.end = event  # decided once the lease is over
                continue
            if isinstance(event, RunStarted):
                if self.started is not None:  # a later lease: the run goes on, it does not start again
                    continue
                self.started = event
            elif isinstance(event, StepLogged):
                self.step = event.step
                event = dataclasses.replace(event, elapsed_s=self.offset_s + event.elapsed_s)
            elif isinstance(event, CheckpointSaved):
                self.last_checkpoint = event.path
            self.emit(event)

    @property
    def run_dir(self) -> str:
        return self.started.run_dir if self.started else ""

    def fail(self, error: str, hint: str = "") -> None:
        self.emit(JobFailed(error=error, hint=hint, run_dir=self.run_dir, last_checkpoint=self.last_checkpoint,
                            finished_at=time.time()))

    def finish(self, end: JobFinished) -> Path:
        self.emit(dataclasses.replace(end, elapsed_s=time.time() - self.t0))
        return Path(end.final_checkpoint)


def call_lease(runner: Runner, spec: LeaseSpec, watch: LeaseWatch, tail: EventTail,
               stop_event: threading.Event) -> tuple[LeaseResult | None, BaseException | None]:
    """Run one lease on a thread of ours (the call blocks) while its events are forwarded and Stop passed on."""
    outcome: list = [None, None]

    def call() -> None:
        try:
            outcome[0] = runner(spec)
        except BaseException as e:  # handed to the supervisor's thread
            outcome[1] = e

    thread = threading.Thread(target=call, name="zerogpu-lease", daemon=True)
    thread.start()
    while thread.is_alive():
        watch.forward(tail.read())
        if stop_event.is_set():
            (Path(spec.control) / STOP).touch()
        thread.join(POLL_S)
    watch.forward(tail.read())
    return outcome[0], outcome[1]


def train_in_leases(cfg: TrainConfig, emit: EmitFn, stop_event: threading.Event, runs_root: Path,
                    runner: Runner | None = None, limit_s: int | None = None,
                    costs: LeaseCosts | None = None) -> Path | None:
    """Run `cfg` in successive GPU leases; returns the final checkpoint, or None when the run failed.
    `runner` (default: the `@spaces.GPU` function), `limit_s` and `costs` (default: the pre-flight
    estimate's) are for tests and the benchmark."""
    validate(cfg)
    limit = limit_s or max_lease_s()
    if runner is None:
        from .gpu import gpu_lease as runner
    prepare_demo_model(cfg)
    root = Path(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    control = Path(tempfile.mkdtemp(prefix=".lease-", dir=root))
    plan, costs = first_plan(cfg, limit, root, costs)
    watch, tail = LeaseWatch(emit, time.time()), EventTail(control / EVENTS)
    lease_cfg, lease_no = cfg, 0
    try:
        while True:
            lease_no += 1
            save_config(lease_cfg, control / f"config-{lease_no}.json")
            share = plan.leases[0] if plan else None
            spec = LeaseSpec(control=str(control), runs_root=str(root), config_file=str(control / f"config-{lease_no}.json"),
                             continue_in=watch.run_dir, until_step=share.until_step if share else 2 ** 31,
                             duration_s=share.duration_s if share else limit, reserve_s=costs.save_s * 2)
            before, watch.end, watch.offset_s = watch.step, None, time.time() - watch.t0
            _, error = call_lease(runner, spec, watch, tail, stop_event)
            end = watch.end
            if error is not None:
                watch.fail(*refusal_text(refusal_kind(error), spec, watch, error))
                return None
            if isinstance(end, JobFailed):
                if not watch.run_dir:  # bad data or settings, found before the run began: one line
                    raise RuozhiError(end.error)
                emit(end)
                return None
            if not isinstance(end, JobFinished):
                watch.fail(t("zerogpu.failed.no_end", "en", lease=lease_no))
                return None
            if end.status == "finished" or stop_event.is_set():
                return watch.finish(end)
            if watch.step <= before:  # a lease that could not take one step would be asked for again forever
                watch.fail(t("zerogpu.failed.no_progress", "en", seconds=spec.duration_s, step=watch.step))
                return None
            started = watch.started
            lease_cfg = dataclasses.replace(cfg, resume_from=end.final_checkpoint)
            plan = plan_leases(started.num_steps, started.steps_per_epoch, costs, limit, start_step=watch.step)
    finally:
        shutil.rmtree(control, ignore_errors=True)  # its events are in the run's metrics.jsonl


def refusal_text(kind: PlatformRefusal, spec: LeaseSpec, watch: LeaseWatch, error: BaseException) -> tuple[str, str]:
    """(error, hint) for a lease the platform refused or cut short, in English (the job's record); the page
    says the same through the same keys (i18n `zerogpu.*`)."""
    steps = watch.started.num_steps if watch.started else 0
    detail = str(getattr(error, "message", "") or error)
    error_text = t(f"zerogpu.failed.{kind}", "en", seconds=spec.duration_s, step=watch.step, steps=steps,
                   detail=detail)
    hint = t("zerogpu.hint.checkpoint", "en", checkpoint=watch.last_checkpoint) if watch.last_checkpoint else \
        t("zerogpu.hint.none", "en")
    return error_text, hint


def prepare_demo_model(cfg: TrainConfig) -> None:
    """Build the demo model once here (on the CPU), so every lease loads the same files."""
    from ..models import demo_model_dir, is_demo

    if is_demo(cfg.model.spec):
        demo_model_dir()

