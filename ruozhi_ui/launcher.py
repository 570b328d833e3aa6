"""A run on several GPUs: `torchrun` as a child process tree, watched by the job thread.

`train_on_ranks` has `train()`'s shape (config, emit, stop event, runs folder -> final
checkpoint), so the job runner and the CLI call either the same way. It writes the config
into a launch folder, starts `torchrun --standalone --nproc-per-node N -m
ruozhi_ui.train.worker`, and then, until the tree exits: forwards rank 0's events (JSON
lines) to `emit`; turns the stop event into the `stop` file the ranks agree on; and, when
torchrun fails without the run saying why, reports which rank died and how (its exit code
or signal, from torchrun's summary) with the last lines of that rank's log. The ranks'
logs end up in the run folder's `logs/`. torchrun runs in its own session (a Ctrl-C meant
for the CLI reaches it only as our stop file) and dies with us, as do its workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .config import TrainConfig, save_config, validate
from .errors import ConfigError, RuozhiError
from .events import CheckpointSaved, EmitFn, JobFailed, JobFinished, RunStarted
from .worker_protocol import CONFIG, EVENTS, LOGS, STOP, EventTail, die_with_parent
from .zerogpu import on_zerogpu
from .zerogpu.supervisor import train_in_leases

POLL_S = 0.2
LOG_TAIL_LINES = 15
WORKER = ("-m", "ruozhi_ui.train.worker")


def train(cfg: TrainConfig, emit: EmitFn, stop_event: threading.Event, runs_root: Path) -> Path | None:
    """A run in this process (one device), on `cfg.gpus` processes under torchrun, or, on a ZeroGPU
    Space, in GPU leases (this process never touches CUDA there)."""
    if on_zerogpu():
        return train_in_leases(cfg, emit, stop_event, runs_root)
    if cfg.gpus > 1:
        return train_on_ranks(cfg, emit, stop_event, runs_root)
    from .train import train as train_here  # imported late: torch loads only when training starts

    return train_here(cfg, emit=emit, stop_event=stop_event, runs_root=runs_root)


def available_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPUs
        return 0


def check_devices(cfg: TrainConfig) -> None:
    """Several GPUs need that many; `device='cpu'` runs that many CPU processes (gloo) instead."""
    if cfg.device == "cpu":
        return
    have = available_gpus()
    if have < cfg.gpus:
        raise ConfigError(f"gpus={cfg.gpus}, but this machine has {have} GPU(s): choose at most {have}"
                          + (" (or device 'cpu' for CPU processes)" if have == 0 else ""))


def torchrun_command(cfg: TrainConfig, control: Path, runs_root: Path, worker=WORKER) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.gpus}",
            *worker, str(control), str(runs_root)]


FAILED_RANK = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)")
TEARDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # how torchrun stops the ranks that did not fail themselves


def root_cause(control: Path, returncode: int) -> tuple[int | None, str, str]:
    """(rank, one line: which rank failed and how, what to read next) after torchrun failed.

    When one rank fails the others fail after it (a lost peer, or torchrun's SIGTERM), so the cause
    is a rank killed by a signal of its own (a native crash, the OOM killer), else the rank whose
    Python error came first (each failing rank records its error and the time: train/worker.py)."""
    summary = read_text(control / "torchrun.log")
    errors = {}
    for marker in (control / LOGS).glob("rank-*.error.json"):
        errors[int(marker.name.split("-")[1].split(".")[0])] = json.loads(marker.read_text(encoding="utf-8"))
    # A rank that recorded a Python error can still die by a signal after it (gloo aborts in its teardown):
    # its error is the cause, not that signal.
    killed = sorted({(int(r), int(code)) for r, code in FAILED_RANK.findall(summary)
                     if int(code) < 0 and -int(code) not in TEARDOWN_SIGNALS and int(r) not in errors})
    if killed:
        rank, code = killed[0]
        try:
            how = signal.Signals(-code).name
        except ValueError:
            how = f"signal {-code}"
        return rank, f"rank {rank} failed (killed by {how})", log_tail(control, rank)
    if errors:
        rank = min(errors, key=lambda r: errors[r]["time"])
        hint = "\n".join(filter(None, [errors[rank]["hint"], log_tail(control, rank)]))
        return rank, f"rank {rank} failed: {errors[rank]['error']}", hint
    return None, f"torchrun exited with code {returncode}", tail(summary)


def log_tail(control: Path, rank: int) -> str:
    """The end of a rank's log; after a native crash, Python's report of it (its stack comes first)."""
    lines = read_text(control / LOGS / f"rank-{rank}.log").splitlines()
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    text = "\n".join(lines[fatal[-1]:fatal[-1] + LOG_TAIL_LINES] if fatal else lines[-LOG_TAIL_LINES:])
    return f"Last lines of its log (logs/rank-{rank}.log in the run folder):\n{text}" if text else ""


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def train_on_ranks(cfg: TrainConfig, emit: EmitFn, stop_event: threading.Event, runs_root: Path,
                   worker=WORKER) -> Path | None:
    """Run `cfg` (gpus > 1) under torchrun and watch it to the end; returns the final checkpoint, or None."""
    validate(cfg)
    check_devices(cfg)
    prepare_model(cfg)
    runs_root = Path(runs_root)
    runs_root.mkdir(parents=True, exist_ok=True)
    control = Path(tempfile.mkdtemp(prefix=".launch-", dir=runs_root))
    save_config(cfg, control / CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    with open(control / "torchrun.log", "wb") as log:
        proc = subprocess.Popen(torchrun_command(cfg, control, runs_root, worker), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=die_with_parent)
    watch = Watch(emit)
    try:
        events, asked = EventTail(control / EVENTS), False
        while proc.poll() is None:
            watch.forward(events.read())
            if stop_event.is_set() and not asked:
                (control / STOP).touch()
                asked = True
            time.sleep(POLL_S)
        watch.forward(events.read())
        if watch.setup_error:  # bad data or settings, found by the ranks before the run began: one line
            raise RuozhiError(watch.setup_error)
        if proc.returncode != 0 or watch.failed:
            watch.report_failure(*root_cause(control, proc.returncode))
    finally:
        end_process_tree(proc)
        keep_logs(control, watch.run_dir)
    return watch.final


class Watch:
    """What the launcher learns from rank 0's events on their way to `emit`. Rank 0's own failure is held
    back until the tree has exited: it may only be the echo of another rank's (a lost peer)."""

    def __init__(self, emit: EmitFn):
        self.emit, self.run_dir, self.last_checkpoint, self.final = emit, "", "", None
        self.setup_error, self.failed = "", None

    def forward(self, events) -> None:
        for event in events:
            if isinstance(event, JobFailed):
                if self.run_dir:
                    self.failed = event
                else:
                    self.setup_error = event.error
                continue
            if isinstance(event, RunStarted):
                self.run_dir = event.run_dir
            elif isinstance(event, CheckpointSaved):
                self.last_checkpoint = event.path
            elif isinstance(event, JobFinished):
                self.final = Path(event.final_checkpoint)
            self.emit(event)

    def report_failure(self, rank: int | None, error: str, hint: str) -> None:
        if rank == 0 and self.failed is not None:  # rank 0 said it first: its own words and hint
            self.emit(self.failed)
            return
        self.emit(JobFailed(error=error, hint=hint, run_dir=self.run_dir, last_checkpoint=self.last_checkpoint,
                            finished_at=time.time()))


def prepare_model(cfg: TrainConfig) -> None:
    """Build the demo model once here, so the ranks do not race to build it."""
    from .models import demo_model_dir, is_demo

    if is_demo(cfg.model.spec):
        demo_model_dir()


def end_process_tree(proc: subprocess.Popen) -> None:
    """torchrun and its workers (one process group): TERM, then KILL what is left."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break


def keep_logs(control: Path, run_dir: str) -> None:
    """The ranks' logs move into the run folder (or stay in the launch folder when no run folder was made)."""
    if not run_dir or not Path(run_dir).is_dir():
        return
    target = Path(run_dir) / LOGS
    target.mkdir(exist_ok=True)
    for log in [*(control / LOGS).glob("*.log"), control / "torchrun.log"]:
        if log.exists():
            shutil.move(str(log), target / log.name)
    shutil.rmtree(control, ignore_errors=True)
