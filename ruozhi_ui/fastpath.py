"""CUDA-only speed: each optimiser step of full-parameter SFT is one replayed CUDA graph.

Steps of ~1,700 tokens on a 0.5B model are launch-bound: eager PyTorch spends
longer issuing the step's thousands of kernels than the GPU spends running them.
So the whole step (zero grads, forward, label-only loss, backward, clip, the
AdamWBF16 update) is captured once per length bucket and then replayed. A graph
needs static shapes: each step's length-grouped examples are right-padded to the
next multiple of `BUCKET` (a short last batch gets all-pad rows), and the label
positions are padded to a fixed count with ignored targets. Right padding needs no
attention mask, which lets SDPA use its flash kernel (`use_causal_only_attention`).
An epoch's blocks are built on the CPU once and copied to the GPU in one transfer.
Only the engine uses this, and only on CUDA; the CPU path never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .encoding import IGNORE_INDEX

BUCKET = 16  # padded row lengths are rounded up to this: a dozen graphs, little padding
LOSS_CHUNK = 512  # label positions per LM-head chunk: 512 x 151,936 fp32 logits are 0.3 GB
CAUSAL_ONLY = "ruozhi_causal_sdpa"  # attention implementation name registered below


def bucket_length(num_tokens: int, bucket: int = BUCKET) -> int:
    return -(-num_tokens // bucket) * bucket


def use_causal_only_attention(model) -> None:
    """Run attention with a causal mask alone, so PyTorch's SDPA can take its flash kernel.

    Every batch here is right-padded, so causality alone already keeps each real
    token from seeing a pad (pads come after it), and pad outputs carry no loss.
    transformers would otherwise build an explicit mask while a CUDA graph is being
    captured, which rules the flash kernel out.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_ONLY, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_ONLY, lambda *args, **kwargs: None)
    model.set_attn_implementation(CAUSAL_ONLY)


@dataclass(frozen=True)
class PaddedStep:
    length: int  # padded row length (the bucket)
    offset: int  # where this step's (batch_size x length) block starts in the epoch's flat token buffer
    label_offset: int  # where its label positions start in the flat label buffers
    label_count: int  # real label tokens: the step's loss divides by this
    num_tokens: int  # real (non-pad) tokens, for tokens/s


def pad_step(examples, pad_token_id: int, rows: int, length: int, max_labels: int):
    """A (rows x length) right-padded block as flat lists, plus label positions and targets.

    Missing rows (a short last batch) are all pad with no labels, so every step has
    the same shape. Position (r, t) predicts token t+1 of row r; the flat index of
    a label position is r * (length - 1) + t, i.e. into hidden[:, :-1].reshape(-1, H).
    """
    ids, positions, targets = [], [], []
    for r in range(rows):
        e = examples[r] if r < len(examples) else None
        row_ids = (e.input_ids if e else []) + [pad_token_id] * (length - (len(e) if e else 0))
        ids += row_ids
        if e:
            for t in range(len(e) - 1):
                if e.labels[t + 1] != IGNORE_INDEX:
                    positions.append(r * (length - 1) + t)
                    targets.append(e.labels[t + 1])
    count = len(positions)
    positions += [0] * (max_labels - count)
    targets += [IGNORE_INDEX] * (max_labels - count)
    return ids, positions, targets, count


class CudaGraphStep:
    """Callable like the engine's EagerStep: (batch_no, examples, lr) -> (loss tensor, tokens)."""

    def __init__(self, model, optimizer, cfg, pad_token_id: int, device: torch.device, loss_sum_fn):
        from .precision import set_lr

        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.pad_token_id, self.device, self.set_lr = pad_token_id, device, set_lr
        self.loss_sum_fn = lambda m, batch: loss_sum_fn(m, batch, chunk_size=LOSS_CHUNK)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_labels = cfg.batch_size * (cfg.data.max_target_length + 1)  # the most a step can have
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.pool = None  # one memory pool shared by every bucket's graph
        self.plan: list[PaddedStep] = []
        use_causal_only_attention(model)

    def prepare_epoch(self, train_examples, batches: list[list[int]]) -> None:
        """Pad every step of the epoch to its bucket and put the result on the GPU in one copy."""
        rows = self.cfg.batch_size
        ids, positions, targets, plan = [], [], [], []
        for batch in batches:
            examples = [train_examples[i] for i in batch]
            length = bucket_length(max(len(e) for e in examples))
            block = pad_step(examples, self.pad_token_id, rows, length, self.max_labels)
            plan.append(PaddedStep(length, len(ids), len(positions), block[3], sum(len(e) for e in examples)))
            ids += block[0]
            positions += block[1]
            targets += block[2]
        as_gpu = lambda xs: torch.tensor(xs, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
        self.ids, self.positions, self.targets = map(as_gpu, (ids, positions, targets))
        self.plan = plan

    def _capture(self, length: int):
        """Warm up eagerly on a side stream (lazy inits stay out of the graph), then capture one step."""
        dev = self.device
        static = {
            "input_ids": torch.full((self.cfg.batch_size, length), self.pad_token_id, dtype=torch.long, device=dev),
            "positions": torch.zeros(self.max_labels, dtype=torch.long, device=dev),
            "targets": torch.full((self.max_labels,), IGNORE_INDEX, dtype=torch.long, device=dev),
        }
        label_count = torch.ones((), device=dev)
        for p in self.params:  # grads must exist (not None) before capture: the graph writes into them
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # every target is ignored: the grads stay zero, the weights untouched
                (self.loss_sum_fn(self.model, static) / label_count).backward()
        torch.cuda.current_stream().wait_stream(side)
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
        block = self.cfg.batch_size * step.length
        static["input_ids"].view(-1).copy_(self.ids[step.offset:step.offset + block])
        static["positions"].copy_(self.positions[step.label_offset:step.label_offset + self.max_labels])
        static["targets"].copy_(self.targets[step.label_offset:step.label_offset + self.max_labels])
        static["label_count"].fill_(step.label_count)
        self.set_lr(self.optimizer, lr)
        graph.replay()
        return loss.detach().clone(), step.num_tokens
