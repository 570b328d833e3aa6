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
The LM head's loss and gradients are computed together a chunk at a time
(`head_loss_and_grads`), and the optimizer is one fused Triton kernel over flat
weight/grad/moment buffers (`FlatAdamWBF16`). Only the engine uses this, and only
on CUDA; the CPU path never imports it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoding import IGNORE_INDEX
from .loss import decoder_and_head
from .precision import AdamWBF16

BUCKET = 16  # padded row lengths are rounded up to this: a dozen graphs, little padding
LOSS_CHUNK = 256  # label positions per LM-head chunk: 256 x 151,936 fp32 logits are 0.16 GB
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


@torch.no_grad()
def head_loss_and_grads(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        grad_weight: torch.Tensor, chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `hidden @ weight.T` at `targets`, with its gradients computed now.

    Adds scale * dLoss/dWeight into `grad_weight` and returns (loss sum, scale *
    dLoss/dHidden); the caller backpropagates the latter through the decoder.
    Doing the head's backward inside its forward means only one chunk of logits
    ever exists and nothing of it is kept for later. Targets of IGNORE_INDEX
    (bucket padding) add neither loss nor gradient.
    """
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        logits = F.linear(h, weight).float()  # (c, V), fp32 for a stable softmax
        valid = (y != IGNORE_INDEX).unsqueeze(1)  # (c, 1)
        y_safe = y.clamp(min=0).unsqueeze(1)
        lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (c, 1)
        total += ((lse - logits.gather(1, y_safe)) * valid).sum()
        probs = logits.sub_(lse).exp_()  # softmax, in place
        probs.scatter_add_(1, y_safe, -valid.to(probs.dtype))  # softmax - one_hot
        probs.mul_(valid * scale)
        d_logits = probs.to(hidden.dtype)
        grad_hidden[start:start + chunk] = d_logits @ weight
        grad_weight.addmm_(d_logits.t(), h)
    return total, grad_hidden


def step_loss_and_backward(model, static: dict, label_count: torch.Tensor) -> torch.Tensor:
    """Forward, label-only loss and backward of one static block; returns the step's mean loss.

    Gradients accumulate into the parameters' .grad, which must exist (the head's
    weight gradient is added there directly).
    """
    decoder, lm_head = decoder_and_head(model)
    out = decoder(input_ids=static["input_ids"], use_cache=False)
    hidden = out.last_hidden_state[:, :-1]  # (rows, length-1, H)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, static["positions"])  # (max_labels, H)
    scale = 1.0 / label_count
    loss_sum, grad_hidden = head_loss_and_grads(hidden.detach(), static["targets"], lm_head.weight, scale,
                                                lm_head.weight.grad)
    hidden.backward(grad_hidden)
    return loss_sum * scale


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
                step_loss_and_backward(self.model, static, label_count)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            torch._foreach_zero_([p.grad for p in self.params])
            loss = step_loss_and_backward(self.model, static, label_count)
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


class FlatAdamWBF16(AdamWBF16):
    """AdamWBF16 with its whole update as one fused kernel over flat buffers.

    The parameters become views into one flat bf16 buffer, their .grad views into
    one flat grad buffer, and the fp32 moments are two flat buffers, so a single
    Triton kernel reads and writes each value once per step (~22 bytes a weight)
    instead of the ~150 bytes of the sliced torch version. Learning rate and step
    count stay on the device (capturable); stochastic-rounding noise is a hash of
    (element, step). zero_grad zeroes in place: the grads keep their addresses.
    """

    BLOCK = 4096

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
        self._launch(*(torch.zeros(16, dtype=t.dtype, device=device) for t in (self.flat, self.flat_grad)),
                     torch.zeros(16, device=device), torch.zeros(16, device=device), torch.ones((), device=device))
        # ^ compiles (or loads from the cache) the kernel now, never inside a graph capture

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

    def _launch(self, p, g, m, v, step) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        n = p.numel()
        _adamw_kernel()[(-(-n // self.BLOCK),)](
            p, g, m, v, self.lr_t, step, n, beta1, beta2, math.log2(beta1), math.log2(beta2), group["eps"],
            group["weight_decay"], BLOCK=self.BLOCK)

    @torch.no_grad()
    def step(self, closure=None):
        self.step_t += 1
        self._launch(self.flat, self.flat_grad, self.exp_avg, self.exp_avg_sq, self.step_t)
        return None


def flat_optimizer_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_KERNEL: list = []


def _adamw_kernel():
    """The fused AdamW + stochastic rounding kernel, defined on first use (Triton caches its binary)."""
    if _KERNEL:
        return _KERNEL[0]
    from .models import cache_root

    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n"])
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

    _KERNEL.append(adamw_bf16)
    return adamw_bf16
