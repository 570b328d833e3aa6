"""Runs on several processes: torchrun with the gloo backend, 2 CPU processes, the demo model.

The claim behind every number: N ranks x batch B make the same updates as one process with batch
N x B (fp32, losses within 1e-5), under DDP and FSDP2, and a run resumes on any number of ranks.
Then the process model: Stop, a rank that crashes, a bad setting found by the ranks, killing the app.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from client_helpers import wait_until
from ruozhi_ui import launcher
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig, validate
from ruozhi_ui.errors import ConfigError, RuozhiError
from ruozhi_ui.events import CheckpointSaved, JobFailed, JobFinished, ListSink, RunStarted, StepLogged
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.train import loop
from ruozhi_ui.train.distributed import Ranks, share
from ruozhi_ui.train.step import plan_epoch

TESTS = Path(__file__).parent
ONE = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), lr=1e-3, epochs=1,
                  batch_size=8, max_steps=6, probe_prompts=(), device="cpu", run_name="one")
TWO = dataclasses.replace(ONE, batch_size=4, gpus=2, max_steps=3, run_name="two")


def losses(sink: ListSink) -> list[float]:
    return [e.loss for e in sink.events if isinstance(e, StepLogged)]


def on_ranks(cfg, root, **kwargs):
    sink = ListSink()
    final = launcher.train_on_ranks(cfg, sink, threading.Event(), root, **kwargs)
    return final, sink


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("dist-runs")


@pytest.fixture(scope="module")
def one_process(root):
    """The reference: one process, batch 8, six steps."""
    sink = ListSink()
    final = loop.train(ONE, emit=sink, stop_event=threading.Event(), runs_root=root)
    return final, sink


@pytest.fixture(scope="module")
def ddp_run(root):
    return on_ranks(dataclasses.replace(TWO, shard="ddp", run_name="ddp"), root)


@pytest.fixture(scope="module")
def fsdp_run(root):
    return on_ranks(dataclasses.replace(TWO, shard="fsdp", run_name="fsdp"), root)


def weights(final: Path) -> dict:
    return load_file(final / "model.safetensors")


# --- pure pieces ----------------------------------------------------------------------------------------------
def test_ranks_share_each_global_batch_disjointly_and_evenly():
    batch = list(range(7))
    parts = [share(batch, Ranks(rank=r, world=3)) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]


def test_a_global_batch_smaller_than_the_ranks_is_left_out():
    cfg = dataclasses.replace(ONE, batch_size=2, gpus=3)  # global batch 6: 13 examples -> 6, 6, 1
    batches = plan_epoch([5] * 13, cfg, 0)
    assert sorted(len(b) for b in batches) == [6, 6]


def test_the_global_batch_is_the_one_process_batch():
    lengths = [3, 9, 4, 12, 7, 5, 8, 6, 10, 11, 2, 13]
    assert plan_epoch(lengths, dataclasses.replace(ONE, batch_size=4, gpus=2), 1) == \
        plan_epoch(lengths, dataclasses.replace(ONE, batch_size=8), 1)


def test_every_rank_plans_the_same_number_of_micro_batches():
    from ruozhi_ui.train.step import micro_batch_sizes

    cfg = dataclasses.replace(ONE, batch_size=6, gpus=2, grad_accum_steps=2)
    # the sample's last global batch, 3 examples split 2 / 1: one micro-batch on each rank (it was 2 vs 1)
    assert [micro_batch_sizes(n, 3, cfg) for n in (2, 1)] == [[2], [1]]
    assert [micro_batch_sizes(n, 12, cfg) for n in (6, 6)] == [[3, 3], [3, 3]]
    cfg4 = dataclasses.replace(cfg, grad_accum_steps=4)
    assert [micro_batch_sizes(n, 13, cfg4) for n in (7, 6)] == [[2, 2, 2, 1], [2, 2, 1, 1]]


@pytest.mark.parametrize("change,message", [
    ({"gpus": 0}, "gpus must be between 1 and 64"),
    ({"shard": "zero3"}, "shard must be 'auto', 'ddp' or 'fsdp'"),
    ({"gpus": 2, "cuda_graphs": "on"}, "cuda_graphs='on' runs on one GPU"),
])
def test_bad_multi_gpu_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(dataclasses.replace(ONE, **change))


def test_more_gpus_than_the_machine_has_is_refused(monkeypatch):
    monkeypatch.setattr(launcher, "available_gpus", lambda: 1)
    with pytest.raises(ConfigError, match=r"gpus=2, but this machine has 1 GPU\(s\)"):
        launcher.check_devices(dataclasses.replace(TWO, device="auto"))


SUMMARY = ("Failures:\n[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : {zero} (pid: 7)\n  traceback : x\n"
           "Root Cause (first observed failure):\n[0]:\n  time      : now\n  rank      : 1 (local_rank: 1)\n"
           "  exitcode  : {one} (pid: 8)\n  error_file: <N/A>\n  traceback : y\n")


def write_launch(folder, zero, one, errors=()):
    (folder / "logs").mkdir()
    (folder / "torchrun.log").write_text(SUMMARY.format(zero=zero, one=one))
    for rank in (0, 1):
        (folder / "logs" / f"rank-{rank}.log").write_text(f"loading\nstep 1\nthe end of rank {rank}\n")
    for rank, when, error in errors:
        (folder / "logs" / f"rank-{rank}.error.json").write_text(json.dumps({"time": when, "error": error,
                                                                              "hint": ""}))


def test_a_rank_killed_by_a_signal_of_its_own_is_the_cause(tmp_path):
    write_launch(tmp_path, zero="-15", one="-11", errors=[(0, 1.0, "RuntimeError: connection reset")])
    rank, error, hint = launcher.root_cause(tmp_path, 1)
    assert (rank, error) == (1, "rank 1 failed (killed by SIGSEGV)")
    assert hint.endswith("the end of rank 1")


def test_the_first_python_error_is_the_cause_not_its_echoes(tmp_path):
    write_launch(tmp_path, zero="1", one="1", errors=[(0, 2.0, "RuntimeError: connection reset"),
                                                      (1, 1.0, "ValueError: bad")])
    rank, error, hint = launcher.root_cause(tmp_path, 1)
    assert (rank, error) == (1, "rank 1 failed: ValueError: bad")
    assert hint.endswith("the end of rank 1")


def test_events_are_read_only_when_their_line_is_complete(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = launcher.EventTail(path)
    assert tail.read() == []
    line = json.dumps({"event": "PhaseChanged", "step": 2, "phase": "validating"})
    path.write_text(line[:10])
    assert tail.read() == []
    path.write_text(line + "\n")
    assert [e.phase for e in tail.read()] == ["validating"]


# --- N ranks x batch B == one process x batch N*B -------------------------------------------------------------
def test_ddp_on_two_ranks_makes_the_one_process_updates(one_process, ddp_run):
    assert losses(ddp_run[1]) == pytest.approx(losses(one_process[1])[:3], abs=1e-5)


def test_fsdp_on_two_ranks_makes_the_one_process_updates(one_process, fsdp_run):
    assert losses(fsdp_run[1]) == pytest.approx(losses(one_process[1])[:3], abs=1e-5)


def test_an_fsdp_checkpoint_is_a_plain_transformers_folder(one_process, fsdp_run):
    from transformers import AutoModelForCausalLM

    final = fsdp_run[0]
    assert sorted(weights(final)) == sorted(weights(one_process[0]))  # a tied LM head is written once
    AutoModelForCausalLM.from_pretrained(final)
    started = next(e for e in fsdp_run[1].events if isinstance(e, RunStarted))
    assert started.steps_code == "fsdp" and started.device.startswith("2 x ")
    assert sorted(p.name for p in (final.parent.parent / "logs").iterdir()) == ["rank-0.log", "rank-1.log",
                                                                                "torchrun.log"]


def test_a_ddp_run_resumes_on_two_fsdp_ranks_where_one_process_went_on(root, one_process, ddp_run):
    cfg = dataclasses.replace(ONE, resume_from=str(ddp_run[0]), gpus=2, shard="fsdp", max_steps=6,
                              run_name="ddp-cont")
    final, sink = on_ranks(cfg, root)
    assert losses(sink) == pytest.approx(losses(one_process[1])[3:], abs=1e-5)
    ours, reference = weights(final), weights(one_process[0])
    assert max((ours[k] - reference[k]).abs().max().item() for k in reference) < 1e-5


def test_an_fsdp_run_resumes_in_one_process_with_its_global_batch(root, one_process, fsdp_run):
    cfg = dataclasses.replace(ONE, resume_from=str(fsdp_run[0]), gpus=1, max_steps=6, run_name="fsdp-cont")
    sink = ListSink()
    loop.train(cfg, emit=sink, stop_event=threading.Event(), runs_root=root)
    assert losses(sink) == pytest.approx(losses(one_process[1])[3:], abs=1e-5)


def test_an_uneven_last_batch_with_accumulation_finishes_on_two_ranks_as_in_one_process(root):
    """The sample's 183 examples in global batches of 12 end with 3, split 2 / 1 between the ranks; with
    grad_accum_steps 2 each rank once planned its own micro-batches (2 vs 1) and DDP waited forever."""
    one = dataclasses.replace(ONE, batch_size=12, grad_accum_steps=2, max_steps=0, run_name="accum-one")
    sink = ListSink()
    loop.train(one, emit=sink, stop_event=threading.Event(), runs_root=root)
    final, two = on_ranks(dataclasses.replace(one, batch_size=6, gpus=2, shard="ddp", run_name="accum-two"), root)
    assert final is not None and len(losses(two)) == 16
    assert losses(two) == pytest.approx(losses(sink), abs=1e-5)


# --- the process model ------------------------------------------------------------------------------------------
def test_stop_saves_a_final_checkpoint_and_every_rank_exits(tmp_path):
    from transformers import AutoModelForCausalLM

    runner = JobRunner(runs_root=tmp_path)
    runner.start(dataclasses.replace(TWO, epochs=100, max_steps=0, run_name="stop"))
    wait_until(lambda: runner.snapshot().steps, timeout=180, what="a first step")
    assert runner.stop() is True
    assert runner.wait(180)
    snap = runner.snapshot()
    assert snap.status == "stopped"
    final = Path(snap.checkpoints[-1].path)
    assert snap.checkpoints[-1].final and final.name == "final"
    AutoModelForCausalLM.from_pretrained(final)
    assert not list(tmp_path.glob(".launch-*"))  # the launch folder is gone, its logs kept in the run


@pytest.mark.parametrize("how,error", [("segfault", "rank 1 failed (killed by SIGSEGV)"),
                                       ("exception", "rank 1 failed: RuntimeError: rank 1 broke on purpose")])
def test_a_crashing_rank_is_reported_with_its_log_and_the_app_goes_on(tmp_path, monkeypatch, how, error):
    monkeypatch.setenv("CRASH_HOW", how)
    crashing = lambda cfg, emit, stop, root: launcher.train_on_ranks(cfg, emit, stop, root,
                                                                     worker=(str(TESTS / "crashing_rank.py"),))
    runner = JobRunner(runs_root=tmp_path, train_fn=crashing)
    runner.start(dataclasses.replace(TWO, run_name="crash"))
    assert runner.wait(180)
    snap = runner.snapshot()
    assert (snap.status, snap.error) == ("failed", error)
    assert ("RuntimeError: rank 1 broke on purpose" if how == "exception" else "Segmentation fault") in snap.hint
    runner2 = JobRunner(runs_root=tmp_path)  # the app keeps serving: the next run starts and finishes
    runner2.start(dataclasses.replace(ONE, max_steps=1, run_name="after"))
    assert runner2.wait(120) and runner2.snapshot().status == "finished"


def test_bad_data_found_by_the_ranks_is_one_error_line_from_the_cli(tmp_path):
    from ruozhi_ui.cli import main

    missing = tmp_path / "nope.json"
    with pytest.raises(RuozhiError, match="nope.json: no such file"):
        launcher.train_on_ranks(dataclasses.replace(TWO, data=DataConfig(source=str(missing))), ListSink(),
                                threading.Event(), tmp_path)
    assert main(["train", "--gpus", "0", "--data", "sample", "--model", "demo"]) == 2


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dying with the parent is a Linux feature")
def test_killing_the_app_leaves_no_workers(tmp_path):
    app = ("import sys, threading, time\n"
           "from ruozhi_ui.jobs import JobRunner\n"
           "from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig\n"
           "runner = JobRunner(runs_root=sys.argv[1])\n"
           "runner.start(TrainConfig(model=ModelConfig(spec='demo'), data=DataConfig(source='sample'), epochs=100,\n"
           "                         batch_size=4, gpus=2, probe_prompts=(), device='cpu', run_name='orphan'))\n"
           "while not runner.snapshot().steps:\n"
           "    time.sleep(0.05)\n"
           "print('training', flush=True)\n"
           "threading.Event().wait()  # serve until killed, as the app does\n")
    proc = subprocess.Popen([sys.executable, "-c", app, str(tmp_path)], stdout=subprocess.PIPE,
                            cwd=TESTS.parent, env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    try:
        assert proc.stdout.readline().strip() == b"training"
        tree = processes_mentioning(str(tmp_path))  # torchrun and its two workers
        assert len(tree) >= 3 and all(alive(pid) for pid in tree)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        wait_until(lambda: not any(alive(pid) for pid in tree), timeout=120, what="the workers to exit")
    finally:
        proc.kill()
