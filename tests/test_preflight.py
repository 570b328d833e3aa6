"""The pre-flight estimate: steps as the run plans them on any number of GPUs, memory by the run's precision."""

import dataclasses

import pytest

from ruozhi_ui.config import ModelConfig, TrainConfig
from ruozhi_ui.preflight import GIB, estimate, num_steps
from ruozhi_ui.train.step import plan_epoch


@pytest.mark.parametrize("gpus,steps", [(1, 582), (2, 291), (4, 147)])
def test_the_step_count_is_that_of_the_global_batch(gpus, steps):
    # the numbers: 2,327 examples, batch 12 per GPU, 3 epochs
    assert num_steps(2327, 3, 12, gpus=gpus) == steps


@pytest.mark.parametrize("n,gpus", [(183, 2), (13, 3), (25, 4), (7, 1)])
def test_the_step_count_equals_the_run_s_plan(n, gpus):
    cfg = dataclasses.replace(TrainConfig(), batch_size=2, gpus=gpus, epochs=1)
    assert num_steps(n, 1, 2, gpus=gpus) == len(plan_epoch([5] * n, cfg, 0))


def test_a_full_run_on_a_bf16_gpu_counts_bf16_weights_and_gradients(demo_dir):
    cfg = dataclasses.replace(TrainConfig(), model=ModelConfig(spec="demo"))
    est = estimate(cfg, 24, cuda_bf16=True)
    assert est.weights_gib == pytest.approx(2 * est.params_total / GIB)
    assert est.optimizer_gib == pytest.approx(10 * est.params_total / GIB)


def test_several_gpus_keep_fp32_weights(demo_dir):
    cfg = dataclasses.replace(TrainConfig(), model=ModelConfig(spec="demo"), gpus=2)
    assert estimate(cfg, 24, cuda_bf16=True).weights_gib == pytest.approx(4 * estimate(cfg, 24).params_total / GIB)
