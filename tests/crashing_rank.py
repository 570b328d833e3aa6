"""A torchrun worker whose rank 1 fails at its second step, for tests/test_distributed.py.

CRASH_HOW=segfault: the process is killed by SIGSEGV (no Python error, as a native crash or an
OOM kill would be); anything else: a RuntimeError. Every other rank is the real worker.
"""

import os
import signal
import sys

from ruozhi_ui.train import step, worker

real_step = step.EagerStep.__call__
calls = [0]


def failing_step(self, *args, **kwargs):
    calls[0] += 1
    if os.environ.get("RANK") == "1" and calls[0] == 2:
        if os.environ.get("CRASH_HOW") == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        raise RuntimeError("rank 1 broke on purpose")
    return real_step(self, *args, **kwargs)


step.EagerStep.__call__ = failing_step
sys.exit(worker.main())
