"""The SFT loop on the demo model: objective, accumulation, stop, resume, LoRA, failures, the job runner."""

import dataclasses
import json
import math
import pickle
import threading

import pytest
import torch

from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.data import load_source
from ruozhi_ui.encoding import encode_record
from ruozhi_ui.errors import ConfigError, JobConflict
from ruozhi_ui.events import (CheckpointSaved, EvalDone, JobFailed, JobFinished, ListSink, PhaseChanged, RunStarted,
                              StepLogged)
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.train import checkpointing, loop, run as run_module, step as step_module
from ruozhi_ui.train.precision import choose_precision

BASE = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), lr=1e-3,
                   probe_max_new_tokens=4, device="cpu", run_name="t")


def run(cfg, tmp_path, emit=None, stop_event=None):
    sink = ListSink()

    def both(event):
        sink(event)
        if emit:
            emit(event)

    final = loop.train(cfg, emit=both, stop_event=stop_event, runs_root=tmp_path)
    return final, sink


def sample_examples(tokenizer, n):
    d = BASE.data
    return [encode_record(tokenizer, r, d.system_prompt, d.max_source_length, d.max_target_length)
            for r in load_source("sample").train[:n]]


class GradsAtStep(torch.optim.SGD):
    """An optimizer that records the gradients it is asked to apply (and applies nothing)."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def grads_of_one_step(model, tokenizer, examples, cfg):
    optimizer = GradsAtStep(model.parameters())
    stepper = step_module.EagerStep(model, optimizer, dataclasses.replace(cfg, max_grad_norm=0),
                                    choose_precision(cfg, torch.device("cpu")), tokenizer.pad_token_id)
    loss, _ = stepper(0, examples, 0.0)
    return loss.item(), optimizer.grads


def test_accumulation_over_micro_batches_equals_one_big_batch(tokenizer, demo_model):
    examples = sample_examples(tokenizer, 6)
    loss1, g1 = grads_of_one_step(demo_model, tokenizer, examples, dataclasses.replace(BASE, batch_size=6))
    loss3, g3 = grads_of_one_step(demo_model, tokenizer, examples,
                                  dataclasses.replace(BASE, batch_size=6, grad_accum_steps=3))
    assert loss1 == pytest.approx(loss3, abs=1e-5)
    for a, b in zip(g1, g3, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_packed_and_padded_steps_give_the_same_loss_and_grads(tokenizer, demo_model):
    examples = sample_examples(tokenizer, 4)
    loss_pad, g_pad = grads_of_one_step(demo_model, tokenizer, examples, BASE)
    loss_pack, g_pack = grads_of_one_step(demo_model, tokenizer, examples, dataclasses.replace(BASE, packing=True))
    assert loss_pad == pytest.approx(loss_pack, abs=1e-5)
    for a, b in zip(g_pad, g_pack, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_the_cosine_schedule_ends_exactly_at_the_floor():
    cfg = dataclasses.replace(BASE, lr_schedule="cosine", warmup_steps=2, lr=1e-3)
    lrs = [step_module.lr_at(s, cfg, 10) for s in range(10)]
    assert lrs[:3] == [5e-4, 1e-3, 1e-3]  # warmup to lr, then the cosine starts at lr
    assert lrs[-1] == pytest.approx(1e-4, abs=1e-15)  # exactly 10 % at the last step, not 0.1000066
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_training_loss_falls_and_checkpoint_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, sink = run(dataclasses.replace(BASE, epochs=2), tmp_path)
    steps = sink.of(StepLogged)
    assert steps[-1].loss < steps[0].loss
    assert [e.epoch for e in sink.of(EvalDone)] == [1, 2]
    assert sink.of(JobFinished)[0].status == "finished" and sink.of(JobFinished)[0].finished_at > 0
    assert (final.parent / "epoch-1" / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    prompt = tok("你好", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 3
    assert (final.parent.parent / "metrics.jsonl").read_text(encoding="utf-8").count("StepLogged") == len(steps)
    assert list((final.parent.parent / "tb").glob("events.out.tfevents.*"))
    phases = [e.phase for e in sink.of(PhaseChanged)]
    assert phases == ["training", "validating", "probing", "saving", "training", "validating", "probing", "saving"]


def test_stop_mid_epoch_leaves_a_loadable_checkpoint_and_status_stopped(tmp_path):
    from transformers import AutoModelForCausalLM

    stop = threading.Event()

    def stop_after_two(event):
        if isinstance(event, StepLogged) and event.step == 2:
            stop.set()

    final, sink = run(BASE, tmp_path, emit=stop_after_two, stop_event=stop)
    assert sink.of(JobFinished)[0].status == "stopped"
    assert [e.step for e in sink.of(StepLogged)] == [1, 2]
    assert sink.of(CheckpointSaved)[-1].final
    AutoModelForCausalLM.from_pretrained(final)


def test_resume_continues_the_loss_curve_in_a_new_run_folder(tmp_path):
    cfg = dataclasses.replace(BASE, epochs=2, probe_prompts=(), max_steps=0)
    _, whole = run(dataclasses.replace(cfg, run_name="whole"), tmp_path)
    stop, stop_at = threading.Event(), 20  # mid second epoch (16 steps an epoch)

    def stop_then(event):
        if isinstance(event, StepLogged) and event.step == stop_at:
            stop.set()

    first_final, first = run(cfg, tmp_path, emit=stop_then, stop_event=stop)
    original = sorted(p.name for p in first_final.parent.parent.rglob("*"))
    original_metrics = (first_final.parent.parent / "metrics.jsonl").read_text()
    resumed_final, second = run(dataclasses.replace(cfg, run_name="t-cont", resume_from=str(first_final)), tmp_path)
    expected = [e.loss for e in whole.of(StepLogged)]
    got = [e.loss for e in first.of(StepLogged)] + [e.loss for e in second.of(StepLogged)]
    assert [e.step for e in second.of(StepLogged)][0] == stop_at + 1
    assert got == pytest.approx(expected, abs=1e-4)
    assert resumed_final.parent.parent.name == "t-cont" != first_final.parent.parent.name
    assert sorted(p.name for p in first_final.parent.parent.rglob("*")) == original  # the original is untouched
    assert (first_final.parent.parent / "metrics.jsonl").read_text() == original_metrics
    assert second.of(RunStarted)[0].resumed_from == str(first_final)


def test_a_crafted_training_state_is_refused_and_never_unpickled(tmp_path):
    final, _ = run(dataclasses.replace(BASE, max_steps=1, probe_prompts=()), tmp_path)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            import os

            return os.mkdir, (str(marker),)

    (final / "training_state.pt").write_bytes(pickle.dumps({"state": Payload()}))
    with pytest.raises(ConfigError, match="not plain tensors"):
        run(dataclasses.replace(BASE, resume_from=str(final), run_name="again"), tmp_path)
    assert not marker.exists()


def test_a_crash_between_the_two_renames_of_final_never_loses_it(tmp_path):
    from ruozhi_ui.checkpoints import recover_checkpoints

    final, _ = run(dataclasses.replace(BASE, max_steps=1, probe_prompts=()), tmp_path)
    folder = final.parent
    final.rename(folder / ".old-final-123")  # the first rename happened, the second did not
    (folder / ".tmp-final-9-456").mkdir()  # a half-written copy
    assert recover_checkpoints(folder) == ["recovered final", "removed .tmp-final-9-456"]
    assert sorted(p.name for p in folder.iterdir()) == ["final"]
    _, resumed = run(dataclasses.replace(BASE, max_steps=2, resume_from=str(final), run_name="on"), tmp_path)
    assert resumed.of(JobFinished)[0].status == "finished"


def test_keep_checkpoints_keeps_the_newest_epochs_and_final(tmp_path):
    final, _ = run(dataclasses.replace(BASE, epochs=4, keep_checkpoints=1, probe_prompts=(), max_steps=0,
                                       data=dataclasses.replace(BASE.data, max_target_length=16)), tmp_path)
    assert sorted(p.name for p in final.parent.iterdir()) == ["epoch-3", "final"]


def test_background_epoch_checkpoints_hold_the_weights_of_their_epoch_and_resume(tmp_path, monkeypatch):
    """Epoch saves written on a thread (the GPU path) are complete, in order, tied weights intact, resumable."""
    from safetensors.torch import load_file

    monkeypatch.setattr(run_module, "saves_in_background", lambda device, cfg: True)
    snapshots, second_eval = {}, threading.Event()
    real_snapshot, real_save = run_module.cpu_snapshot, run_module.save_checkpoint

    def remember(obj, memo=None):
        copy = real_snapshot(obj, memo)
        if isinstance(copy, dict) and "lm_head.weight" in copy:
            snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in copy.items()}
        return copy

    def first_save_finishes_after_the_next_epochs_validation(*args, **kwargs):
        if args[4] == "epoch-1":
            assert second_eval.wait(60)  # epoch 2 trains meanwhile and appends its validation loss
        return real_save(*args, **kwargs)

    monkeypatch.setattr(run_module, "cpu_snapshot", remember)
    monkeypatch.setattr(run_module, "save_checkpoint", first_save_finishes_after_the_next_epochs_validation)
    cfg = dataclasses.replace(BASE, epochs=3, probe_prompts=(), data=dataclasses.replace(BASE.data, max_target_length=16))
    final, sink = run(cfg, tmp_path, emit=lambda e: isinstance(e, EvalDone) and e.epoch == 2 and second_eval.set())
    assert len(json.loads((final.parent / "epoch-1" / "metrics.json").read_text())["val_loss"]) == 1
    assert [(e.epoch, e.final) for e in sink.of(CheckpointSaved)] == [(1, False), (2, False), (3, True)]
    for epoch in (1, 2):
        written = load_file(final.parent / f"epoch-{epoch}" / "model.safetensors")
        assert torch.equal(written["model.embed_tokens.weight"], snapshots[epoch]["model.embed_tokens.weight"])
        assert "lm_head.weight" not in written  # still tied, stored once
    assert not (final.parent / "epoch-1" / "training_state.pt").exists()  # only the newest keeps it
    _, resumed = run(dataclasses.replace(cfg, epochs=4, resume_from=str(final), run_name="more"), tmp_path)
    assert resumed.of(JobFinished)[0].status == "finished"


def test_a_failed_background_save_fails_the_run_with_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "saves_in_background", lambda device, cfg: True)
    real_save = run_module.save_checkpoint

    def disk_full(*args, **kwargs):
        if args[4] == "epoch-1":
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(run_module, "save_checkpoint", disk_full)
    _, sink = run(dataclasses.replace(BASE, epochs=2, probe_prompts=()), tmp_path)
    failed = sink.of(JobFailed)
    assert failed and "No space left" in failed[0].error and "disk" in failed[0].hint


def test_lora_adapter_loads_with_peft_and_merged_model_with_transformers(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    cfg = dataclasses.replace(BASE, method="lora", save_merged=True, max_steps=2)
    final, sink = run(cfg, tmp_path)
    assert (final / "adapter_model.safetensors").is_file()
    assert sink.of(JobFinished)[0].status == "finished"
    AutoPeftModelForCausalLM.from_pretrained(final)
    merged = AutoModelForCausalLM.from_pretrained(final.parent / "final-merged")
    started = sink.of(RunStarted)[0]
    assert sum(p.numel() for p in merged.parameters()) == started.params_total - started.params_trained


def test_exception_inside_the_engine_reaches_the_job_snapshot_as_failed(tmp_path, monkeypatch):
    def broken_loss(model, batch):
        raise RuntimeError("simulated failure inside a step")

    monkeypatch.setattr(step_module, "batch_loss_sum", broken_loss)
    runner = JobRunner(runs_root=tmp_path)
    runner.start(BASE)
    assert runner.wait(timeout=120)
    snap = runner.snapshot()
    assert snap.status == "failed"
    assert "simulated failure inside a step" in snap.error


@pytest.mark.parametrize("error,hint", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "lower the batch size"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 8589934592 bytes"), "lower the batch size"),
    (FloatingPointError("loss is nan at step 3"), "lower the learning rate"),
    (RuntimeError("an error that mentions inf and nan but is neither"), None),
])
def test_the_failure_hint_is_chosen_by_the_errors_kind(tmp_path, monkeypatch, error, hint):
    def fail(model, batch):
        raise error

    monkeypatch.setattr(step_module, "batch_loss_sum", fail)
    _, sink = run(BASE, tmp_path)
    failed = sink.of(JobFailed)[0]
    assert (hint in failed.hint) if hint else failed.hint == ""


@pytest.mark.parametrize("changes,reason", [
    (dict(), "CUDA graphs need a CUDA GPU"),
    (dict(packing=True), "CUDA graphs need a CUDA GPU"),
])
def test_cuda_graphs_on_is_refused_when_they_cannot_run(tmp_path, changes, reason):
    with pytest.raises(ConfigError, match=f"cuda_graphs='on': {reason}"):
        run(dataclasses.replace(BASE, cuda_graphs="on", **changes), tmp_path)
    assert not list(tmp_path.iterdir())  # refused before any run folder


def test_a_second_start_while_running_is_refused(tmp_path):
    release = threading.Event()

    def blocking_train(cfg, emit, stop_event, runs_root):
        release.wait(timeout=30)

    runner = JobRunner(runs_root=tmp_path, train_fn=blocking_train)
    runner.start(BASE)
    with pytest.raises(JobConflict):
        runner.start(BASE)
    release.set()
    assert runner.wait(timeout=30)
    assert runner.snapshot().status == "finished"
    release.clear()
    runner.start(BASE)  # a new run is startable once the first ended
    assert runner.snapshot().status in ("starting", "running")
    release.set()
    assert runner.wait(timeout=30)


def test_train_needs_its_runs_folder():
    with pytest.raises(ValueError, match="runs folder"):
        loop.train(BASE)


def test_a_stop_after_the_last_step_still_finishes_the_run(tmp_path):
    stop = threading.Event()
    final, sink = run(dataclasses.replace(BASE, max_steps=2), tmp_path, stop_event=stop,
                      emit=lambda e: isinstance(e, EvalDone) and stop.set())  # during the last validation
    assert sink.of(JobFinished)[0].status == "finished"


def test_a_checkpoint_saved_before_rng_states_were_tensors_still_resumes(tmp_path):
    final, _ = run(dataclasses.replace(BASE, max_steps=1, probe_prompts=()), tmp_path)
    blob = torch.load(final / "training_state.pt", weights_only=True)
    import random

    blob["rng_python"] = random.getstate()  # the old format: a plain tuple
    torch.save(blob, final / "training_state.pt")
    _, resumed = run(dataclasses.replace(BASE, max_steps=2, resume_from=str(final), run_name="old"), tmp_path)
    assert resumed.of(JobFinished)[0].status == "finished"
