"""CUDA-only speed: each optimiser step of full-parameter SFT is one replayed CUDA graph.

Steps of ~1,700 tokens on a 0.5B model are launch-bound: eager PyTorch spends
longer issuing the step's thousands of kernels than the GPU spends running them.
So the whole step (zero grads, forward, label-only loss, backward, clip, the
AdamWBF16 update) is captured once per length bucket and then replayed. A graph
needs static shapes, so each step's examples are packed into one row with
position_ids restarting per example (no example sees another: the loss equals the
padded loss, see tests/test_encoding.py) and padded to the next multiple of
`BUCKET`; the label positions are padded to a fixed count with ignored targets.
An epoch's rows are packed on the CPU once and copied to the GPU in one transfer.
Only the engine uses this, and only on CUDA; the CPU path never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoding import IGNORE_INDEX

BUCKET = 128  # row lengths are rounded up to this: a few graphs, little padding


def bucket_length(num_tokens: int, bucket: int = BUCKET) -> int:
    return -(-num_tokens // bucket) * bucket


@dataclass(frozen=True)
class PackedStep:
    length: int  # padded row length (the bucket)
    offset: int  # where this step's row starts in the epoch's flat token buffers
    label_offset: int  # where its label positions start in the flat label buffers
    label_count: int  # real label tokens: the step's loss divides by this
    num_tokens: int  # real (non-pad) tokens, for tokens/s


def pack_step(examples, pad_token_id: int, length: int, max_labels: int):
    """One packed, padded row: (input_ids, position_ids, label positions, targets) as lists.

    Position t predicts token t+1, so a label position is t where labels[t+1] is
    trained; the pad tail is its own segment (positions restart) with no labels.
    """
    ids, pos, labels = [], [], []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
        pos += range(len(e))
    pad = length - len(ids)
    ids += [pad_token_id] * pad
    labels += [IGNORE_INDEX] * pad
    pos += range(pad)
    positions = [t for t in range(length - 1) if labels[t + 1] != IGNORE_INDEX]
    targets = [labels[t + 1] for t in positions]
    count = len(positions)
    positions += [0] * (max_labels - count)
    targets += [IGNORE_INDEX] * (max_labels - count)
    return ids, pos, positions, targets, count


class CudaGraphStep:
    """Callable like the engine's EagerStep: (batch_no, examples, lr) -> (loss tensor, tokens)."""

    def __init__(self, model, optimizer, cfg, pad_token_id: int, device: torch.device, loss_sum_fn):
        from .precision import set_lr

        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.pad_token_id, self.device, self.loss_sum_fn, self.set_lr = pad_token_id, device, loss_sum_fn, set_lr
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_labels = cfg.batch_size * (cfg.data.max_target_length + 1)  # the most a step can have
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.pool = None  # one memory pool shared by every bucket's graph
        self.plan: list[PackedStep] = []

    def prepare_epoch(self, train_examples, batches: list[list[int]]) -> None:
        """Pack every step of the epoch and put the result on the GPU in one copy."""
        ids, pos, positions, targets, plan = [], [], [], [], []
        for batch in batches:
            examples = [train_examples[i] for i in batch]
            n = sum(len(e) for e in examples)
            length = bucket_length(n)
            row = pack_step(examples, self.pad_token_id, length, self.max_labels)
            plan.append(PackedStep(length, len(ids), len(positions), row[4], n))
            ids += row[0]
            pos += row[1]
            positions += row[2]
            targets += row[3]
        as_gpu = lambda xs: torch.tensor(xs, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        self.ids, self.pos, self.positions, self.targets = map(as_gpu, (ids, pos, positions, targets))
        self.plan = plan

    def _capture(self, length: int):
        """Warm up eagerly on a side stream (lazy inits stay out of the graph), then capture one step."""
        dev = self.device
        static = {
            "input_ids": torch.full((1, length), self.pad_token_id, dtype=torch.long, device=dev),
            "position_ids": torch.arange(length, device=dev).unsqueeze(0),
            "positions": torch.zeros(self.max_labels, dtype=torch.long, device=dev),
            "targets": torch.full((self.max_labels,), IGNORE_INDEX, dtype=torch.long, device=dev),
        }
        label_count = torch.ones((), device=dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # every target is ignored: the grads stay zero, the weights untouched
                (self.loss_sum_fn(self.model, static) / label_count).backward()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:  # grads must exist (not None) before capture: the graph writes into them
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            torch._foreach_zero_([p.grad for p in self.params])
            loss = self.loss_sum_fn(self.model, static) / label_count
            loss.backward()
            if self.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
            self.optimizer.step()
        self.pool = graph.pool()
        static["label_count"] = label_count
        self.graphs[length] = (graph, static, loss)

    def __call__(self, batch_no: int, examples, lr: float) -> tuple[torch.Tensor, int]:
        step = self.plan[batch_no]
        if step.length not in self.graphs:
            self._capture(step.length)
        graph, static, loss = self.graphs[step.length]
        static["input_ids"][0].copy_(self.ids[step.offset:step.offset + step.length])
        static["position_ids"][0].copy_(self.pos[step.offset:step.offset + step.length])
        static["positions"].copy_(self.positions[step.label_offset:step.label_offset + self.max_labels])
        static["targets"].copy_(self.targets[step.label_offset:step.label_offset + self.max_labels])
        static["label_count"].fill_(step.label_count)
        self.set_lr(self.optimizer, lr)
        graph.replay()
        return loss.detach().clone(), step.num_tokens
