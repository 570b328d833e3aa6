"""The bf16 optimizer: its state survives a checkpoint, and it follows torch.optim.AdamW in fp32 (the reference)."""

import copy

import pytest
import torch

from ruozhi_ui.capabilities import triton_available
from ruozhi_ui.train.precision import AdamWBF16


def test_adamw_bf16_state_loaded_into_a_new_optimizer_keeps_fp32_moments_and_gives_the_same_next_update():
    torch.manual_seed(0)
    first = [torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16)) for n in (300, 7)]
    grads = [[torch.randn_like(p) for p in first] for _ in range(4)]
    optimizer = AdamWBF16(first, lr=1e-3)
    for step_grads in grads[:3]:
        for p, g in zip(first, step_grads):
            p.grad = g.clone()
        optimizer.step()
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = AdamWBF16(second, lr=1e-3)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert all(resumed.state[p]["exp_avg"].dtype == torch.float32 for p in second)  # not cast to the weights' bf16
    for opt, params in ((optimizer, first), (resumed, second)):
        for p, g in zip(params, grads[3]):
            p.grad = g.clone()
        torch.manual_seed(1)  # the same stochastic-rounding noise for both
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert resumed.step_t.item() == optimizer.step_t.item() == 4


# ---------------------------------------------------------------- against torch.optim.AdamW (fp32) as the reference

STEPS, LR, WEIGHT_DECAY = 8, 1e-3, 0.01
# AdamWBF16 computes its bias corrections in fp32 on the device (no host sync, so a CUDA graph can capture
# the step): 1 - 0.999 in fp32 is off by 1.3e-5 relative, so its update differs from torch's (Python floats)
# by up to ~1e-5 of the update. That only shows where the new weight is far smaller than the update (it
# landed next to 0), where a bf16 step is tiny.
UPDATE_RTOL = 2e-5


def bf16_step(x: torch.Tensor) -> torch.Tensor:
    """The gap between neighbouring bf16 values around each x (8 significant bits)."""
    _, exponent = torch.frexp(x)  # x = m * 2**exponent, 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(x), exponent - 8)


def _run_against_reference(device: str, fused_kernel: bool):
    """AdamWBF16 on bf16 weights beside torch's AdamW on fp32 copies, fed the same gradients. Before each step
    the reference takes our weights (its moments depend on the gradients only), so each step compares one
    update. Weights of the size a LLM's are (std 0.02), so an update of LR is several bf16 steps.
    Returns (the largest |ours - reference| / what is allowed, over all steps and weights; the optimizers and
    their parameters)."""
    torch.manual_seed(0)
    shapes = [(64, 33), (5,)]
    ours = [torch.nn.Parameter((0.02 * torch.randn(s, device=device)).to(torch.bfloat16)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in ours]
    grads = [[torch.randn(s, device=device).to(torch.bfloat16) for s in shapes] for _ in range(STEPS)]
    mine = AdamWBF16(ours, lr=LR, weight_decay=WEIGHT_DECAY, fused_kernel=fused_kernel)
    theirs = torch.optim.AdamW(ref, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    worst = 0.0
    for step_grads in grads:
        before = []
        for p, q, g in zip(ours, ref, step_grads):
            q.data.copy_(p.detach().float())
            before.append(q.detach().clone())
            p.grad, q.grad = g.clone(), g.float()
        mine.step()
        theirs.step()
        for p, q, w in zip(ours, ref, before):
            q = q.detach()
            allowed = bf16_step(q) + UPDATE_RTOL * (q - w).abs()
            worst = max(worst, ((p.detach().float() - q).abs() / allowed).max().item())
    return worst, mine, theirs, ours, ref


def _assert_matches_reference(worst, mine, theirs, ours, ref, moments_rtol=1e-6):
    for p, q in zip(ours, ref):
        # the moments see the same fp32 gradients through the same formulas: equal to fp32 rounding (a few ulp
        # in the Triton kernel, whose multiply-adds are fused: 7e-8 at most on an H100, `moments_rtol` of the largest)
        for name in ("exp_avg", "exp_avg_sq"):
            want = theirs.state[q][name]
            atol = 1e-9 if moments_rtol == 1e-6 else moments_rtol * want.abs().max().item()
            torch.testing.assert_close(mine.state[p][name], want, rtol=moments_rtol, atol=atol)
    # a step's fp32 result is rounded to one of its two bf16 neighbours (stochastically), so it lies less
    # than one bf16 step (plus UPDATE_RTOL of the update) from the reference's fp32 weight
    assert worst < 1.0


def test_adamw_bf16_matches_torch_adamw_in_fp32_on_the_cpu_within_bf16_rounding():
    _assert_matches_reference(*_run_against_reference("cpu", fused_kernel=False))


def test_adamw_bf16_rounding_errors_average_out_where_round_to_nearest_would_stall():
    # 1.0 in bf16 has neighbours 1 - 2^-8 and 1 + 2^-7: an update of 1e-4 rounded to nearest is lost for good
    ours = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    ref = torch.nn.Parameter(torch.ones(100_000))
    mine = AdamWBF16([ours], lr=1e-4, weight_decay=0.0)
    theirs = torch.optim.AdamW([ref], lr=1e-4, weight_decay=0.0)
    torch.manual_seed(0)
    for _ in range(20):
        ours.grad, ref.grad = torch.ones_like(ours), torch.ones_like(ref)
        mine.step()
        theirs.step()
    moved_ref = 1 - ref.detach().mean().item()  # 20 steps of ~1e-4
    moved_ours = 1 - ours.detach().float().mean().item()
    assert abs(moved_ours - moved_ref) < 0.05 * moved_ref  # unbiased: the mean follows the fp32 reference


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="the Triton kernel needs a CUDA GPU")
def test_adamw_bf16_triton_kernel_matches_torch_adamw_in_fp32_within_bf16_rounding():
    _assert_matches_reference(*_run_against_reference("cuda", fused_kernel=True), moments_rtol=1e-5)


def test_set_lr_also_sets_the_device_copy_of_the_lr_that_a_captured_step_reads():
    from ruozhi_ui.anatomy import set_lr

    optimizer = AdamWBF16([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], lr=1e-3)
    set_lr(optimizer, 2.5e-4)
    assert optimizer.param_groups[0]["lr"] == 2.5e-4 and optimizer.lr_t.item() == torch.tensor(2.5e-4).item()


def test_set_lr_sets_a_torch_optimizer_s_groups():
    from ruozhi_ui.anatomy import set_lr

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))], lr=1e-3)
    set_lr(optimizer, 2.5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [2.5e-4]
