"""CUDA-only speed: each optimiser step of full-parameter SFT is one replayed CUDA graph.

Steps of ~1,700 tokens on a 0.5B model are launch-bound: eager PyTorch spends longer
issuing the step's thousands of kernels than the GPU spends running them. So the whole
step (zero grads, forward, label-only loss, backward, clip, the AdamWBF16 update) is
captured once per length bucket and then replayed. A graph needs static shapes: each
step's length-grouped examples are right-padded to the next multiple of `BUCKET` (a short
last batch gets all-pad rows), and the label positions are padded to a per-bucket count
with ignored targets. Right padding needs no attention mask, which lets SDPA use its flash
kernel (`layers.use_causal_only_attention`). An epoch's blocks are built on the CPU once
and copied to the GPU in one transfer. Inside the graph the layers run fused (Qwen2) or
compiled (others) forwards (`layers.py`), and the LM head's loss and gradients come from
`head_loss.py`. Blocks longer than `TOKEN_BUDGET` tokens run as two halves within the
step, which bounds the peak memory.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from ..anatomy import set_lr
from ..capabilities import CAPTURE_LOCK, triton_available
from ..encoding import IGNORE_INDEX
from .head_loss import LOSS_CHUNK, fused_head_chunk, head_chunk_loss_and_dlogits, step_loss_and_backward
from .layers import compiled_layers, fused_layers, use_causal_only_attention
from .qwen2_layer import fusable
from .warm_up import wait_for_warm_up

BUCKET = 16  # padded row lengths are rounded up to this: a dozen graphs, little padding
TOKEN_BUDGET = 2112  # rows x length per forward/backward; longer blocks are split (peak activation memory)


def bucket_length(num_tokens: int, bucket: int = BUCKET) -> int:
    return -(-num_tokens // bucket) * bucket


@dataclass(frozen=True)
class BlockShape:
    """What a captured graph is specialised to."""
    length: int  # padded row length (the bucket)
    micro_rows: int  # rows per forward/backward
    micro_batches: int  # forward/backwards in the step (more than one for long blocks)
    label_slots: int  # label positions per micro-batch, padded with ignored targets


@dataclass(frozen=True)
class PaddedStep:
    shape: BlockShape
    offset: int  # where this step's block starts in the epoch's flat token buffer
    label_offset: int  # where its label positions start in the flat label buffers
    label_count: int  # real label tokens: the step's loss divides by this
    num_tokens: int  # real (non-pad) tokens, for tokens/s


def block_shape(rows: int, length: int, min_prompt: int, max_labels_per_row: int) -> BlockShape:
    """Split rows so a forward holds at most TOKEN_BUDGET tokens; size label slots for the worst case.

    A row of padded length L has at most min(L - min_prompt, max_labels_per_row)
    labels, where min_prompt is the fewest unlabelled tokens any example has; the
    slot count is rounded up to whole LM-head chunks so the head compiles once.
    """
    micro_batches = -(-rows // max(1, min(rows, TOKEN_BUDGET // length)))
    micro_rows = -(-rows // micro_batches)  # balanced: 12 rows of 224 run as 2 x 6, not 8 + 4
    worst = micro_rows * max(1, min(length - min_prompt, max_labels_per_row))
    return BlockShape(length, micro_rows, micro_batches, -(-worst // LOSS_CHUNK) * LOSS_CHUNK)


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
    if count > max_labels:  # block_shape's bound is wrong for this data: never write past the slots
        raise ValueError(f"{count} label positions do not fit the block's {max_labels} slots")
    positions += [0] * (max_labels - count)
    targets += [IGNORE_INDEX] * (max_labels - count)
    return ids, positions, targets, count


class CudaGraphStep:
    """Callable like the engine's EagerStep: (batch_no, examples, lr) -> (loss tensor, tokens).

    The first step of a block shape runs eagerly (it triggers any compile and lazy
    CUDA set-up, outside a capture, and is a real step, not a throwaway warm-up);
    the second captures the step into a graph, and every later one replays it.
    """

    def __init__(self, model, optimizer, cfg, pad_token_id: int, device: torch.device, fast_layers: bool,
                 on_fallback: Callable[[str, str], None] = lambda description, reason: None):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.pad_token_id, self.device = pad_token_id, device
        self.on_fallback = on_fallback  # told (new description, why) when the fast layers fail and are dropped
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_labels_per_row: int | None = None  # most labelled tokens of any example (multi-turn: several answers)
        self.min_prompt: int | None = None  # fewest unlabelled tokens of any training example
        self.graphs: dict[BlockShape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.statics: dict[BlockShape, dict[str, torch.Tensor]] = {}
        self.shapes_run_eagerly: set[BlockShape] = set()
        self.pool = None  # one memory pool shared by every bucket's graph
        self.plan: list[PaddedStep] = []
        use_causal_only_attention(model)
        wait_for_warm_up()
        on_gpu_with_triton = device.type == "cuda" and triton_available()
        self.regions = None
        if fast_layers and on_gpu_with_triton and fusable(model.config) and not cfg.model.trust_remote_code:
            self.regions = fused_layers(model)
        elif fast_layers:
            self.regions = compiled_layers(model)
        self.head_chunk = fused_head_chunk if on_gpu_with_triton else head_chunk_loss_and_dlogits
        self.code = "graphs" if self.regions is None else \
            "graphs+fused" if self.regions.name.startswith("fused") else "graphs+compile"
        self.description = "CUDA graphs" + (f" + {self.regions.name}" if self.regions else "")

    def prepare_epoch(self, train_examples, batches: list[list[int]]) -> None:
        """Pad every step of the epoch to its bucket and put the result on the GPU in one copy."""
        if self.min_prompt is None:  # fixed for the whole run, so a bucket's shape never changes
            labelled = [sum(1 for lab in e.labels if lab != IGNORE_INDEX) for e in train_examples]
            self.min_prompt = min(len(e) - n for e, n in zip(train_examples, labelled))
            self.max_labels_per_row = max(labelled)
        rows = self.cfg.batch_size
        ids, positions, targets, plan = [], [], [], []
        for batch in batches:
            examples = [train_examples[i] for i in batch]
            shape = block_shape(rows, bucket_length(max(len(e) for e in examples)), self.min_prompt,
                                self.max_labels_per_row)
            offset, label_offset, count = len(ids), len(positions), 0
            for k in range(shape.micro_batches):
                part = examples[k * shape.micro_rows:(k + 1) * shape.micro_rows]
                block = pad_step(part, self.pad_token_id, shape.micro_rows, shape.length, shape.label_slots)
                ids += block[0]
                positions += block[1]
                targets += block[2]
                count += block[3]
            plan.append(PaddedStep(shape, offset, label_offset, count, sum(len(e) for e in examples)))
        pinned = self.device.type == "cuda"
        as_device = lambda xs: torch.tensor(xs, dtype=torch.long, pin_memory=pinned).to(self.device, non_blocking=True)
        self.ids, self.positions, self.targets = map(as_device, (ids, positions, targets))
        self.plan = plan

    def _static(self, shape: BlockShape) -> dict[str, torch.Tensor]:
        """The fixed-address input buffers a shape's graph reads; refilled before each replay."""
        if shape not in self.statics:
            dev, n = self.device, shape.micro_batches
            self.statics[shape] = {
                "input_ids": torch.empty((n * shape.micro_rows, shape.length), dtype=torch.long, device=dev),
                "positions": torch.empty((n, shape.label_slots), dtype=torch.long, device=dev),
                "targets": torch.empty((n, shape.label_slots), dtype=torch.long, device=dev),
                "scale": torch.ones((), device=dev),
            }
        return self.statics[shape]

    def _loss_and_grads(self, shape: BlockShape, static: dict[str, torch.Tensor]) -> torch.Tensor:
        """Zero the grads, then forward and backward every micro-batch of the static block."""
        for p in self.params:  # grads must exist (not None): the head's gradient is added in place
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_zero_([p.grad for p in self.params])
        loss = torch.zeros((), device=self.device)
        with self.regions.active() if self.regions else nullcontext():
            for k in range(shape.micro_batches):
                rows = static["input_ids"][k * shape.micro_rows:(k + 1) * shape.micro_rows]
                loss += step_loss_and_backward(self.model, rows, static["positions"][k], static["targets"][k],
                                               static["scale"], self.head_chunk)
        return loss

    def _update(self) -> None:
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        self.optimizer.step()

    def _step(self, shape: BlockShape, static: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimiser step on the static buffers: run eagerly, or recorded while capturing."""
        loss = self._loss_and_grads(shape, static)
        self._update()
        return loss

    def _first_step(self, shape: BlockShape, static: dict[str, torch.Tensor]) -> torch.Tensor:
        """A shape's first step, where compiling happens (forward and backward). If that fails (no C
        compiler for Triton, a model it cannot trace), the run goes on with the plain layers: nothing
        has been updated yet, the grads are zeroed again. A failure that is not compiling's fails again."""
        try:
            loss = self._loss_and_grads(shape, static)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if self.regions is None:
                raise
            what = self.regions.name
            self.regions = None
            self.code, self.description = "graphs", f"CUDA graphs ({what} failed, so not used)"
            self.on_fallback(self.description, f"{what}: {type(e).__name__}: {str(e)[:300]}")
            loss = self._loss_and_grads(shape, static)
        self._update()
        return loss

    def __call__(self, batch_no: int, examples, lr: float) -> tuple[torch.Tensor, int]:
        step = self.plan[batch_no]
        shape = step.shape
        static = self._static(shape)
        block, slots = shape.micro_batches * shape.micro_rows * shape.length, shape.micro_batches * shape.label_slots
        static["input_ids"].view(-1).copy_(self.ids[step.offset:step.offset + block])
        static["positions"].view(-1).copy_(self.positions[step.label_offset:step.label_offset + slots])
        static["targets"].view(-1).copy_(self.targets[step.label_offset:step.label_offset + slots])
        static["scale"].fill_(1.0 / step.label_count)
        set_lr(self.optimizer, lr)
        if shape not in self.shapes_run_eagerly:
            self.shapes_run_eagerly.add(shape)
            return self._first_step(shape, static).detach(), step.num_tokens
        if shape not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            # one capture at a time in the process: Compare's decode warm-up captures too (capabilities.py)
            with CAPTURE_LOCK, torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss = self._step(shape, static)
            self.pool = graph.pool()
            self.graphs[shape] = (graph, loss)
        graph, loss = self.graphs[shape]
        graph.replay()
        return loss.detach().clone(), step.num_tokens
