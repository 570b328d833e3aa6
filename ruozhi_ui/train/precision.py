"""Precision and optimizer choice per device, and the one bf16 AdamW that is safe to use.

CPU: fp32 weights, torch AdamW. CUDA with bf16: LoRA trains a few million parameters,
so fp32 weights with bf16 autocast cost nothing; full-parameter training keeps the
weights in bf16 and updates them with `AdamWBF16`, whose moments are fp32 and whose
weight update is stochastically rounded, so small updates are not lost to bf16's 8-bit
mantissa (plain bf16 AdamW stalls). That halves weight and gradient memory: Qwen2.5-0.5B
full SFT fits well under 8 GB.
"""

from __future__ import annotations

import contextlib
import importlib.util
import resource
import sys
from dataclasses import dataclass

import torch

from ..config import TrainConfig


@dataclass(frozen=True)
class Precision:
    device: torch.device
    weight_dtype: torch.dtype  # dtype the model's weights are stored in
    autocast_dtype: torch.dtype | None  # None: no autocast
    stochastic_bf16_optimizer: bool
    code: str  # "fp32" | "bf16" (bf16 weights, stochastic rounding) | "bf16-autocast": the page words it
    description: str  # the same in technical words, for the CLI and logs
    device_name: str

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def peak_memory_gib(self) -> float:
        """Peak GPU memory on CUDA; on the CPU the process's peak resident memory (RAM)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return peak / (2**30 if sys.platform == "darwin" else 2**20)


def choose_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        name = f"cuda ({torch.cuda.get_device_name(device)})"
        if cfg.method == "full" and cfg.gpus == 1:  # several GPUs: fp32 weights under DDP/FSDP2, bf16 compute
            return Precision(device, torch.bfloat16, None, True, "bf16",
                             "bf16 weights, fp32 AdamW moments, stochastic rounding", name)
        return Precision(device, torch.float32, torch.bfloat16, False, "bf16-autocast",
                         "bf16 autocast, fp32 weights", name)
    if device.type == "cuda":
        return Precision(device, torch.float32, None, False, "fp32", "fp32",
                         f"cuda ({torch.cuda.get_device_name(device)})")
    return Precision(device, torch.float32, None, False, "fp32", "fp32", "cpu")


def triton_available() -> bool:
    """The fused kernels and torch.compile's GPU backend are Triton; without it they stay off."""
    return importlib.util.find_spec("triton") is not None


def liger_available() -> bool:
    """Liger-Kernel is installed only on Linux (requirements.txt's marker): without it the fused layer's
    RMSNorm and rotary embedding run as plain torch, on CUDA too."""
    return importlib.util.find_spec("liger_kernel") is not None


def make_optimizer(model, cfg: TrainConfig, prec: Precision) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if prec.stochastic_bf16_optimizer:
        return AdamWBF16(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         fused_kernel=prec.device.type == "cuda" and triton_available())
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
    """AdamW for bf16 weights: fp32 moments, the update computed in fp32 and stochastically rounded.

    The parameters become views into one flat bf16 buffer, their grads views into one flat grad
    buffer, and the moments two flat fp32 buffers. On CUDA with Triton one fused kernel updates
    everything (`cuda/kernels/adamw_bf16.py`: each value read and written once, ~22 bytes a weight);
    elsewhere the same update runs as torch ops over slices of the flat buffers, so the fp32
    temporaries stay small (the 136 M-entry embedding of Qwen2.5-0.5B would need ~2 GB at once).
    Sync-free either way, so a CUDA graph can capture it: learning rate and step count live in
    device tensors (`set_lr` updates the former). zero_grad zeroes in place: the grads keep their
    addresses, which captured graphs rely on.
    """

    SLICE = 1 << 24  # elements per torch-path update slice (64 MB of fp32 scratch per temporary)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused_kernel=False):
        params = list(params)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if len(self.param_groups) != 1 or len({p.dtype for p in params}) != 1:
            raise ValueError("AdamWBF16 takes one parameter group of one dtype")
        device = params[0].device
        self.fused_kernel = fused_kernel
        self.lr_t = torch.tensor(float(lr), device=device)
        self.step_t = torch.zeros((), device=device)
        total = sum(p.numel() for p in params)
        self.flat = torch.empty(total, dtype=params[0].dtype, device=device)
        self.flat_grad = torch.zeros(total, dtype=params[0].dtype, device=device)
        self.exp_avg = torch.zeros(total, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(total, dtype=torch.float32, device=device)
        self.slices = []
        offset = 0
        for p in params:  # allocate state now, never inside a captured step
            n = p.numel()
            self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + n].view_as(p)  # the old storage is freed
            p.grad = self.flat_grad[offset:offset + n].view_as(p)
            self.state[p] = {"exp_avg": self.exp_avg[offset:offset + n].view_as(p),
                             "exp_avg_sq": self.exp_avg_sq[offset:offset + n].view_as(p)}
            self.slices.append((p, offset, n))
            offset += n
        if fused_kernel:
            from ..cuda.warm_up import build_kernels, wait_for_warm_up

            wait_for_warm_up()
            build_kernels(device, self.flat.dtype)  # now, never inside a graph capture

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flat_grad.zero_()  # never None: views and captured graphs keep these addresses

    def _gather_grads(self) -> None:
        """A grad assigned from outside (not accumulated by backward) is copied into the flat buffer."""
        for p, offset, n in self.slices:
            view = self.flat_grad[offset:offset + n]
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad.reshape(-1))
                p.grad = view.view_as(p)

    def state_dict(self):
        blob = super().state_dict()
        blob["step_t"] = self.step_t.detach().cpu()
        return blob

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        step = state_dict.pop("step_t", None)
        saved = state_dict["state"]
        super().load_state_dict(state_dict)  # casts every state tensor to its weight's dtype: bf16
        for index, (p, offset, n) in enumerate(self.slices):  # so the moments are taken as saved, in fp32
            for name, flat in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                flat[offset:offset + n].copy_(saved[index][name].reshape(-1).to(flat.device, torch.float32))
                self.state[p][name] = flat[offset:offset + n].view_as(p)
        if step is None and saved:  # saved by torch's AdamW (a run on several GPUs): one count per parameter
            step = next(iter(saved.values())).get("step")
        if step is not None:
            self.step_t.copy_(step)

    @torch.no_grad()
    def step(self, closure=None):
        self._gather_grads()
        self.step_t += 1
        group = self.param_groups[0]
        if self.fused_kernel:
            from ..cuda.kernels import adamw_bf16

            adamw_bf16.step(self.flat, self.flat_grad, self.exp_avg, self.exp_avg_sq, self.lr_t, self.step_t,
                            group["betas"], group["eps"], group["weight_decay"])
            return None
        beta1, beta2 = group["betas"]
        step_size = self.lr_t / (1 - beta1 ** self.step_t)  # () tensors: no host sync
        bias2_sqrt = (1 - beta2 ** self.step_t).sqrt()
        decay = 1 - self.lr_t * group["weight_decay"]
        for start in range(0, self.flat.numel(), self.SLICE):
            w, g, m, v = (t[start:start + self.SLICE] for t in (self.flat, self.flat_grad, self.exp_avg,
                                                                  self.exp_avg_sq))
            g32 = g.float()
            m.lerp_(g32, 1 - beta1)
            v.mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(group["eps"])
            w32 = w.float().mul_(decay).sub_(m / denom * step_size)
            w.copy_(stochastic_round_to_bf16(w32))
        return None
