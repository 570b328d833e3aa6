"""Rotary position embedding (Su et al. 2021, "RoFormer"), applied to q or k in one pass.

One program per token rotates every head's (x1, x2) halves by the position's angle. The
backward is the same kernel with the opposite angle: a rotation's transpose is its inverse.
The input may be a strided slice of a wider row (q out of the fused qkv projection).
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["length", "sign"])
def rotary(x_ptr, cos_ptr, sin_ptr, out_ptr, x_token_stride, length, heads, sign, HALF: tl.constexpr,
           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token: every head's (x1, x2) halves -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    token = tl.program_id(0)
    pos = token % length
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < HALF)
    within = h * 2 * HALF + d
    src = token.to(tl.int64) * x_token_stride + within
    dst = token.to(tl.int64) * heads * 2 * HALF + within
    c = tl.load(cos_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    s = sign * tl.load(sin_ptr + pos * 2 * HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + dst + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x (rows, length, heads, head_dim) rotated by `sign` x each position's angle; contiguous output."""
    rows, length, heads, dim = x.shape
    if x.stride(3) != 1 or x.stride(2) != dim or x.stride(0) != length * x.stride(1):
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rotary[(rows * length,)](x, cos, sin, out, x.stride(1), length, heads, sign, HALF=dim // 2,
                             BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim // 2))
    return out
