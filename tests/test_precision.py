"""The bf16 optimizer's state survives a checkpoint: moments in fp32, step count, the same next update."""

import copy

import torch

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
