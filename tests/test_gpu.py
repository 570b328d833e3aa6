"""The engine's CUDA path (bf16 weights, fused flat AdamW, CUDA-graph steps) on a small random Qwen2.

Skipped without CUDA; run on a GPU machine with `python -m pytest tests/test_gpu.py -q`.
"""

import dataclasses

import pytest
import torch

from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.train import train
from ruozhi_ui.events import ListSink, RunStarted, StepLogged

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), lr=1e-3, probe_prompts=(),
                  run_name="gpu", save_every_epoch=False, save_resume_state=False)


def step_losses(cfg, root) -> tuple[list[float], ListSink]:
    sink = ListSink()
    train(cfg, emit=sink, runs_root=root)
    return [e.loss for e in sink.of(StepLogged)], sink


def test_cuda_training_loss_falls_over_three_epochs(tmp_path):
    losses, sink = step_losses(dataclasses.replace(CFG, epochs=3, device="cuda"), tmp_path)
    assert "bf16" in sink.of(RunStarted)[0].precision
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def test_first_cuda_step_loss_matches_the_fp32_cpu_step_within_bf16_rounding(tmp_path):
    gpu, _ = step_losses(dataclasses.replace(CFG, device="cuda", max_steps=1), tmp_path / "gpu")
    cpu, _ = step_losses(dataclasses.replace(CFG, device="cpu", max_steps=1), tmp_path / "cpu")
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-2)


def test_cuda_graph_and_eager_cuda_steps_learn_alike(tmp_path):
    graphed, _ = step_losses(dataclasses.replace(CFG, device="cuda", max_steps=20), tmp_path / "on")
    eager, _ = step_losses(dataclasses.replace(CFG, device="cuda", max_steps=20, cuda_graphs="off"), tmp_path / "off")
    assert graphed[0] == pytest.approx(eager[0], rel=1e-2)
    assert graphed[-1] == pytest.approx(eager[-1], rel=5e-2)


@pytest.mark.parametrize("layers", ["fused Triton layer kernels", "torch.compile"])
def test_fused_or_compiled_and_plain_graph_steps_learn_alike(tmp_path, monkeypatch, layers):
    """The demo model is a Qwen2, so it gets the fused layers; without them (another architecture) torch.compile."""
    from ruozhi_ui.cuda import graph_step, qwen2_layer, warm_up

    if layers == "torch.compile":
        monkeypatch.setattr(graph_step, "fusable", lambda config: False)
        monkeypatch.setattr(qwen2_layer, "fusable", lambda config: False)
    fast, sink = step_losses(dataclasses.replace(CFG, device="cuda", max_steps=20), tmp_path / "auto")
    assert {"kernels", "layers"} <= set(warm_up.warm_up_seconds)  # the warm-up built (or imported) all it should
    plain, _ = step_losses(dataclasses.replace(CFG, device="cuda", max_steps=20, fast_layers="off"), tmp_path / "off")
    assert layers in sink.of(RunStarted)[0].precision
    assert fast[0] == pytest.approx(plain[0], rel=1e-2)
    assert fast[-1] == pytest.approx(plain[-1], rel=5e-2)


def test_app_jobs_train_on_cuda_in_their_thread_twice_with_background_epoch_checkpoints(tmp_path):
    """As the app runs it: train() in a job thread (compile, capture, background saves, probes), then again."""
    from transformers import AutoModelForCausalLM

    from ruozhi_ui.jobs import JobRunner

    runner = JobRunner(runs_root=tmp_path)
    cfg = dataclasses.replace(CFG, device="cuda", epochs=2, save_every_epoch=True, save_resume_state=True,
                              probe_prompts=("你好",), probe_max_new_tokens=4)
    for name in ("first", "second"):
        runner.start(dataclasses.replace(cfg, run_name=name))
        assert runner.wait(timeout=600)
        snap = runner.snapshot()
        assert snap.status == "finished", snap.error
        assert [(c.epoch, c.final) for c in snap.checkpoints] == [(1, False), (2, True)]
        assert snap.samples and snap.steps[-1].loss < snap.steps[0].loss
        AutoModelForCausalLM.from_pretrained(snap.checkpoints[0].path)


def test_the_flat_optimizer_state_loaded_into_a_new_optimizer_gives_the_same_next_update():
    import copy

    from ruozhi_ui.train.precision import AdamWBF16

    torch.manual_seed(0)
    first = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16)) for n in (1000, 37, 4096)]
    grads = [[torch.randn_like(p) for p in first] for _ in range(4)]
    optimizer = AdamWBF16(first, lr=1e-3, fused_kernel=True)
    for step_grads in grads[:3]:
        for p, g in zip(first, step_grads):
            p.grad.copy_(g)
        optimizer.step()
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = AdamWBF16(second, lr=1e-3, fused_kernel=True)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for opt, params in ((optimizer, first), (resumed, second)):
        for p, g in zip(params, grads[3]):
            p.grad.copy_(g)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # moments, step count and noise all restored
    assert torch.equal(optimizer.exp_avg_sq, resumed.exp_avg_sq) and resumed.step_t.item() == 4


def test_a_stopped_cuda_run_resumes_on_the_uninterrupted_loss_curve(tmp_path):
    import threading

    cfg = dataclasses.replace(CFG, device="cuda", epochs=2, save_resume_state=True, log_every_steps=1)
    whole, _ = step_losses(cfg, tmp_path / "whole")
    stop, first = threading.Event(), ListSink()

    def stop_mid_second_epoch(event):
        first(event)
        if isinstance(event, StepLogged) and event.step == len(whole) // 2 + 1:
            stop.set()

    stopped_at = train(cfg, emit=stop_mid_second_epoch, stop_event=stop, runs_root=tmp_path / "parts")
    rest, _ = step_losses(dataclasses.replace(cfg, resume_from=str(stopped_at), run_name="rest"), tmp_path / "parts")
    got = [e.loss for e in first.of(StepLogged)] + rest
    assert len(first.of(StepLogged)) == len(whole) // 2 + 1 and len(got) == len(whole)
    assert got == pytest.approx(whole, rel=2e-2)


def test_the_triton_head_kernel_gives_the_torch_head_chunk_loss_and_gradient():
    """Same cross-entropy and scale * (softmax - one_hot) as the plain-torch chunk, ignored targets zeroed."""
    from ruozhi_ui.encoding import IGNORE_INDEX
    from ruozhi_ui.cuda.head_loss import fused_head_chunk, head_chunk_loss_and_dlogits

    torch.manual_seed(0)
    for vocab in (151936, 1003):  # Qwen2.5's (a multiple of 16) and an odd one
        h = torch.randn(70, 64, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(vocab, 64, device="cuda", dtype=torch.bfloat16) * 0.2
        y = torch.randint(0, vocab, (70,), device="cuda")
        y[[3, 41]] = IGNORE_INDEX
        scale = torch.tensor(1 / 68, device="cuda")
        loss, d_logits = fused_head_chunk(h, y, weight, scale)
        expected_loss, expected = head_chunk_loss_and_dlogits(h, y, weight, scale)
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)
        torch.testing.assert_close(d_logits.float(), expected.float(), rtol=1e-2, atol=1e-6)
        assert d_logits[3].abs().max() == 0 and d_logits[41].abs().max() == 0
