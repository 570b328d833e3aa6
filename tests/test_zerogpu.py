"""Training in ZeroGPU leases, on the CPU: the real `spaces` package off a Space, and a stand-in lease runner.

The stand-in (ruozhi_ui/zerogpu/standin.py) does what ZeroGPU does: each lease is a forked process,
its argument and result pickled, killed at its duration, CUDA "present but forbidden" in the app
process. The claims: off a Space nothing changes; a run split over leases is the run one process
makes (same losses, same weights, one folder); a lease killed mid-run leaves a loadable checkpoint
and says so; Stop inside a lease saves and stops; the app process never touches CUDA.
"""

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ruozhi_ui import worker_protocol
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.data import load_source
from ruozhi_ui.events import (CheckpointSaved, EvalDone, JobFailed, JobFinished, ListSink, RunStarted,
                              SampleGenerated, StepLogged)
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.train import loop
from ruozhi_ui.zerogpu import lease, on_zerogpu, standin
from ruozhi_ui.zerogpu.plan import LeaseCosts, plan_leases, quota_text
from ruozhi_ui.zerogpu.supervisor import refusal_kind, train_in_leases

# one lease holds 3 steps (3 x 20 s x 1.25 + 5 <= 80 s): with 3 steps an epoch, a lease is an epoch
COSTS, LIMIT_S = LeaseCosts(step_s=20, epoch_end_s=0, save_s=0, start_s=0), 80


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """16 sample records (12 train, 4 held out; 3 steps an epoch at batch 4), short answers."""
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    rows = [{"instruction": r.instruction, "output": r.output[:40]} for r in load_source("sample").train[:16]]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def cfg(tiny_data):
    return TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source=tiny_data, val_fraction=0.25,
                                                                       max_target_length=24),
                       lr=1e-3, epochs=3, batch_size=4, probe_prompts=("你好",), probe_max_new_tokens=3,
                       device="cpu", run_name="z")


def in_leases(cfg, root, runner=None, stop_event=None, emit=None):
    sink = ListSink()

    def both(event):
        sink(event)
        if emit:
            emit(event)

    final = train_in_leases(cfg, both, stop_event or threading.Event(), root,
                            runner=runner or standin.StandInLeases(kill_after_s=600), limit_s=LIMIT_S, costs=COSTS)
    return final, sink


@pytest.fixture(scope="module")
def uninterrupted(cfg, tmp_path_factory):
    sink = ListSink()
    final = loop.train(cfg, emit=sink, stop_event=threading.Event(), runs_root=tmp_path_factory.mktemp("one"))
    return final, sink


@pytest.fixture(scope="module")
def three_leases(cfg, tmp_path_factory):
    runner = standin.StandInLeases(kill_after_s=600)
    root = tmp_path_factory.mktemp("leases")
    final, sink = in_leases(cfg, root, runner)
    return final, sink, runner, root


# --- off a Space -------------------------------------------------------------------------------------
def test_off_a_space_the_real_spaces_decorator_returns_the_function_itself():
    import spaces

    from ruozhi_ui.zerogpu import gpu

    assert not on_zerogpu()
    assert gpu.gpu_lease is lease.run_lease
    assert spaces.GPU(duration=lease.lease_duration)(loop.train) is loop.train


# --- the plan and what the visitor is told -----------------------------------------------------------
def test_a_run_that_fits_one_lease_asks_for_its_estimate_with_the_margin():
    plan = plan_leases(582, 194, LeaseCosts(), 120)
    assert [(p.start_step, p.until_step, p.duration_s) for p in plan.leases] == [(0, 582, 82)]


def test_a_longer_run_is_split_into_leases_within_the_limit():
    plan = plan_leases(9, 3, COSTS, LIMIT_S)
    assert [(p.start_step, p.until_step, p.duration_s) for p in plan.leases] == [(0, 3, 80), (3, 6, 80), (6, 9, 80)]


def test_the_visitor_is_told_the_seconds_and_leases_before_start():
    assert quota_text(plan_leases(9, 3, COSTS, LIMIT_S), "en") == (
        "This run uses your ZeroGPU quota: 3 GPU leases, about 240 s in all (at most 80 s each), "
        "each going on from the checkpoint the last one saved")
    assert quota_text(plan_leases(582, 194, LeaseCosts(), 120), "zh") == "这次训练用你的 ZeroGPU 额度：一次 GPU 租用，最多约 82 秒"


def test_the_platforms_errors_are_told_apart_by_their_titles():
    kinds = [refusal_kind(standin.PlatformError(m, t)) for t, m in [
        ("ZeroGPU quota exceeded", "You have exceeded your free ZeroGPU quota (80s requested vs. 10s left)."),
        ("ZeroGPU illegal duration", "The requested GPU duration (900s) is larger than the maximum allowed"),
        ("ZeroGPU queue timeout", "No GPU was available after 60s"),
        ("ZeroGPU worker error", "GPU task aborted"),
        ("ZeroGPU worker error", "RuntimeError")]]
    assert kinds == ["quota", "duration", "queue", "aborted", "error"]


# --- a run through leases ----------------------------------------------------------------------------
def test_three_epochs_over_three_leases_make_the_same_losses_as_one_run(uninterrupted, three_leases):
    _, whole = uninterrupted
    _, leased, runner, _ = three_leases
    assert runner.calls == 3
    assert [e.step for e in leased.of(StepLogged)] == list(range(1, 10))
    assert [e.loss for e in leased.of(StepLogged)] == [e.loss for e in whole.of(StepLogged)]
    assert [e.val_loss for e in leased.of(EvalDone)] == [e.val_loss for e in whole.of(EvalDone)]
    assert [e.answers for e in leased.of(SampleGenerated)] == [e.answers for e in whole.of(SampleGenerated)]


def test_three_leases_end_with_the_same_weights_as_one_run(uninterrupted, three_leases):
    one, leased = load_file(uninterrupted[0] / "model.safetensors"), load_file(three_leases[0] / "model.safetensors")
    assert sorted(one) == sorted(leased)
    assert all(torch.equal(one[k], leased[k]) for k in one)


def test_a_run_through_leases_is_one_run_in_one_folder(three_leases):
    final, sink, _, root = three_leases
    assert [p.name for p in root.iterdir()] == ["z"]  # the leases' control folder is gone too
    assert len(sink.of(RunStarted)) == 1 and [e.status for e in sink.of(JobFinished)] == ["finished"]
    assert [Path(e.path).name for e in sink.of(CheckpointSaved)] == ["epoch-1", "final", "epoch-2", "final", "final"]
    assert final == root / "z" / "checkpoints" / "final"
    metrics = [json.loads(line)["event"] for line in (root / "z" / "metrics.jsonl").read_text().splitlines()]
    assert metrics.count("RunStarted") == 3 and metrics[-1] == "JobFinished"  # each lease's own record, appended


# --- leases that end early ---------------------------------------------------------------------------
def killed_after_first_checkpoint(spec):
    """A lease body that the platform kills right after its first checkpoint (a fork child: patching is local)."""
    write = worker_protocol.EventLines.__call__

    def write_then_die(self, event):
        write(self, event)
        if isinstance(event, CheckpointSaved):
            os.kill(os.getpid(), signal.SIGKILL)

    worker_protocol.EventLines.__call__ = write_then_die
    return lease.run_lease(spec)


def test_a_lease_killed_mid_run_leaves_a_loadable_checkpoint_and_says_what_happened(cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    final, sink = in_leases(cfg, tmp_path, standin.StandInLeases(killed_after_first_checkpoint))
    failed = sink.of(JobFailed)[0]
    assert final is None
    assert failed.error == "The platform ended the GPU lease at its 80 s (at step 3 of 9) before it could save"
    assert failed.last_checkpoint == str(tmp_path / "z" / "checkpoints" / "epoch-1")
    assert failed.hint.startswith(f"The last checkpoint saved, {failed.last_checkpoint}, loads")
    AutoModelForCausalLM.from_pretrained(failed.last_checkpoint)


def never_returns(spec):
    threading.Event().wait()  # nothing sets it: the lease body outlives any duration, as a hung one would


def test_the_stand_in_kills_a_lease_at_its_duration_as_zerogpu_does(tmp_path):
    spec = lease.LeaseSpec(control=str(tmp_path), runs_root=str(tmp_path), config_file="", continue_in="",
                           until_step=1, duration_s=1, reserve_s=0)
    with pytest.raises(standin.PlatformError) as caught:
        standin.StandInLeases(never_returns)(spec)
    assert (caught.value.title, caught.value.message) == ("ZeroGPU worker error", "GPU task aborted")


def test_a_quota_refusal_between_leases_fails_the_run_with_its_checkpoint(cfg, tmp_path):
    first = standin.StandInLeases(kill_after_s=600)

    def quota_after_one(spec):
        if first.calls:
            raise standin.PlatformError("You have exceeded your free ZeroGPU quota (80s requested vs. 3s left).",
                                        "ZeroGPU quota exceeded")
        return first(spec)

    final, sink = in_leases(cfg, tmp_path, quota_after_one)
    failed = sink.of(JobFailed)[0]
    assert final is None
    assert failed.error == ("ZeroGPU quota used up (at step 3 of 9): "
                            "You have exceeded your free ZeroGPU quota (80s requested vs. 3s left).")
    assert failed.last_checkpoint == str(tmp_path / "z" / "checkpoints" / "final")


def test_stop_within_a_lease_saves_and_stops(cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    stop = threading.Event()
    runner = standin.StandInLeases(kill_after_s=600)
    final, sink = in_leases(cfg, tmp_path, runner, stop_event=stop,
                            emit=lambda e: stop.set() if isinstance(e, StepLogged) and e.step == 1 else None)
    last = sink.of(StepLogged)[-1].step
    assert runner.calls == 1 and [e.status for e in sink.of(JobFinished)] == ["stopped"]
    assert json.loads((final / "metrics.json").read_text())["step"] == last < 9
    AutoModelForCausalLM.from_pretrained(final)


# --- the app process ---------------------------------------------------------------------------------
def test_the_app_process_never_initialises_cuda_in_zerogpu_mode(cfg, tmp_path):
    """CUDA looks present in the app process but raises on first use (as `spaces` makes it there); a run
    asking for `device='auto'` still finishes, so it ran in the leases only."""
    runner = JobRunner(tmp_path, train_fn=lambda c, emit, stop, root: train_in_leases(
        c, emit, stop, root, runner=standin.StandInLeases(kill_after_s=600), limit_s=LIMIT_S, costs=COSTS))
    standin.emulate_app_process_cuda()
    try:
        assert torch.cuda.is_available()
        runner.start(dataclasses.replace(cfg, device="auto", epochs=1, probe_prompts=()))
        assert runner.wait(600)
    finally:
        standin.restore_cuda()
    snap = runner.snapshot()
    assert (snap.status, snap.error) == ("finished", "")
    assert snap.started.device == "cpu" and not torch.cuda.is_initialized()


def test_the_train_tabs_estimate_tells_a_zerogpu_visitor_the_quota_it_spends(cfg, monkeypatch):
    import ruozhi_ui.zerogpu as zerogpu
    from ruozhi_ui.ui.train_tab import preflight_markdown

    plain = preflight_markdown(cfg, 12, "en")
    monkeypatch.setattr(zerogpu, "on_zerogpu", lambda: True)
    assert preflight_markdown(cfg, 12, "en") == plain + (
        "\n\nThis run uses your ZeroGPU quota: one GPU lease of up to about 32 s")


# --- Compare and A/B through leases ------------------------------------------------------------------
def test_compare_streams_the_same_answers_through_a_lease(three_leases):
    from ruozhi_ui.config import GenConfig
    from ruozhi_ui.generation import ModelCache, stream_pair
    from ruozhi_ui.zerogpu.compare import PairRequest, pair_duration, stream_pair_in_lease

    final = str(three_leases[0])
    gen = GenConfig(max_new_tokens=6)
    request = PairRequest(base_spec="demo", tuned_path=final, base_trust_remote_code=False,
                          tuned_trust_remote_code=False, message="你好", history_base=(), history_tuned=(("一", "二"),),
                          system_prompt="你是一个有帮助的助手", gen=gen)
    through = list(standin.StandInLeases(stream_pair_in_lease, kill_after_s=600)(request))  # before this
    models = ModelCache()  # process loads any model: a fork must not inherit its decoders' threads and locks
    here = list(stream_pair(models.get("demo"), models.get(final), "你好", (), (("一", "二"),), "你是一个有帮助的助手",
                            gen, threading.Event()))
    assert through == here and through[-1][1]
    assert pair_duration(request) == 21


def test_ab_rows_come_back_the_same_through_a_lease(three_leases):
    from ruozhi_ui.config import GenConfig
    from ruozhi_ui.generation import ModelCache, batch_ab
    from ruozhi_ui.zerogpu.compare import ABRequest, ab_duration, iter_batch_ab_in_lease

    final, prompts = str(three_leases[0]), ("你好", "为什么天是蓝的", "一加一")
    gen = GenConfig(max_new_tokens=5)
    request = ABRequest(base_spec="demo", tuned_path=final, base_trust_remote_code=False, tuned_trust_remote_code=False,
                        prompts=prompts, references=None, system_prompt="", gen=gen)
    rows = list(standin.StandInLeases(iter_batch_ab_in_lease, kill_after_s=600)(request))
    models = ModelCache()
    here = batch_ab(models.get("demo"), models.get(final), list(prompts), None, "", gen)
    assert sorted(rows, key=lambda r: r["index"]) == here
    assert ab_duration(request) == 21


def test_a_job_runs_in_the_context_of_the_request_that_started_it(tmp_path):
    """`spaces` reads the visitor's request from a ContextVar to charge a lease to their quota."""
    import contextvars

    request, seen = contextvars.ContextVar("request"), []
    runner = JobRunner(tmp_path, train_fn=lambda c, emit, stop, root: seen.append(request.get(None)))
    request.set("visitor-1")
    runner.start(TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), device="cpu"))
    assert runner.wait(60)
    assert seen == ["visitor-1"]
