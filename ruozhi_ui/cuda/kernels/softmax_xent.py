"""Cross-entropy and its gradient for one chunk of LM-head logits, in place (online softmax).

Pass 1 computes each row's log-sum-exp with the running max of Milakov & Gimelshein 2018
("Online normalizer calculation for softmax"); pass 2 overwrites the logits with
scale * (softmax - one_hot). With the chunking in `cuda/head_loss.py` this is the fused
linear cross-entropy of Liger-Kernel and of Wijmans et al. 2024 ("Cut Your Losses"): only one
chunk of logits ever exists. An ignored target (bucket padding) adds no loss and no gradient.
"""

import torch
import triton
import triton.language as tl

BLOCK = 4096  # vocabulary entries per iteration


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


def loss_and_grad_in_place(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                           ignore_index: int) -> torch.Tensor:
    """Per-row losses (fp32); `logits` (rows, V) becomes scale * dLoss/dLogits."""
    loss_rows = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    softmax_xent_grad[(logits.shape[0],)](logits, targets, loss_rows, scale, logits.shape[1], IGNORE=ignore_index,
                                          BLOCK=BLOCK, num_warps=8)
    return loss_rows
