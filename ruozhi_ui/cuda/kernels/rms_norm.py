"""RMSNorm forward and backward (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization").

One program per row forward; backward sums the weight gradient over ROWS rows per program into
partial sums that the host adds up, the usual two-stage reduction (as in Triton's layer-norm
tutorial and Liger-Kernel's `rms_norm.py`). Statistics in fp32; the normalised value is rounded
to the input dtype before the weight multiplies it, as Qwen2RMSNorm does.
"""

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16  # rows whose weight gradient one backward program sums (unrolled)


@triton.jit(do_not_specialize=["eps"])
def rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * cols
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / cols + eps)
    tl.store(rstd_ptr + tl.program_id(0), rstd)
    xhat = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)  # rounded as Qwen2RMSNorm rounds it
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row + offs, (w * xhat).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows"])
def rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, rows, cols, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    for i in tl.static_range(ROWS):
        r = tl.program_id(0) * ROWS + i
        ok = r < rows
        base = r.to(tl.int64) * cols
        x = tl.load(x_ptr + base + offs, mask=mask & ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + base + offs, mask=mask & ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r, mask=ok, other=0.0)
        xhat = x * rstd
        dxhat = dy * w
        dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, 0) / cols))
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask & ok)
        dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_ptr + tl.program_id(0) * cols + offs, dw, mask=mask)


def forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) for rows x2 (rows, cols)."""
    y, rstd = torch.empty_like(x2), torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device)
    rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.shape[1], eps, BLOCK=triton.next_power_of_2(x2.shape[1]))
    return y, rstd


def backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """(dx, dweight in fp32)."""
    rows, cols = x2.shape
    dx = torch.empty_like(x2)
    programs = -(-rows // ROWS_PER_PROGRAM)
    dw_parts = torch.empty((programs, cols), dtype=torch.float32, device=x2.device)
    rms_norm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_parts, rows, cols, ROWS=ROWS_PER_PROGRAM,
                              BLOCK=triton.next_power_of_2(cols))
    return dx, dw_parts.sum(0)
