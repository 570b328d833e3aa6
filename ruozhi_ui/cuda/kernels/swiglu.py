"""SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): silu(gate) * up, and its backward.

The backward recomputes the product in the same pass that computes both input gradients,
so the forward keeps only gate and up (the product is the layer's largest activation),
as Liger-Kernel's `swiglu.py` does. `n` stays specialised (a multiple of 16 here) so the
loads vectorise.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


# n (rows x length x intermediate) is left specialised: a multiple of 16, which lets the loads vectorise
@triton.jit
def swiglu_fwd(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded as F.silu's output is
    tl.store(out_ptr + offs, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd(dp_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, p_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dp = tl.load(dp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    tl.store(du_ptr + offs, (dp * silu).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dp * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    silu = silu.to(p_ptr.dtype.element_ty).to(tl.float32)
    tl.store(p_ptr + offs, (silu * u).to(p_ptr.dtype.element_ty), mask=mask)


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    swiglu_fwd[(-(-n // BLOCK),)](gate, up, out, n, BLOCK=BLOCK)
    return out


def backward(d_product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(d_gate, d_up, the recomputed product)."""
    d_gate, d_up, product = torch.empty_like(gate), torch.empty_like(up), torch.empty_like(gate)
    n = gate.numel()
    swiglu_bwd[(-(-n // BLOCK),)](d_product, gate, up, d_gate, d_up, product, n, BLOCK=BLOCK)
    return d_gate, d_up, product
