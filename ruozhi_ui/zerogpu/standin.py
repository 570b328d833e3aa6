"""A stand-in for ZeroGPU's lease runner, for tests and the GPU benchmark: what the platform does, locally.

Like `spaces` (zero/wrappers.py) each call forks a process (from a fork server, see StandInLeases), sends it the pickled arguments, gets the
pickled result back, and ends it at its duration; a worker that dies or is killed without a result
raises what `spaces` raises then (a titled error: "ZeroGPU worker error", "GPU task aborted"), and
an exception in the worker comes back as its class name only. `emulate_app_process_cuda` makes CUDA
look present but fail on first use in the app process, as `spaces` patches torch there; the worker
gets the real torch back.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import pickle
import signal
import sys
import time
from typing import Callable, Iterator, Literal

from .lease import run_lease

WORKER_ERROR = "ZeroGPU worker error"


class PlatformError(Exception):
    """The shape of ZeroGPU's errors: a gr.Error with a title and a message."""

    def __init__(self, message: str, title: str):
        super().__init__(message)
        self.message, self.title = message, title


_ORIGINAL: dict = {}


def _cuda_touched(*args, **kwargs):
    raise RuntimeError("CUDA was initialised in the app process: on ZeroGPU only a lease may touch the GPU")


def emulate_app_process_cuda() -> None:
    """From now on in this process, CUDA says it is there and raises on first use (ZeroGPU's main process)."""
    import torch

    if not _ORIGINAL:
        _ORIGINAL.update(is_available=torch.cuda.is_available, lazy_init=torch.cuda._lazy_init)
    torch.cuda.is_available = lambda: True
    torch.cuda._lazy_init = _cuda_touched


def restore_cuda() -> None:
    """The real torch.cuda again (the lease's process, or the end of a test)."""
    if _ORIGINAL:
        import torch

        torch.cuda.is_available, torch.cuda._lazy_init = _ORIGINAL["is_available"], _ORIGINAL["lazy_init"]
        _ORIGINAL.clear()


# The stand-in pickles arguments and results between this process and the lease process it forked itself,
# as `spaces` does; no bytes from a visitor or a file ever reach these loads (tests and the benchmark only).
def _worker(fn: Callable, payload: bytes, conn) -> None:
    restore_cuda()
    try:
        if inspect.isgeneratorfunction(fn):  # each item crosses back as it is yielded, as ZeroGPU streams
            for item in fn(pickle.loads(payload)):
                conn.send_bytes(pickle.dumps(("item", item)))
            result = ("end", None)
        else:
            result = ("ok", fn(pickle.loads(payload)))
    except Exception as e:  # noqa: BLE001 - like ZeroGPU, only the class name crosses back
        result = ("error", type(e).__name__)
    conn.send_bytes(pickle.dumps(result))
    conn.close()


StartMethod = Literal["forkserver", "fork"]
# what the fork server imports once, so a lease starts as ZeroGPU's does: from a process with them loaded
PRELOAD = ["torch", "transformers", "ruozhi_ui.zerogpu.lease", "ruozhi_ui.train", "ruozhi_ui.generation"]


class StandInLeases:
    """Runs each lease in a forked process for at most its duration (`kill_after_s` overrides it, for tests).
    A generator function's call streams: it returns a generator of what the worker yields.

    "forkserver" forks each lease from a clean process that imported torch and the engine but never
    computed: ZeroGPU forks the app process, which in this mode never computes with torch either, whereas
    a test process (or the benchmark, which builds its model on the CPU) has run CPU kernels, and a fork
    of that can hang in the OpenMP thread pool. "fork" forks this very process, as `spaces` does."""

    def __init__(self, fn: Callable = run_lease, kill_after_s: float | None = None,
                 duration: Callable[..., int] | None = None, start_method: StartMethod = "forkserver"):
        self.fn, self.kill_after_s, self.calls, self.start_method = fn, kill_after_s, 0, start_method
        self.duration = duration or (lambda spec: spec.duration_s)

    def __call__(self, spec):
        items = self._call(spec)
        if inspect.isgeneratorfunction(self.fn):
            return (value for kind, value in items if kind == "item")
        (kind, value), = list(items)
        return value

    def _call(self, spec) -> Iterator[tuple[str, object]]:
        torch = sys.modules.get("torch")
        if torch is not None and not _ORIGINAL and torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialised in the app process before the lease: ZeroGPU would refuse "
                               "to fork a GPU worker from it")
        self.calls += 1
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        receive, send = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_worker, args=(self.fn, pickle.dumps(spec), send), daemon=True)
        worker.start()
        send.close()
        deadline = time.monotonic() + (self.duration(spec) if self.kill_after_s is None else self.kill_after_s)
        try:
            while True:
                if not receive.poll(max(0.0, deadline - time.monotonic())):
                    raise PlatformError("GPU task aborted", WORKER_ERROR)
                kind, value = pickle.loads(receive.recv_bytes())
                if kind == "error":
                    raise PlatformError(value, WORKER_ERROR)
                yield kind, value
                if kind != "item":
                    return
        except EOFError:  # the worker died without a result
            raise PlatformError("GPU task aborted", WORKER_ERROR) from None
        finally:
            worker.kill()  # SIGKILL; a worker that has just exited by itself is no error (multiprocessing checks)
            worker.join()
            receive.close()
