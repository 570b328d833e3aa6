"""How a run splits into ZeroGPU leases, and what the visitor is told before Start. Pure: no torch, no spaces.

A lease costs its start (a fresh process: weights to the GPU, kernels, CUDA-graph captures), its
steps, the epoch ends inside it (validation, probes, the epoch checkpoint) and the checkpoint it
leaves for the next lease. Steps are packed greedily into leases that, with a safety margin, stay
within the platform's longest lease; each lease asks for what its own share needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..i18n import t

SAFETY = 1.25  # a lease asks for 25 % more than its estimate, plus MARGIN_S: a lease cut short costs a re-start
MARGIN_S = 5
# the default 0.5B run on ZeroGPU's H200 slice: 582 steps in ~13 s on a dedicated H200 (benchmarks/RESULTS.md)
REFERENCE_PARAMS, REFERENCE_TOKENS_PER_STEP = 494_032_768, 12 * 214


@dataclass(frozen=True)
class LeaseCosts:
    step_s: float = 0.023  # one optimiser step of the reference run (0.5B, batch 12 x 214 tokens)
    epoch_end_s: float = 8.0  # validation + probes + the epoch checkpoint
    save_s: float = 4.0  # the checkpoint with the training state a lease leaves for the next
    start_s: float = 20.0  # before the first step: process, weights to the GPU, kernel caches, captures


@dataclass(frozen=True)
class Lease:
    start_step: int  # optimiser steps done when it starts
    until_step: int  # it stops (saving) once this many are done; the run's last step ends the run
    duration_s: int  # what it asks the platform for


@dataclass(frozen=True)
class LeasePlan:
    leases: tuple[Lease, ...]
    max_lease_s: int

    @property
    def total_s(self) -> int:
        return sum(lease.duration_s for lease in self.leases)


def costs_for(params_total: int, tokens_per_step: int, base: LeaseCosts = LeaseCosts()) -> LeaseCosts:
    """The reference costs scaled to a model and batch: a step's time grows with parameters x tokens."""
    scale = (params_total / REFERENCE_PARAMS) * (tokens_per_step / REFERENCE_TOKENS_PER_STEP)
    return LeaseCosts(step_s=base.step_s * scale, epoch_end_s=base.epoch_end_s * max(scale, 0.05),
                      save_s=base.save_s * max(params_total / REFERENCE_PARAMS, 0.05), start_s=base.start_s)


def request_s(estimate_s: float, max_lease_s: int) -> int:
    """The seconds a lease asks for: its estimate with the safety margin, never above the platform's most."""
    return min(int(max_lease_s), math.ceil(estimate_s * SAFETY + MARGIN_S))


def plan_leases(num_steps: int, steps_per_epoch: int, costs: LeaseCosts, max_lease_s: int,
                start_step: int = 0) -> LeasePlan:
    """Leases covering steps start_step..num_steps, each as long as fits in `max_lease_s`."""
    leases, step = [], start_step
    while step < num_steps:
        used, until = costs.start_s + costs.save_s, step
        while until < num_steps:
            ends_epoch = (until + 1) % steps_per_epoch == 0 or until + 1 == num_steps
            more = costs.step_s + (costs.epoch_end_s if ends_epoch else 0.0)
            if (used + more) * SAFETY + MARGIN_S > max_lease_s:
                break
            used, until = used + more, until + 1
        if until == step:
            raise ConfigError(key="err.zerogpu.lease_too_short", seconds=max_lease_s,
                              need=math.ceil((used + costs.step_s + costs.epoch_end_s) * SAFETY + MARGIN_S))
        leases.append(Lease(start_step=step, until_step=until, duration_s=request_s(used, max_lease_s)))
        step = until
    return LeasePlan(leases=tuple(leases), max_lease_s=int(max_lease_s))


def quota_text(plan: LeasePlan, lang: str) -> str:
    """What the Train tab says before Start: the run spends the visitor's ZeroGPU quota, how much, in how many leases."""
    if len(plan.leases) == 1:
        return t("zerogpu.plan_one", lang, seconds=plan.total_s)
    return t("zerogpu.plan_many", lang, seconds=plan.total_s, leases=len(plan.leases),
             longest=max(lease.duration_s for lease in plan.leases))


def visitor_plan(cfg, est, n_train: int, max_lease_s: int, lang: str) -> str:
    """The Train tab's line for `cfg` over `n_train` examples, from its pre-flight `Estimate` ("" without steps)."""
    if not est.num_steps:
        return ""
    steps_per_epoch = max(1, math.ceil(n_train / max(1, cfg.batch_size)))
    tokens = cfg.batch_size * (cfg.data.max_source_length + cfg.data.max_target_length + 1)
    return quota_text(plan_leases(est.num_steps, steps_per_epoch, costs_for(est.params_total, tokens),
                                  max_lease_s), lang)
