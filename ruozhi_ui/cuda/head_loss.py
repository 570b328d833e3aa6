"""The LM head's loss and its gradients, a chunk of label positions at a time, inside the captured step.

Qwen's vocabulary is 151,936 wide: the head's backward is done inside its forward
(`head_loss_and_grads`), so only one chunk of logits ever exists and nothing of it is
kept. On CUDA the softmax and its gradient are one Triton kernel (`kernels/softmax_xent.py`);
elsewhere the same algebra runs as plain tensor code (what the CPU tests compare with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..encoding import IGNORE_INDEX
from ..anatomy import decoder_and_head

LOSS_CHUNK = 512  # label positions per LM-head chunk: 512 x 151,936 logits are 0.16 GB in bf16


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
    from .kernels import softmax_xent

    logits = torch.mm(h, weight.t())  # (c, V) in h's dtype, as F.linear gives it to the torch version
    return softmax_xent.loss_and_grad_in_place(logits, y, scale, IGNORE_INDEX).sum(), logits


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
