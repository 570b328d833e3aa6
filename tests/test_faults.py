"""Training faults and stops at every phase: the run folder stays consistent and the last checkpoint loads."""

import dataclasses
import errno
import threading

import pytest
import torch

from ruozhi_ui.train import checkpointing, loop, step as step_module
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.errors import ConfigError
from ruozhi_ui.events import CheckpointSaved, EvalDone, JobFailed, JobFinished, ListSink, SampleGenerated, StepLogged
from ruozhi_ui.jobs import JobRunner

BASE = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), lr=1e-3, epochs=2,
                   probe_max_new_tokens=2, device="cpu", run_name="f")


def run(cfg, root, stop_when=None):
    sink, stop = ListSink(), threading.Event()

    def emit(event):
        sink(event)
        if stop_when and stop_when(event):
            stop.set()

    final = loop.train(cfg, emit=emit, stop_event=stop, runs_root=root)
    return final, sink


def assert_consistent_run_folder(run_dir):
    from transformers import AutoModelForCausalLM

    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")], "temporary folder left"
    assert (run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    for ckpt in (run_dir / "checkpoints").iterdir():
        AutoModelForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize("phase,stop_when", [
    ("before the first step", lambda e: e.__class__.__name__ == "RunStarted"),
    ("mid-epoch", lambda e: isinstance(e, StepLogged) and e.step == 3),
    ("during validation", lambda e: isinstance(e, EvalDone)),
    ("during saving", lambda e: isinstance(e, CheckpointSaved) and not e.final),
])
def test_stop_at_every_phase_leaves_a_consistent_run_folder(tmp_path, phase, stop_when):
    final, sink = run(BASE, tmp_path, stop_when)
    assert sink.of(JobFinished)[0].status == "stopped", phase
    assert final.name == "final"
    assert_consistent_run_folder(final.parent.parent)


def test_stop_during_validation_skips_that_epochs_probes(tmp_path):
    _, sink = run(BASE, tmp_path, lambda e: isinstance(e, EvalDone))
    assert sink.of(SampleGenerated) == []


def test_nan_loss_fails_with_a_learning_rate_hint(tmp_path, monkeypatch):
    real = step_module.batch_loss_sum

    def nan_loss(model, batch):
        return real(model, batch) * float("nan")

    monkeypatch.setattr(step_module, "batch_loss_sum", nan_loss)
    final, sink = run(BASE, tmp_path)
    failed = sink.of(JobFailed)[0]
    assert final is None
    assert "nan" in failed.error.lower() and "learning rate" in failed.hint


def test_disk_full_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def full_disk(obj, path, *a, **k):
        calls.append(path)
        if len(calls) >= 2:  # the first checkpoint saves; the second hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    _, sink = run(dataclasses.replace(BASE, epochs=3), tmp_path)
    failed = sink.of(JobFailed)[0]
    assert "No space left" in failed.error and "disk" in failed.hint
    assert failed.last_checkpoint.endswith("epoch-1")
    run_dir = tmp_path / "f"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-1"]
    assert_consistent_run_folder(run_dir)


def test_unwritable_runs_folder_is_a_clear_config_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="runs folder is writable"):
        loop.train(BASE, runs_root=blocker)


def test_a_new_run_starts_after_a_failed_one(tmp_path, monkeypatch):
    def broken(model, batch):
        raise RuntimeError("boom")

    runner = JobRunner(runs_root=tmp_path)
    monkeypatch.setattr(step_module, "batch_loss_sum", broken)
    runner.start(dataclasses.replace(BASE, max_steps=1))
    assert runner.wait(120) and runner.snapshot().status == "failed"
    monkeypatch.undo()
    runner.start(dataclasses.replace(BASE, max_steps=1, probe_prompts=()))
    assert runner.wait(120) and runner.snapshot().status == "finished"


def test_stop_from_another_thread_is_seen_by_the_running_job(tmp_path):
    started = threading.Event()

    def slow_train(cfg, emit, stop_event, runs_root):
        started.set()
        stop_event.wait(timeout=60)

    runner = JobRunner(runs_root=tmp_path, train_fn=slow_train)
    runner.start(BASE)
    started.wait(30)
    assert runner.stop() is True
    assert runner.wait(30)
    assert runner.snapshot().status == "stopped"
    assert runner.stop() is False
