"""AdamW (Loshchilov & Hutter 2019) for bf16 weights with fp32 moments and stochastic rounding.

The update is computed in fp32 and rounded to bf16 up or down with probability equal to the
dropped fraction (stochastic rounding, as in Zamirai et al. 2020, "Revisiting BFloat16
Training"), so updates smaller than bf16's step are not lost. The random bits are a hash of
(element, step), so a replayed CUDA graph draws new ones each step without host work. One
program updates ADAMW_BLOCK weights reading and writing each value once (~22 bytes a weight).
"""

import math

import torch
import triton
import triton.language as tl

BLOCK = 1024  # with 8 warps: 2.7 ms a step for 494M weights on an H200 (4.1 ms at 4096 x 4)


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


def step(p, g, m, v, lr: torch.Tensor, step_t: torch.Tensor, betas, eps: float, weight_decay: float) -> None:
    """One update of flat bf16 weights `p` from grads `g` and fp32 moments `m`, `v` (lr, step: device scalars)."""
    beta1, beta2 = betas
    n = p.numel()
    adamw_bf16[(-(-n // BLOCK),)](p, g, m, v, lr, step_t, n, beta1, beta2, math.log2(beta1), math.log2(beta2), eps,
                                  weight_decay, BLOCK=BLOCK, num_warps=8)
