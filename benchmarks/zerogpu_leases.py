"""The default 0.5B run through the ZeroGPU code path (the stand-in lease runner) beside a dedicated GPU.

    python benchmarks/zerogpu_leases.py              # the measurement (CUDA): a few minutes on an H100/H200
    python benchmarks/zerogpu_leases.py --cpu-smoke  # this script end to end on a tiny model, on the CPU

No download: the workspace of benchmarks/train_speed.py (the real Qwen2.5-0.5B-Instruct architecture with
random weights, synthetic data with the reference's length distribution, 3 epochs, batch 12), built on
the CPU: this process never initialises CUDA, as on ZeroGPU, and checks so at the end. Runs, each in a
forked process (what ZeroGPU gives a lease; imports already warm):
  dedicated     `train()` as the app runs it on its own GPU
  leases        `zerogpu.supervisor.train_in_leases` with the stand-in runner and the platform's plan
                (lease length clamped to --max-lease-s): the wall time the visitor waits
  leases_x3     the same run forced into 3 leases (a short --max-lease-s): what continuing costs
A lease's start cost is the time from asking for it to its first step, less the steps in its first report
(at the run's steady step time). Prints a table, the lines zerogpu_lease_start_s= zerogpu_run_s=
zerogpu_dedicated_s=, writes them into benchmarks/RESULTS.md (not with --cpu-smoke), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from train_speed import BATCH, EPOCHS, MAX_SOURCE, MAX_TARGET, QWEN25_05B, TINY, build_workspace  # noqa: E402

from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig, load_config, save_config  # noqa: E402
from ruozhi_ui.events import JobFinished, RunStarted, StepLogged  # noqa: E402
from ruozhi_ui.zerogpu import lease, standin  # noqa: E402
from ruozhi_ui.zerogpu.plan import REFERENCE_PARAMS, LeaseCosts, costs_for, request_s  # noqa: E402
from ruozhi_ui.zerogpu.supervisor import train_in_leases  # noqa: E402

RESULT_KEYS = ("zerogpu_lease_start_s", "zerogpu_run_s", "zerogpu_dedicated_s")


def run_config(ws: dict, name: str, device: str, epochs: int) -> TrainConfig:
    return TrainConfig(model=ModelConfig(spec=ws["model"]),
                       data=DataConfig(source=ws["data"], system_prompt=ws["system"], val_fraction=ws["val_fraction"],
                                       seed=42, max_source_length=MAX_SOURCE, max_target_length=MAX_TARGET),
                       run_name=name, epochs=epochs, batch_size=BATCH, lr=1e-4, device=device)


def dedicated(spec: lease.LeaseSpec) -> lease.LeaseResult:
    """The whole run in one forked process, no lease bounds: the dedicated-GPU baseline."""
    from ruozhi_ui.train import train

    t0 = time.monotonic()
    final = train(load_config(spec.config_file), runs_root=Path(spec.runs_root))
    return lease.LeaseResult(status="finished", step=0, checkpoint=str(final), elapsed_s=time.monotonic() - t0)


class Clock:
    """Every event with the time it reached this process, and when each lease was asked for."""

    def __init__(self, runner):
        self.runner, self.events, self.calls = runner, [], []

    def __call__(self, spec):
        self.calls.append(time.time())
        return self.runner(spec)

    def emit(self, event) -> None:
        self.events.append((time.time(), event))

    def start_costs(self) -> list[float]:
        steps = [(t, e) for t, e in self.events if isinstance(e, StepLogged)]
        gaps = [(b.elapsed_s - a.elapsed_s) / (b.step - a.step) for (_, a), (_, b) in zip(steps, steps[1:])
                if b.step > a.step and b.elapsed_s > a.elapsed_s]
        step_s = statistics.median(gaps) if gaps else 0.0
        costs = []
        for asked in self.calls:
            first = next(((t, e) for t, e in steps if t > asked), None)
            if first is not None:
                done_before = max((e.step for t, e in steps if t < asked), default=0)
                costs.append(first[0] - asked - (first[1].step - done_before) * step_s)
        return costs


def through_leases(cfg: TrainConfig, root: Path, max_lease_s: int, costs: LeaseCosts,
                   kill_after_s: float | None) -> dict:
    clock = Clock(standin.StandInLeases(kill_after_s=kill_after_s))
    t0 = time.time()
    final = train_in_leases(cfg, clock.emit, threading.Event(), root, runner=clock, limit_s=max_lease_s, costs=costs)
    wall = time.time() - t0
    end = [e for _, e in clock.events if isinstance(e, JobFinished)]
    assert final is not None and end and end[-1].status == "finished", f"the run through leases failed: {clock.events[-1]}"
    started = next(e for _, e in clock.events if isinstance(e, RunStarted))
    return {"wall_s": wall, "leases": len(clock.calls), "lease_start_s": clock.start_costs(),
            "num_steps": started.num_steps, "precision": started.precision}


def in_fork(cfg: TrainConfig, root: Path, limit_s: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "dedicated.json")
    spec = lease.LeaseSpec(control=str(root), runs_root=str(root), config_file=str(root / "dedicated.json"),
                           continue_in="", until_step=0, duration_s=limit_s, reserve_s=0)
    t0 = time.time()
    standin.StandInLeases(dedicated)(spec)
    return {"wall_s": time.time() - t0, "leases": 0, "lease_start_s": []}


def write_results(values: dict, device_name: str) -> None:
    """Replace (or add) the zerogpu_* lines in benchmarks/RESULTS.md, with a dated note of the device."""
    path = BENCH / "RESULTS.md"
    text = path.read_text(encoding="utf-8")
    for key in RESULT_KEYS:
        line = f"{key}={values[key]:.1f}"
        text = re.sub(rf"^{key}=.*$", line, text, flags=re.M) if re.search(rf"^{key}=", text, re.M) \
            else text.rstrip("\n") + "\n" + line + "\n"
    note = f"<!-- zerogpu_* lines: benchmarks/zerogpu_leases.py on {device_name}, {time.strftime('%Y-%m-%d')} -->"
    text = re.sub(r"^<!-- zerogpu_\* lines: .*-->$", note, text, flags=re.M) if "<!-- zerogpu_* lines:" in text \
        else text.rstrip("\n") + "\n" + note + "\n"
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="2-layer model, 60 records, on the CPU: checks the script")
    parser.add_argument("--max-lease-s", type=int, default=120, help="the longest lease asked for (ZeroGPU's limit)")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    device = "cpu" if smoke else "cuda"
    epochs = 2 if smoke else EPOCHS
    root = Path(tempfile.mkdtemp(prefix="zerogpu-leases-"))
    # built on the CPU: CUDA must stay untouched in this process, or the forked leases could not use it
    ws = build_workspace(root, TINY if smoke else QWEN25_05B, 60 if smoke else 2449, 12 if smoke else 153,
                         torch.device("cpu"))
    cfg = lambda name: run_config(ws, name, device, epochs)
    num_steps = epochs * math.ceil((60 if smoke else 2449) / BATCH)
    costs = LeaseCosts(step_s=2, epoch_end_s=2, save_s=1, start_s=20) if smoke else \
        costs_for(REFERENCE_PARAMS, BATCH * (MAX_SOURCE + MAX_TARGET + 1))
    # a limit that holds about a third of the run per lease
    third = request_s(costs.start_s + costs.save_s + (num_steps * costs.step_s + epochs * costs.epoch_end_s) / 3, 10 ** 6)
    kill_after_s = 600 if smoke else None  # on the GPU a lease is ended at its duration, as ZeroGPU does
    results = {"leases": through_leases(cfg("leases"), root / "runs", args.max_lease_s, costs, kill_after_s),
               "leases_x3": through_leases(cfg("leases3"), root / "runs", third, costs, kill_after_s)}
    app_process_cuda = torch.cuda.is_initialized()
    results["dedicated"] = in_fork(cfg("dedicated"), root / "dedicated", 3600)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not smoke else "cpu"
    print(f"\nQwen2.5-0.5B architecture (random init), {epochs} epochs, batch {BATCH}, on {name}; torch {torch.__version__}"
          if not smoke else f"\ntiny model, {epochs} epochs, on the CPU (smoke)")
    print(f"{'run':<10} {'wall s':>7} {'leases':>7}  lease start s")
    for key, r in results.items():
        print(f"{key:<10} {r['wall_s']:>7.1f} {r['leases']:>7}  {', '.join(f'{s:.1f}' for s in r['lease_start_s'])}")
    starts = results["leases"]["lease_start_s"] + results["leases_x3"]["lease_start_s"]
    values = {"zerogpu_lease_start_s": statistics.median(starts) if starts else float("nan"),
              "zerogpu_run_s": results["leases"]["wall_s"], "zerogpu_dedicated_s": results["dedicated"]["wall_s"]}
    print(f"app process initialised CUDA: {app_process_cuda}")
    for key in RESULT_KEYS:
        print(f"{key}={values[key]:.1f}")
    if not smoke:
        write_results(values, name)
    print(json.dumps({"device": name, "torch": torch.__version__, "app_process_cuda": app_process_cuda,
                      **values, "runs": results}))


if __name__ == "__main__":
    main()
