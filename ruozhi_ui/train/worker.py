"""One torchrun rank of a run on several processes; `ruozhi_ui/launcher.py` starts and watches them.

    python -m torch.distributed.run --standalone --nproc-per-node N -m ruozhi_ui.train.worker CONTROL RUNS

CONTROL is the launch's folder: `config.json` in; rank 0's events out as JSON lines in
`events.jsonl`; a `stop` file asks every rank to stop at the next step (they agree through a
collective); each rank's output goes to `logs/rank-N.log` (the protocol: worker_protocol.py). A rank
dies with its parent (Linux), so killing the launcher never leaves workers behind.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path

from ..worker_protocol import CONFIG, EVENTS, LOGS, STOP, EventLines, StopFile, die_with_parent


def send_output_to(log: Path) -> None:
    """stdout and stderr of this process, C level included (a segfault's trace), into `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    faulthandler.enable()


def record_failure(path: Path, error: BaseException) -> None:
    from ..errors import first_line
    from .run import failure_hint

    path.write_text(json.dumps({"time": time.time(), "error": f"{type(error).__name__}: {first_line(error)}",
                                "hint": failure_hint(error)}, ensure_ascii=False), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    control, runs_root = (Path(a) for a in (argv or sys.argv[1:])[:2])
    rank = int(os.environ.get("RANK", "0"))
    die_with_parent()
    send_output_to(control / LOGS / f"rank-{rank}.log")
    from ..config import load_config
    from ..errors import RuozhiError
    from ..events import JobFailed, NullSink
    from . import distributed
    from .loop import train

    emit = EventLines(control / EVENTS) if rank == 0 else NullSink()
    try:
        train(load_config(control / CONFIG), emit, StopFile(control / STOP), runs_root)
    except RuozhiError as e:  # a bad setting or data, before the run folder exists: one line, like the CLI
        if rank == 0:
            emit(JobFailed(error=str(e), hint=""))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the launcher tells the first failure from the others' echoes by its time
        record_failure(control / LOGS / f"rank-{rank}.error.json", e)
        raise
    # a failure above propagates: this rank exits non-zero and torchrun stops the others
    distributed.finish(distributed.Ranks(world=int(os.environ.get("WORLD_SIZE", "1"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
