"""What a user waits for after Start: the CLI's default run end to end, beside the reference method end to end.

    python benchmarks/e2e_speed.py                 # the measurement (CUDA), ~6 minutes on an H200
    python benchmarks/e2e_speed.py --cpu-smoke     # checks this script on the CPU with a 2-layer model
    python benchmarks/e2e_speed.py --results benchmarks/RESULTS.md   # also appends the table and key lines

Every run is a fresh process (Python start-up, imports, data, model load, kernels, training, validation,
probes, checkpoints, exit), timed from spawn to exit, on the workspace `train_speed.py` builds: the
Qwen2.5-0.5B-Instruct architecture with random weights and 2,602 synthetic records whose token lengths follow
the reference's. Runs:
  1. reference: the write-up's method (fp32, every example padded to 62 + 151 + 1, plain AdamW, a save each epoch)
  2. ours, full: `python -m ruozhi_ui train` with its defaults (3 epochs, batch 12, validation, the 3 probes and
     a checkpoint each epoch), only the data and model pointed at the workspace
  3. ours, LoRA: the same with `--method lora`
  4. ours, steps alone at a large batch (32 examples of ~1,000 tokens), in tokens/s, for comparison with the
     fastest published full fine-tune of this model (llm.q: 144k tok/s on one H100, bf16, batch 32)
Our runs' time is split by the events they write to `metrics.jsonl`, stamped as they arrive: imports (Python
start-up and the modules a run imports, timed alone in a fresh process), setup (the rest of spawn to RunStarted:
data, tokenising, model load, kernels), training steps, validation, probes, saves, and exit. Prints a table,
the lines `e2e_speedup=`, `lora_vs_full=`, `steps_tok_s_large_batch=`, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PHASES = ("imports", "setup", "training", "validating", "probing", "saving", "exit")
PUBLISHED_TOK_S = 144_000  # llm.q, Qwen2.5-0.5B full fine-tune, one H100, bf16, batch 32


class MetricsTail:
    """Stamps each line of a run's metrics.jsonl with the time it appeared (the file is flushed per event)."""

    def __init__(self, path: Path):
        self.path, self.lines = path, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        offset, partial = 0, ""
        while True:
            stopping = self._stop.is_set()  # read once more after the stop, so the last lines are kept
            if self.path.exists():
                with open(self.path, encoding="utf-8") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                now = time.time()
                *complete, partial = (partial + chunk).split("\n")
                self.lines += [(now, json.loads(line)) for line in complete if line.strip()]
            if stopping:
                return
            time.sleep(0.02)

    def close(self) -> list[tuple[float, dict]]:
        self._stop.set()
        self._thread.join()
        return self.lines


def import_seconds() -> float:
    """A fresh process that imports what a training run imports, and nothing else."""
    spawned = time.time()
    subprocess.run([sys.executable, "-c", "import ruozhi_ui.cli, ruozhi_ui.launcher, ruozhi_ui.train, torch, transformers"],
                   cwd=HERE.parent, check=True)
    return time.time() - spawned


def breakdown(spawned: float, exited: float, tail: MetricsTail, imports_s: float) -> dict:
    """Seconds per phase of one run, from its stamped events."""
    lines = tail.close()
    out = dict.fromkeys(PHASES, 0.0)
    started = next(t for t, e in lines if e["event"] == "RunStarted")
    finished = next(t for t, e in lines if e["event"] in ("JobFinished", "JobFailed"))
    out["imports"] = imports_s
    out["setup"] = started - spawned - imports_s
    phase, since = "training", started
    for t, e in lines:
        if e["event"] == "PhaseChanged":
            out[phase] += t - since
            phase, since = e["phase"], t
    out[phase] += finished - since
    out["exit"] = exited - finished
    out["wall_s"] = exited - spawned
    steps = [e for _, e in lines if e["event"] == "StepLogged"]
    out["num_steps"] = steps[-1]["step"] if steps else 0
    later = steps[len(steps) // 3:]  # past the first epoch's warm-up windows
    out["tok_per_s"] = sum(e["tok_per_s"] for e in later) / max(len(later), 1)
    out["peak_gib"] = max((e["mem_gib"] for e in steps), default=0.0)
    return out


def run_ours(ws: dict, out_dir: Path, name: str, extra: list[str], imports_s: float) -> dict:
    run_dir = out_dir / name
    cmd = [sys.executable, "-m", "ruozhi_ui", "train", "--model", ws["model"], "--data", ws["data"],
           "--system-prompt", ws["system"], "--output", str(run_dir), *extra]
    tail = MetricsTail(run_dir / "metrics.jsonl")
    spawned = time.time()
    done = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    exited = time.time()
    if done.returncode != 0:
        tail.close()
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return breakdown(spawned, exited, tail, imports_s)


def run_reference(ws_file: Path, out_dir: Path) -> dict:
    spawned = time.time()
    done = subprocess.run([sys.executable, __file__, "--reference-child", str(ws_file), str(out_dir)],
                          capture_output=True, text=True, check=True)
    wall = time.time() - spawned
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def reference_child(ws_file: Path, out_dir: Path) -> None:
    """The reference method in a fresh process: imports, tokenizer, data, model, 3 epochs, saves; printed as JSON."""
    import torch

    import train_speed

    ws = json.loads(ws_file.read_text())
    train_speed.EPOCHS = ws["epochs"]
    device = torch.device("cuda" if torch.cuda.is_available() and not ws["cpu"] else "cpu")
    result = train_speed.run_reference({**ws, "val_fraction": 0.05}, device, out_dir)
    print(json.dumps(result))


def large_batch_child(ws_file: Path, out_dir: Path) -> None:
    """Our steps alone on batches of 32 long examples (~1,000 tokens each); prints mean tok/s as JSON."""
    import torch

    import train_speed
    from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
    from ruozhi_ui.events import ListSink, StepLogged
    from ruozhi_ui.train import train

    ws = json.loads(ws_file.read_text())
    records = train_speed.synthetic_records(ws["long_records"], seed=2)
    for r in records:  # answers of ~900 tokens: repeat each synthetic answer until it is that long
        r["output"] = " ".join((r["output"].split() * 10)[:900])
    data = out_dir / "long.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    device = "cuda" if torch.cuda.is_available() and not ws["cpu"] else "cpu"
    cfg = TrainConfig(model=ModelConfig(spec=ws["model"]),
                      data=DataConfig(source=str(data), system_prompt=ws["system"], val_fraction=0.01,
                                      max_source_length=96, max_target_length=928),
                      run_name="large-batch", epochs=1, batch_size=32, max_steps=ws["large_steps"],
                      probe_prompts=(), save_every_epoch=False, save_resume_state=False, log_every_steps=5,
                      device=device)
    sink = ListSink()
    train(cfg, emit=sink, runs_root=out_dir)
    steps = sink.of(StepLogged)
    later = steps[len(steps) // 2:]  # past the captures of the first length buckets
    print(json.dumps({"tok_per_s": sum(e.tok_per_s for e in later) / max(len(later), 1),
                      "peak_gib": max(e.mem_gib for e in steps)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="2-layer model, 60 records, 2 epochs, on the CPU")
    parser.add_argument("--results", type=Path, help="append the table and the key=value lines to this file")
    parser.add_argument("--reference-child", nargs=2, metavar=("WORKSPACE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--large-batch-child", nargs=2, metavar=("WORKSPACE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_child:
        return reference_child(Path(args.reference_child[0]), Path(args.reference_child[1]))
    if args.large_batch_child:
        return large_batch_child(Path(args.large_batch_child[0]), Path(args.large_batch_child[1]))

    import torch

    import train_speed

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    root = Path(tempfile.mkdtemp(prefix="e2e-speed-"))
    ws = train_speed.build_workspace(root, train_speed.TINY if smoke else train_speed.QWEN25_05B,
                                     60 if smoke else 2449, 12 if smoke else 153, device)
    epochs = 2 if smoke else 3  # the reference reports tok/s over epochs 2 on
    ws.update(epochs=epochs, cpu=smoke, long_records=64 if smoke else 640, large_steps=4 if smoke else 40)
    ws_file = root / "workspace.json"
    ws_file.write_text(json.dumps(ws))
    epoch_flag = ["--epochs", str(epochs)] if smoke else []  # the default is 3
    device_flag = ["--device", "cpu"] if smoke else []
    imports_s = import_seconds()
    results = {}
    for name, fn in (("reference", lambda: run_reference(ws_file, root)),
                     ("ours_full", lambda: run_ours(ws, root, "full", epoch_flag + device_flag, imports_s)),
                     ("ours_lora", lambda: run_ours(ws, root, "lora", epoch_flag + device_flag + ["--method", "lora"], imports_s))):
        results[name] = fn()
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, __file__, "--large-batch-child", str(ws_file), str(root)],
                          capture_output=True, text=True, check=True)
    large = json.loads(done.stdout.strip().splitlines()[-1])

    gpu = torch.cuda.get_device_name() if not smoke else "cpu (smoke: 2-layer model, not a measurement)"
    ref, full, lora = results["reference"], results["ours_full"], results["ours_lora"]
    rows = [f"Qwen2.5-0.5B architecture (random init), {epochs} epoch(s), each run a fresh process, on {gpu}; "
            f"torch {torch.__version__}", "",
            "| run | wall s | " + " | ".join(PHASES) + " | tok/s | peak GiB | vs reference |",
            "|---|---|" + "---|" * len(PHASES) + "---|---|---|",
            f"| reference method | {ref['wall_s']:.1f} | " + " | ".join("" for _ in PHASES)
            + f" | {ref['tok_per_s']:,.0f} | {ref['peak_gib']:.2f} | 1.00x |"]
    for label, r in (("ours, defaults (full)", full), ("ours, LoRA", lora)):
        rows.append(f"| {label} | {r['wall_s']:.1f} | " + " | ".join(f"{r[p]:.1f}" for p in PHASES)
                    + f" | {r['tok_per_s']:,.0f} | {r['peak_gib']:.2f} | {ref['wall_s'] / r['wall_s']:.2f}x |")
    rows += ["", f"steps alone, batch 32 x ~1,000 tokens: {large['tok_per_s']:,.0f} tok/s, peak {large['peak_gib']:.2f} GiB "
             f"({large['tok_per_s'] / PUBLISHED_TOK_S:.0%} of llm.q's published 144k tok/s on an H100)"]
    keys = [f"e2e_speedup={ref['wall_s'] / full['wall_s']:.2f}", f"lora_vs_full={lora['wall_s'] / full['wall_s']:.2f}",
            f"steps_tok_s_large_batch={large['tok_per_s']:.0f}"]
    print("\n".join(rows + [""] + keys))
    if args.results and not smoke:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n## End to end (issue 27), " + gpu + "\n\n`python benchmarks/e2e_speed.py`\n\n"
                    + "\n".join(rows) + "\n\n" + "\n".join(keys) + "\n")
    print(json.dumps({"gpu": gpu, "torch": torch.__version__, "epochs": epochs, **results, "large_batch": large}))


if __name__ == "__main__":
    main()
