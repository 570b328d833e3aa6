"""Precision and optimizer choice per device, and the bf16 AdamW that is safe to use.

CPU: fp32 weights, torch AdamW. CUDA with bf16: LoRA trains a few million
parameters, so fp32 weights with bf16 autocast cost nothing; full-parameter
training keeps the weights in bf16 and updates them with `AdamWBF16`, whose
moments are fp32 and whose weight update is stochastically rounded, so small
updates are not lost to bf16's 8-bit mantissa (plain bf16 AdamW stalls). That
halves weight and gradient memory: Qwen2.5-0.5B full SFT fits well under 8 GB.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .config import TrainConfig


@dataclass(frozen=True)
class Precision:
    device: torch.device
    weight_dtype: torch.dtype  # dtype the model's weights are stored in
    autocast_dtype: torch.dtype | None  # None: no autocast
    stochastic_bf16_optimizer: bool
    description: str
    device_name: str

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def peak_memory_gib(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def wrap_step(self, model, loss_sum_fn: Callable) -> Callable:
        """step_fn(micro_batches, label_count) -> mean loss of the step (a detached device tensor).

        Each micro-batch's summed loss is divided by the label count of the whole
        optimiser step before backward, so gradients are those of one big batch's
        mean over label tokens, however the step is split.
        """
        def step_fn(micro: list[dict], label_count: int) -> torch.Tensor:
            total = None
            for mb in micro:
                with self.autocast():
                    loss = loss_sum_fn(model, mb) / label_count
                loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
            return total
        return step_fn


def choose_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        name = f"cuda ({torch.cuda.get_device_name(device)})"
        if cfg.method == "full":
            return Precision(device, torch.bfloat16, None, True,
                             "bf16 weights, fp32 AdamW moments, stochastic rounding", name)
        return Precision(device, torch.float32, torch.bfloat16, False, "bf16 autocast, fp32 weights", name)
    if device.type == "cuda":
        return Precision(device, torch.float32, None, False, "fp32", f"cuda ({torch.cuda.get_device_name(device)})")
    return Precision(device, torch.float32, None, False, "fp32", "cpu")


def make_optimizer(model, cfg: TrainConfig, prec: Precision) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if prec.stochastic_bf16_optimizer:
        if prec.device.type == "cuda":
            from .fastpath import FlatAdamWBF16, triton_available

            if triton_available():  # one fused kernel instead of thousands of small ones
                return FlatAdamWBF16(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return AdamWBF16(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused = prec.device.type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate for the next step (also on the GPU copy a captured graph reads)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, AdamWBF16):
        optimizer.lr_t.fill_(lr)


def stochastic_round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased)."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits are zero: exact cast


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 weights: fp32 moments, update computed in fp32, stochastically rounded.

    Sync-free, so a CUDA graph can capture it: the learning rate and the step count
    live in device tensors (`set_lr` updates the former). Big tensors are updated in
    slices so the fp32 temporaries stay small: the 136 M-entry embedding of
    Qwen2.5-0.5B would otherwise need ~2 GB of scratch at once.
    """

    SLICE = 1 << 24  # elements per update slice (64 MB of fp32 scratch per temporary)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        device = self.param_groups[0]["params"][0].device
        self.lr_t = torch.tensor(float(lr), device=device)
        self.step_t = torch.zeros((), device=device)
        for group in self.param_groups:  # allocate state now, never inside a captured step
            for p in group["params"]:
                self.state[p] = {"exp_avg": torch.zeros_like(p, dtype=torch.float32),
                                 "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}

    def state_dict(self):
        blob = super().state_dict()
        blob["step_t"] = self.step_t.detach().cpu()
        return blob

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        step = state_dict.pop("step_t", None)
        saved = state_dict["state"]
        super().load_state_dict(state_dict)  # casts every state tensor to its weight's dtype: bf16
        params = [p for group in self.param_groups for p in group["params"]]
        for index, moments in saved.items():  # the moments stay fp32, as saved
            for name in ("exp_avg", "exp_avg_sq"):
                self.state[params[index]][name] = moments[name].to(params[index].device, torch.float32)
        if step is not None:
            self.step_t.copy_(step)

    @torch.no_grad()
    def step(self, closure=None):
        self.step_t += 1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            step_size = self.lr_t / (1 - beta1 ** self.step_t)  # () tensors: no host sync
            bias2_sqrt = (1 - beta2 ** self.step_t).sqrt()
            decay = 1 - self.lr_t * group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                flat = [t.view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, p.numel(), self.SLICE):
                    w, g, m, v = (t[start:start + self.SLICE] for t in flat)
                    g32 = g.float()
                    m.lerp_(g32, 1 - beta1)
                    v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
                    denom = (v.sqrt() / bias2_sqrt).add_(group["eps"])
                    w32 = w.float().mul_(decay).sub_(m / denom * step_size)
                    w.copy_(stochastic_round_to_bf16(w32))
        return None
