"""One optimiser step: the `Stepper` protocol, the plain eager step, and which stepper a run gets.

A stepper is called as `(batch_no, examples, lr) -> (mean loss of the step as a device tensor,
input tokens)` and owns forward, backward, clipping and the optimizer update. The eager step
here is the plain PyTorch way, gradient accumulation included: each micro-batch's summed loss is
divided by the label count of the whole step before backward, so gradients are those of one big
batch's mean over label tokens, however the step is split. How many micro-batches a step has is
planned from the global batch (`micro_batch_count`), so every rank of a run on several runs as many.
On CUDA, full-parameter bf16 steps
replay as CUDA graphs (`cuda/graph_step.py`), which has the same call shape.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from ..config import TrainConfig
from ..encoding import IGNORE_INDEX, collate_packed, collate_padded, length_grouped_batches
from .loss import batch_loss_sum, label_positions
from .precision import Precision, set_lr, triton_available


class Stepper(Protocol):
    code: str  # "eager" | "graphs" | "graphs+fused" | "graphs+compile"
    description: str  # the same in technical words

    def prepare_epoch(self, train_examples, batches: list[list[int]]) -> None: ...

    def __call__(self, batch_no: int, examples, lr: float) -> tuple[torch.Tensor, int]: ...


def global_batch_size(cfg: TrainConfig) -> int:
    """Examples per optimiser step over all processes: each of `gpus` ranks takes `batch_size`."""
    return cfg.batch_size * cfg.gpus


def lr_at(step: int, cfg: TrainConfig, num_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based) of `num_steps`."""
    # 1) linear warmup from lr/warmup to lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    # 2) constant (the reference) stays at lr
    if cfg.lr_schedule == "constant":
        return cfg.lr
    # 3) cosine from lr at the first step after warmup down to exactly 10% of lr at the last step
    progress = (step - cfg.warmup_steps) / max(1, num_steps - 1 - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def plan_epoch(lengths: list[int], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The epoch's global batches: a pure function of (seed, epoch), so a resumed run replays it exactly.
    With several ranks, each global batch is split between them; one smaller than the number of ranks (an
    epoch's last, at most) is left out, so that every rank has examples at every step."""
    batches = length_grouped_batches(lengths, global_batch_size(cfg), seed=cfg.seed * 1000 + epoch)
    return [b for b in batches if len(b) >= cfg.gpus]


def micro_batch_count(n_global: int, cfg: TrainConfig) -> int:
    """Micro-batches every rank runs in a step of `n_global` examples: a function of the global batch only, so
    it is the same on every rank (DDP's gradient sync after the last micro-batch waits for all of them), and
    never more than the smallest rank's share (each micro-batch has an example on every rank)."""
    return max(1, min(cfg.grad_accum_steps, n_global // cfg.gpus))


def micro_batch_sizes(n_mine: int, n_global: int, cfg: TrainConfig) -> list[int]:
    """This rank's `n_mine` examples in `micro_batch_count` near-equal micro-batches (sizes differ by one at most)."""
    base, extra = divmod(n_mine, micro_batch_count(n_global, cfg))
    return [base + (i < extra) for i in range(micro_batch_count(n_global, cfg))]


def label_count(examples) -> int:
    """Positions whose next token is labelled (as `label_positions` counts them after collating)."""
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples)


def make_micro_batches(examples, sizes: list[int], cfg: TrainConfig, pad_token_id: int,
                       device: torch.device) -> list[dict]:
    """One step's examples cut into micro-batches of `sizes`, collated and on `device`."""
    micro, start = [], 0
    for size in sizes:
        group = examples[start:start + size]
        start += size
        batch = collate_packed(group) if cfg.packing else collate_padded(group, pad_token_id)
        batch["positions"], batch["targets"] = label_positions(batch.pop("labels"))
        batch["num_tokens"] = sum(len(e) for e in group)
        micro.append({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()})
    return micro


class EagerStep:
    """Forward/backward per micro-batch (the loss divided by the step's label count), clip, update, zero."""

    code, description = "eager", "eager steps"

    def __init__(self, model, optimizer, cfg: TrainConfig, prec: Precision, pad_token_id: int):
        self.model, self.optimizer, self.cfg, self.prec, self.pad_token_id = model, optimizer, cfg, prec, pad_token_id

    def prepare_epoch(self, train_examples, batches) -> None:
        pass  # batches are collated step by step

    def __call__(self, batch_no: int, examples, lr: float) -> tuple[torch.Tensor, int]:
        set_lr(self.optimizer, lr)
        labels, num_tokens, n_global = self.step_counts(label_count(examples), sum(len(e) for e in examples),
                                                        len(examples))
        micro = make_micro_batches(examples, micro_batch_sizes(len(examples), n_global, self.cfg), self.cfg,
                                   self.pad_token_id, self.prec.device)
        total = torch.zeros((), device=self.prec.device)
        for i, mb in enumerate(micro):
            with self.prec.autocast():
                loss = batch_loss_sum(self.model, mb) / labels
            self.backward(loss, last=i == len(micro) - 1)
            total += loss.detach()
        if self.cfg.max_grad_norm > 0:
            self.clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.reduce_loss(total), num_tokens

    # One process: the step's own counts and gradients. A distributed run overrides these four
    # (train/distributed.py: counts and the loss summed over ranks, gradient sync on the last micro-batch).
    def step_counts(self, labels: int, num_tokens: int, n_examples: int) -> tuple[float, int, int]:
        """(label count, input tokens, examples) of the whole step: the loss's divisor, the speed's tokens, and
        what the micro-batch plan is made from."""
        return labels, num_tokens, n_examples

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def reduce_loss(self, total: torch.Tensor) -> torch.Tensor:
        return total

    def clip(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)


def graphs_unusable(cfg: TrainConfig, prec: Precision) -> str:
    """'' when the run can replay its steps as CUDA graphs, else why not (the fix is in the words)."""
    if cfg.gpus > 1:
        return "CUDA graphs run on one GPU; a run on several takes eager steps"
    if prec.device.type != "cuda":
        return "CUDA graphs need a CUDA GPU"
    if not prec.stochastic_bf16_optimizer:
        return "CUDA graphs run full-parameter training in bf16 only (not LoRA, not a GPU without bf16)"
    if cfg.grad_accum_steps != 1:
        return "CUDA graphs need grad_accum_steps 1 (raise the batch size instead)"
    if cfg.packing:
        return "CUDA graphs pad rows to length buckets and do not pack (turn packing off)"
    return ""


def choose_stepper(model, optimizer, cfg: TrainConfig, prec: Precision, pad_token_id: int, on_fallback):
    """CUDA graphs where they can run (setup has refused cuda_graphs='on' where they cannot), else eager."""
    if cfg.cuda_graphs == "off" or graphs_unusable(cfg, prec):
        return EagerStep(model, optimizer, cfg, prec, pad_token_id)
    from ..cuda.graph_step import CudaGraphStep

    return CudaGraphStep(model, optimizer, cfg, pad_token_id, prec.device, uses_fast_layers(cfg), on_fallback)


def uses_fast_layers(cfg: TrainConfig) -> bool:
    """Inside the CUDA graphs, decoder layers with fused kernels (Qwen2) or compiled (others): both need Triton."""
    return cfg.fast_layers == "auto" and triton_available()
