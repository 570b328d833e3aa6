"""The SFT loop on the demo model: objective, accumulation, stop, resume, LoRA, failures, the job runner."""

import dataclasses
import json
import threading
import time

import pytest
import torch

from ruozhi_ui import engine
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.data import load_source
from ruozhi_ui.encoding import encode_record
from ruozhi_ui.errors import JobConflict
from ruozhi_ui.events import CheckpointSaved, EvalDone, JobFailed, JobFinished, ListSink, StepLogged
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.loss import batch_loss_sum
from ruozhi_ui.precision import choose_precision

BASE = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), lr=1e-3,
                   probe_max_new_tokens=4, device="cpu", run_name="t")


def run(cfg, tmp_path, emit=None, stop_event=None):
    sink = ListSink()

    def both(event):
        sink(event)
        if emit:
            emit(event)

    final = engine.train(cfg, emit=both, stop_event=stop_event, runs_root=tmp_path)
    return final, sink


def sample_examples(tokenizer, n):
    splits = load_source("sample")
    d = BASE.data
    return [encode_record(tokenizer, r, d.system_prompt, d.max_source_length, d.max_target_length)
            for r in splits.train[:n]]


def grads_after_step(model, tokenizer, examples, cfg):
    model.zero_grad(set_to_none=True)
    micro = engine.make_micro_batches(examples, cfg, tokenizer.pad_token_id, torch.device("cpu"))
    step_fn = choose_precision(cfg, torch.device("cpu")).wrap_step(model, batch_loss_sum)
    loss = step_fn(micro, sum(mb["targets"].numel() for mb in micro))
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_over_micro_batches_equals_one_big_batch(tokenizer, demo_model):
    examples = sample_examples(tokenizer, 6)
    loss1, g1 = grads_after_step(demo_model, tokenizer, examples, dataclasses.replace(BASE, batch_size=6))
    loss3, g3 = grads_after_step(demo_model, tokenizer, examples,
                                 dataclasses.replace(BASE, batch_size=6, grad_accum_steps=3))
    assert abs(loss1 - loss3) < 1e-5
    for name in g1:
        torch.testing.assert_close(g3[name], g1[name], atol=1e-6, rtol=1e-4)


def test_packed_and_padded_steps_give_the_same_loss_and_grads(tokenizer, demo_model):
    examples = sample_examples(tokenizer, 4)
    loss_pad, g_pad = grads_after_step(demo_model, tokenizer, examples, BASE)
    loss_pack, g_pack = grads_after_step(demo_model, tokenizer, examples, dataclasses.replace(BASE, packing=True))
    assert abs(loss_pad - loss_pack) < 1e-5
    for name in g_pad:
        torch.testing.assert_close(g_pack[name], g_pad[name], atol=1e-6, rtol=1e-4)


def test_training_loss_falls_and_checkpoint_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final, sink = run(dataclasses.replace(BASE, epochs=2), tmp_path)
    steps = sink.of(StepLogged)
    assert steps[-1].loss < steps[0].loss
    assert [e.epoch for e in sink.of(EvalDone)] == [1, 2]
    assert sink.of(JobFinished)[0].status == "finished"
    assert (final.parent / "epoch-1" / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    out = model.generate(**tok("你好", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 0
    assert (final.parent.parent / "metrics.jsonl").read_text(encoding="utf-8").count("StepLogged") == len(steps)
    assert list((final.parent.parent / "tb").glob("events.out.tfevents.*"))


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


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    cfg = dataclasses.replace(BASE, epochs=2, probe_prompts=())
    _, whole = run(cfg, tmp_path / "whole")
    stop = threading.Event()
    stop_at = 17  # mid second epoch

    def stop_then(event):
        if isinstance(event, StepLogged) and event.step == stop_at:
            stop.set()

    first_final, first = run(cfg, tmp_path / "parts", emit=stop_then, stop_event=stop)
    _, second = run(dataclasses.replace(cfg, resume_from=str(first_final)), tmp_path / "parts")
    expected = [e.loss for e in whole.of(StepLogged)]
    got = [e.loss for e in first.of(StepLogged)] + [e.loss for e in second.of(StepLogged)]
    assert [e.step for e in second.of(StepLogged)][0] == stop_at + 1
    assert got == pytest.approx(expected, abs=1e-4)


def test_background_epoch_checkpoints_hold_the_weights_of_their_epoch_and_resume(tmp_path, monkeypatch):
    """Epoch saves written on a thread (the GPU path) are complete, in order, tied weights intact, resumable."""
    from safetensors.torch import load_file

    monkeypatch.setattr(engine, "saves_in_background", lambda device, cfg: True)
    snapshots = {}
    real_snapshot = engine.cpu_snapshot

    def remember(obj, memo=None):
        copy = real_snapshot(obj, memo)
        if isinstance(copy, dict) and "lm_head.weight" in copy:
            snapshots[len(snapshots) + 1] = {k: v.clone() for k, v in copy.items()}
        return copy

    monkeypatch.setattr(engine, "cpu_snapshot", remember)
    real_save = engine.save_checkpoint

    def slow_first_save(*args, **kwargs):
        if args[4] == "epoch-1":
            time.sleep(2)  # epoch 2 trains meanwhile and appends its validation loss to the run's summary
        return real_save(*args, **kwargs)

    monkeypatch.setattr(engine, "save_checkpoint", slow_first_save)
    cfg = dataclasses.replace(BASE, epochs=3, probe_prompts=())
    final, sink = run(cfg, tmp_path)
    assert len(json.loads((final.parent / "epoch-1" / "metrics.json").read_text())["val_loss"]) == 1
    saves = sink.of(CheckpointSaved)
    assert [(e.epoch, e.final) for e in saves] == [(1, False), (2, False), (3, True)]
    for epoch in (1, 2):
        written = load_file(final.parent / f"epoch-{epoch}" / "model.safetensors")
        assert torch.equal(written["model.embed_tokens.weight"], snapshots[epoch]["model.embed_tokens.weight"])
        assert "lm_head.weight" not in written  # still tied, stored once
    assert not (final.parent / "epoch-1" / "training_state.pt").exists()  # only the newest keeps it
    _, resumed = run(dataclasses.replace(cfg, epochs=4, resume_from=str(final)), tmp_path)
    assert resumed.of(JobFinished)[0].status == "finished"


def test_a_failed_background_save_fails_the_run_with_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "saves_in_background", lambda device, cfg: True)
    real_save = engine.save_checkpoint

    def disk_full(*args, **kwargs):
        if args[4] == "epoch-1":
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(engine, "save_checkpoint", disk_full)
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
    assert sum(p.numel() for p in merged.parameters()) == sink.events[0].params_total - sink.events[0].params_trained


def test_exception_inside_the_engine_reaches_the_job_snapshot_as_failed(tmp_path, monkeypatch):
    def broken_loss(model, batch):
        raise RuntimeError("simulated failure inside a step")

    monkeypatch.setattr(engine, "batch_loss_sum", broken_loss)
    runner = JobRunner(runs_root=tmp_path)
    runner.start(BASE)
    assert runner.wait(timeout=120)
    snap = runner.snapshot()
    assert snap.status == "failed"
    assert "simulated failure inside a step" in snap.error


def test_simulated_out_of_memory_fails_with_a_hint(tmp_path, monkeypatch):
    def oom(model, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "batch_loss_sum", oom)
    _, sink = run(BASE, tmp_path)
    failed = sink.of(JobFailed)[0]
    assert "out of memory" in failed.error.lower()
    assert "batch size" in failed.hint and "LoRA" in failed.hint


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
    runner.start(BASE)  # a new run is startable once the first ended
    release.set()
    assert runner.wait(timeout=30)
