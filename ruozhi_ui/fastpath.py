"""CUDA-only speed: each optimiser step of full-parameter SFT is one replayed CUDA graph.

Steps of ~1,700 tokens on a 0.5B model are launch-bound: eager PyTorch spends
longer issuing the step's thousands of kernels than the GPU spends running them.
So the whole step (zero grads, forward, label-only loss, backward, clip, the
AdamWBF16 update) is captured once per length bucket and then replayed. A graph
needs static shapes: each step's length-grouped examples are right-padded to the
next multiple of `BUCKET` (a short last batch gets all-pad rows), and the label
positions are padded to a per-bucket count with ignored targets. Right padding
needs no attention mask, which lets SDPA use its flash kernel
(`use_causal_only_attention`). An epoch's blocks are built on the CPU once and
copied to the GPU in one transfer.

Inside the graph, a Qwen2 decoder layer runs with hand-fused Triton kernels
(`fused_layer.py`: no compile on a cold start); another architecture's layer forward
is one `torch.compile` region shared by all its layers and dynamic in rows and length
(one compile, cached on disk for the next run). The LM head's loss and gradients are
computed together a chunk at a time
(`head_loss_and_grads`), the softmax and its gradient by one Triton kernel
(`fused_head_chunk`): only one chunk of logits ever exists. Blocks longer than
`TOKEN_BUDGET` tokens run as two halves within the step, which bounds the peak
memory. The optimizer is one fused Triton kernel over flat weight/grad/moment
buffers (`FlatAdamWBF16`). The kernels are built (or torch.compile made ready) on a
thread while the engine reads data and loads the model (`start_warm_up`). Only the
engine uses this, and only on CUDA; the CPU path never imports it.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoding import IGNORE_INDEX
from .fused_layer import FusedLayers, fusable
from .loss import decoder_and_head
from .precision import AdamWBF16, set_lr

BUCKET = 16  # padded row lengths are rounded up to this: a dozen graphs, little padding
LOSS_CHUNK = 512  # label positions per LM-head chunk: 512 x 151,936 logits are 0.16 GB in bf16
TOKEN_BUDGET = 2112  # rows x length per forward/backward; longer blocks are split (peak activation memory)
ACTIVATION_MEMORY_BUDGET = 0.7  # share of the layer's activations to keep; cheap ops are recomputed in backward
CAUSAL_ONLY = "ruozhi_causal_sdpa"  # attention implementation name registered below
XENT_BLOCK = 4096  # vocabulary entries per iteration of the head kernel
ADAMW_BLOCK = 1024  # weights per AdamW program; with 8 warps 2.7 ms a step for 494M on an H200 (4.1 at 4096 x 4)


def bucket_length(num_tokens: int, bucket: int = BUCKET) -> int:
    return -(-num_tokens // bucket) * bucket


def use_persistent_compile_cache() -> None:
    """Keep Triton and torch.compile artefacts under the app's cache, so a second run starts warm."""
    from .models import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))


def triton_available() -> bool:
    """The fused AdamW kernel and torch.compile's GPU backend are Triton; without it both stay off."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


def head_chunk_loss_and_dlogits(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                                scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk of positions, and scale * dLoss/dLogits in h's dtype.

    Written as plain tensor algebra for torch.compile, which fuses it into a
    reduction and one pass over the logits; eagerly it holds a few fp32 chunks.
    Targets of IGNORE_INDEX (bucket padding) add neither loss nor gradient.
    """
    logits = F.linear(h, weight).float()  # (c, V), fp32 for a stable softmax
    lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (c, 1)
    valid = (y != IGNORE_INDEX).unsqueeze(1)  # (c, 1)
    target_logit = logits.gather(1, y.clamp(min=0).unsqueeze(1))
    loss = ((lse - target_logit) * valid).sum()
    is_target = torch.arange(logits.shape[1], device=logits.device) == y.unsqueeze(1)  # one-hot, (c, V)
    d_logits = ((logits - lse).exp() - is_target.float()) * (valid * scale)  # softmax - one_hot
    return loss, d_logits.to(h.dtype)


def fused_head_chunk(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                     scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_chunk_loss_and_dlogits` on CUDA: the logits GEMM, then one Triton kernel that turns the
    logits into their gradient in place (two reads and one write of the chunk, no fp32 copies)."""
    logits = torch.mm(h, weight.t())  # (c, V) in h's dtype, as F.linear gives it to the torch version
    loss_rows = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    _triton_kernels().softmax_xent_grad[(h.shape[0],)](logits, y, loss_rows, scale, logits.shape[1],
                                                       IGNORE=IGNORE_INDEX, BLOCK=XENT_BLOCK, num_warps=8)
    return loss_rows.sum(), logits


@torch.no_grad()
def head_loss_and_grads(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        grad_weight: torch.Tensor, chunk: int | None = None,
                        chunk_fn=head_chunk_loss_and_dlogits) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `hidden @ weight.T` at `targets`, with its gradients computed now.

    Adds scale * dLoss/dWeight into `grad_weight` and returns (loss sum, scale *
    dLoss/dHidden); the caller backpropagates the latter through the decoder.
    Doing the head's backward inside its forward means only one chunk of logits
    ever exists and nothing of it is kept for later.
    """
    chunk = chunk or LOSS_CHUNK
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start:start + chunk]
        loss, d_logits = chunk_fn(h, targets[start:start + chunk], weight, scale)
        total += loss
        torch.mm(d_logits, weight, out=grad_hidden[start:start + chunk])
        grad_weight.addmm_(d_logits.t(), h)
    return total, grad_hidden


def step_loss_and_backward(model, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                           scale: torch.Tensor, chunk_fn=head_chunk_loss_and_dlogits) -> torch.Tensor:
    """Forward, label-only loss and backward of one right-padded block; returns its loss sum times `scale`.

    Gradients accumulate into the parameters' .grad, which must exist (the head's
    weight gradient is added there directly).
    """
    decoder, lm_head = decoder_and_head(model)
    out = decoder(input_ids=input_ids, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]  # (rows, length-1, H)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (label slots, H)
    loss_sum, grad_hidden = head_loss_and_grads(hidden.detach(), targets, lm_head.weight, scale,
                                                lm_head.weight.grad, chunk_fn=chunk_fn)
    hidden.backward(grad_hidden)
    return loss_sum * scale


class CompiledRegions:
    """The decoder layer's forward, compiled once and reused by every layer and bucket.

    One compiled layer forward serves all layers (their weights are inputs, not
    constants) and every bucket (rows and length are dynamic), so a run compiles it once; the
    FX graph cache under `use_persistent_compile_cache` makes the next run load it.
    The layers use it only inside `active()`: validation and probe generation run
    the plain forward, so they trigger no extra inference compiles.
    """

    def __init__(self, model, backend: str = "inductor"):
        use_persistent_compile_cache()
        decoder, _ = decoder_and_head(model)
        self.layers = list(decoder.layers)
        self.compiled_forward = compiled_layer_forward(type(self.layers[0]), backend)

    def layer_forward(self, layer, hidden_states, *args, position_ids=None, position_embeddings=None, **kwargs):
        """Rows and length are symbolic from the first compile (`dynamic=True` would also make the
        hidden size symbolic, then specialise it and trace everything twice)."""
        for tensor, dims in ((hidden_states, (0, 1)), (position_ids, (1,)), *((t, (1,)) for t in position_embeddings)):
            if tensor is not None:
                torch._dynamo.mark_dynamic(tensor, dims)
        return self.compiled_forward(layer, hidden_states, *args, position_ids=position_ids,
                                     position_embeddings=position_embeddings, **kwargs)

    @contextmanager
    def active(self):
        import torch._inductor.config as inductor_config
        from torch.fx.experimental import _config as shape_config

        for layer in self.layers:
            layer.forward = functools.partial(self.layer_forward, layer)
        try:
            # Without duck sizing a first length that equals a model dimension (e.g. 64 = head_dim)
            # is not merged with it, which would pin the compiled graph to that length.
            # One launch configuration per pointwise kernel, not several benchmarked on first use:
            # ~3 s less of a cold start, no slower here.
            with shape_config.patch(use_duck_shape=False), \
                    torch._functorch.config.patch(activation_memory_budget=ACTIVATION_MEMORY_BUDGET), \
                    inductor_config.patch({"triton.autotune_pointwise": False}):
                yield
        finally:
            for layer in self.layers:
                del layer.forward  # back to the class's plain forward


@functools.cache
def compiled_layer_forward(layer_class: type, backend: str = "inductor"):
    """One torch.compile of a decoder layer class's forward per process. Its compiled code is
    guarded on shapes, dtypes and config values, not on which layer or model, so a second run in
    the app's process reuses the first's compile without tracing again."""
    return torch.compile(layer_class.forward, backend=backend)


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

    def __init__(self, model, optimizer, cfg, pad_token_id: int, device: torch.device, compile_regions: bool):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.pad_token_id, self.device = pad_token_id, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_labels_per_row = cfg.data.max_target_length + 1  # answer tokens and the end-of-turn token
        self.min_prompt: int | None = None  # fewest unlabelled tokens of any training example
        self.graphs: dict[BlockShape, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.statics: dict[BlockShape, dict[str, torch.Tensor]] = {}
        self.shapes_run_eagerly: set[BlockShape] = set()
        self.pool = None  # one memory pool shared by every bucket's graph
        self.plan: list[PaddedStep] = []
        use_causal_only_attention(model)
        wait_for_warm_up()
        on_gpu_with_triton = device.type == "cuda" and triton_available()
        self.regions, layers = None, ""
        if compile_regions and on_gpu_with_triton and fusable(model.config) and not cfg.model.trust_remote_code:
            self.regions, layers = FusedLayers(model), " + fused Triton layer kernels"
        elif compile_regions:
            self.regions, layers = CompiledRegions(model), " + torch.compile (the first steps compile)"
        self.head_chunk = fused_head_chunk if on_gpu_with_triton else head_chunk_loss_and_dlogits
        self.description = "CUDA graphs" + layers

    def prepare_epoch(self, train_examples, batches: list[list[int]]) -> None:
        """Pad every step of the epoch to its bucket and put the result on the GPU in one copy."""
        if self.min_prompt is None:  # fixed for the whole run, so a bucket's shape never changes
            self.min_prompt = min(e.prompt_len for e in train_examples)
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
            what = "torch.compile" if isinstance(self.regions, CompiledRegions) else "the fused layer kernels"
            warnings.warn(f"{what} failed ({type(e).__name__}: {str(e)[:300]}); training without it",
                          stacklevel=2)
            self.regions = None
            self.description = f"CUDA graphs ({what} failed, so not used)"
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
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # a checkpoint may be writing
                loss = self._step(shape, static)
            self.pool = graph.pool()
            self.graphs[shape] = (graph, loss)
        graph, loss = self.graphs[shape]
        graph.replay()
        return loss.detach().clone(), step.num_tokens


class FlatAdamWBF16(AdamWBF16):
    """AdamWBF16 with its whole update as one fused kernel over flat buffers.

    The parameters become views into one flat bf16 buffer, their .grad views into
    one flat grad buffer, and the fp32 moments are two flat buffers, so a single
    Triton kernel reads and writes each value once per step (~22 bytes a weight)
    instead of the ~150 bytes of the sliced torch version. Learning rate and step
    count stay on the device (capturable); stochastic-rounding noise is a hash of
    (element, step). zero_grad zeroes in place: the grads keep their addresses.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        params = list(params)
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if len(self.param_groups) != 1 or len({p.dtype for p in params}) != 1:
            raise ValueError("FlatAdamWBF16 takes one parameter group of one dtype")
        device = params[0].device
        self.lr_t = torch.tensor(float(lr), device=device)
        self.step_t = torch.zeros((), device=device)
        total = sum(p.numel() for p in params)
        self.flat = torch.empty(total, dtype=params[0].dtype, device=device)
        self.flat_grad = torch.zeros(total, dtype=params[0].dtype, device=device)
        self.exp_avg = torch.zeros(total, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            n = p.numel()
            self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + n].view_as(p)  # the old storage is freed
            p.grad = self.flat_grad[offset:offset + n].view_as(p)
            self.state[p] = {"exp_avg": self.exp_avg[offset:offset + n].view_as(p),
                             "exp_avg_sq": self.exp_avg_sq[offset:offset + n].view_as(p)}
            offset += n
        wait_for_warm_up()
        build_kernels(device, self.flat.dtype)  # now, never inside a graph capture

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flat_grad.zero_()  # never None: views and captured graphs keep these addresses

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        offset = 0
        for p in self.param_groups[0]["params"]:  # move the loaded moments back into the flat buffers
            n, state = p.numel(), self.state[p]
            for name, flat in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                flat[offset:offset + n].copy_(state[name].reshape(-1))
                state[name] = flat[offset:offset + n].view_as(p)
            offset += n

    @torch.no_grad()
    def step(self, closure=None):
        self.step_t += 1
        group = self.param_groups[0]
        launch_adamw(self.flat, self.flat_grad, self.exp_avg, self.exp_avg_sq, self.lr_t, self.step_t, group["betas"],
                     group["eps"], group["weight_decay"])
        return None


def launch_adamw(p, g, m, v, lr: torch.Tensor, step: torch.Tensor, betas, eps: float, weight_decay: float) -> None:
    """One AdamW + stochastic rounding update of flat weights `p` from grads `g` and fp32 moments `m`, `v`."""
    beta1, beta2 = betas
    n = p.numel()
    _triton_kernels().adamw_bf16[(-(-n // ADAMW_BLOCK),)](
        p, g, m, v, lr, step, n, beta1, beta2, math.log2(beta1), math.log2(beta2), eps, weight_decay,
        BLOCK=ADAMW_BLOCK, num_warps=8)


def build_kernels(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
    """Compile (or load from the disk cache) both Triton kernels with tiny launches."""
    one = torch.ones((), device=device)
    zeros = lambda *shape, dtype=dtype: torch.zeros(*shape, dtype=dtype, device=device)
    launch_adamw(zeros(16), zeros(16), zeros(16, dtype=torch.float32), zeros(16, dtype=torch.float32), one, one,
                 (0.9, 0.999), 1e-8, 0.0)
    fused_head_chunk(zeros(1, 16), zeros(1, dtype=torch.long), zeros(16, 16), one)  # 16 | V, as 151,936


_KERNELS: list = []


def _triton_kernels():
    """The fused AdamW + stochastic rounding kernel and the LM-head softmax kernel, defined on first
    use (Triton compiles each on its first launch and caches the binary on disk)."""
    if _KERNELS:
        return _KERNELS[0]
    use_persistent_compile_cache()
    import types

    import triton
    import triton.language as tl

    @triton.jit  # n specialised (a multiple of 16 for Qwen2.5 and the warm-up's 16): vectorised loads
    def adamw_bf16(p_ptr, g_ptr, m_ptr, v_ptr, lr_ptr, step_ptr, n, beta1, beta2, log2_beta1, log2_beta2, eps, wd,
                   BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        lr = tl.load(lr_ptr)
        step = tl.load(step_ptr)
        bias1 = 1.0 - tl.exp2(step * log2_beta1)
        bias2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        w = w * (1.0 - lr * wd) - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        # stochastic rounding to bf16: add 16 pseudo-random low bits (a hash of element and step), truncate
        h = offs.to(tl.uint32) * 668265263 + step.to(tl.uint32) * 374761393
        h = (h ^ (h >> 15)) * 2146121005
        h = (h ^ (h >> 13)) * 739982445
        h = h ^ (h >> 16)
        bits = (w.to(tl.int32, bitcast=True) + (h & 0xFFFF).to(tl.int32)) & -65536
        tl.store(p_ptr + offs, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)

    @triton.jit
    def softmax_xent_grad(logits_ptr, targets_ptr, loss_ptr, scale_ptr, V, IGNORE: tl.constexpr,
                          BLOCK: tl.constexpr):
        """One row: its cross-entropy, then its logits overwritten by scale * (softmax - one_hot)."""
        row = logits_ptr + tl.program_id(0).to(tl.int64) * V
        y = tl.load(targets_ptr + tl.program_id(0))
        # pass 1: running max and sum of exponentials (fp32), then log-sum-exp
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(total)
        valid = y != IGNORE
        target_logit = tl.load(row + tl.maximum(y, 0)).to(tl.float32)  # read before pass 2 overwrites it
        tl.store(loss_ptr + tl.program_id(0), tl.where(valid, lse - target_logit, 0.0))
        # pass 2: the gradient, in place; an ignored target (bucket padding) gets zeros
        g_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - (cols == y).to(tl.float32)) * g_scale
            tl.store(row + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)

    _KERNELS.append(types.SimpleNamespace(adamw_bf16=adamw_bf16, softmax_xent_grad=softmax_xent_grad))
    return _KERNELS[0]


_warm_up: list[threading.Thread] = []
warm_up_seconds: dict[str, float] = {}  # the last warm-up's parts and how long each took


def start_warm_up(device: torch.device, dtype: torch.dtype, fast_layers: bool, model_spec: str | None) -> None:
    """Build the Triton kernels on a thread while the engine reads the data and loads the model, and,
    with `fast_layers`, get the layers ready: build the fused-layer kernels when the model (`model_spec`;
    None for remote code, which is never fused) is a Qwen2, or else import torch.compile and start its
    worker processes. Cold, these are several seconds that would otherwise come one after the other.
    A failure here is left for the main thread to meet again and report; `wait_for_warm_up` comes
    before any use."""
    def layers() -> None:
        from transformers import AutoConfig

        from .fused_layer import build_layer_kernels, fusable
        from .models import resolve_spec

        config = AutoConfig.from_pretrained(resolve_spec(model_spec)) if model_spec else None
        if config is not None and fusable(config):
            build_layer_kernels(device, dtype, config)
            return
        from torch._inductor.async_compile import maybe_warm_pool
        from torch._inductor.compile_fx import compile_fx  # noqa: F401  (the import is the work)

        maybe_warm_pool()

    def run() -> None:
        warm_up_seconds.clear()
        for name, work in (("kernels", lambda: build_kernels(device, dtype)), ("layers", layers if fast_layers else None)):
            t0 = time.perf_counter()
            try:
                if work:
                    with torch.cuda.device(device):
                        work()
                    warm_up_seconds[name] = time.perf_counter() - t0
            except Exception:  # noqa: BLE001
                pass

    thread = threading.Thread(target=run, name="fastpath-warm-up", daemon=True)
    thread.start()
    _warm_up.append(thread)


def wait_for_warm_up() -> None:
    while _warm_up:
        _warm_up.pop().join()
