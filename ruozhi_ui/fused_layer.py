"""The Qwen2 decoder layer, forward and backward, with small fused kernels instead of torch.compile.

Eagerly, a Qwen2 layer's RMSNorms, rotary embedding and SwiGLU are dozens of small
kernels a layer (forward and backward); torch.compile fuses them, but compiling
costs ~10 s of every cold start, a third of a whole 3-epoch run here. These
autograd Functions do the same fusions by hand, with Triton kernels that build
in about two seconds, on the warm-up thread:
  - `rms_norm`: one kernel forward, one backward (the weight gradient as per-program
    partial sums, then one sum);
  - `rotary`: one kernel for q and one for k, forward and backward (the backward is
    the same rotation by the opposite angle);
  - `swiglu_down`: down_proj(silu(gate) * up), which keeps only gate and up for the
    backward and recomputes the product there, in the pass that computes their
    gradients (the product is the layer's largest activation).
q, k and v are one GEMM. The matrix products and attention stay PyTorch's (cuBLAS,
flash attention). Off CUDA the same Functions run plain torch, which is what the
CPU tests check the layer's wiring with. `FusedLayers.active()` swaps the layers'
forward in, as `fastpath.CompiledRegions` does for the compiled one.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .loss import decoder_and_head

NORM_ROWS_PER_PROGRAM = 16  # rows whose weight gradient one backward program sums (unrolled)
POINTWISE_BLOCK = 1024


def fusable(config) -> bool:
    """A Qwen2 model with the features these kernels implement: SiLU, full causal attention, no dropout."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.model_type == "qwen2" and config.hidden_act == "silu" and not config.attention_dropout
            and set(layer_types) == {"full_attention"} and head_dim % 2 == 0)


class FusedLayers:
    """Every decoder layer runs `fused_layer_forward` inside `active()`; outside it, the plain forward."""

    def __init__(self, model):
        decoder, _ = decoder_and_head(model)
        self.layers = list(decoder.layers)

    @contextmanager
    def active(self):
        for layer in self.layers:
            layer.forward = functools.partial(fused_layer_forward, layer)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward


def fused_layer_forward(layer, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                        use_cache=False, position_embeddings=None, **kwargs):
    """Qwen2DecoderLayer.forward for training on right-padded blocks: causal attention, no cache."""
    if attention_mask is not None or past_key_values is not None:
        raise ValueError("fused layers take causal-only attention without a cache")
    attn, mlp = layer.self_attn, layer.mlp
    rows, length, _ = hidden_states.shape
    cos, sin = position_embeddings  # (1, length, head_dim): every row's positions are 0..length-1
    if cos.shape[0] != 1:
        raise ValueError("fused layers expect one set of positions for every row")
    h = rms_norm(hidden_states, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
    # q, k and v as one product: one GEMM, bias reduction and input gradient instead of three each
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    has_bias = all(m.bias is not None for m in projections)
    if not has_bias and any(m.bias is not None for m in projections):
        raise ValueError("fused layers take q, k and v projections that all have a bias or none does")
    qkv = F.linear(h, torch.cat([m.weight for m in projections]),
                   torch.cat([m.bias for m in projections]) if has_bias else None)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.split([m.out_features for m in projections], -1))
    q, k = rotary(q, cos[0], sin[0]), rotary(k, cos[0], sin[0])
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       scale=attn.scaling, enable_gqa=True)
    x = hidden_states + F.linear(o.transpose(1, 2).reshape(rows, length, -1), attn.o_proj.weight, attn.o_proj.bias)
    h = rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
    return x + swiglu_down(F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)


# ---- RMSNorm --------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1])
        if x.is_cuda:
            y, rstd = torch.empty_like(x2), torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            _kernels().rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.shape[1], eps,
                                                    BLOCK=_pow2(x2.shape[1]))
        else:
            rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + eps)
            y = weight * (x2.float() * rstd[:, None]).to(x.dtype)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        rows, cols = x2.shape
        if dy.is_cuda:
            dx = torch.empty_like(x2)
            programs = -(-rows // NORM_ROWS_PER_PROGRAM)
            dw_parts = torch.empty((programs, cols), dtype=torch.float32, device=dy.device)
            _kernels().rms_norm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_parts, rows, cols,
                                                 ROWS=NORM_ROWS_PER_PROGRAM, BLOCK=_pow2(cols))
            dw = dw_parts.sum(0)
        else:
            xhat = x2.float() * rstd[:, None]
            dxhat = dy2.float() * weight.float()
            dx = rstd[:, None] * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
            dw = (dy2.float() * xhat.to(x2.dtype).float()).sum(0)
        return dx.to(x2.dtype).view(dy.shape), dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: weight * (x / rms(x)), the statistics in fp32."""
    return _RMSNorm.apply(x.contiguous(), weight, eps)


# ---- rotary embedding --------------------------------------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x (rows, length, heads, head_dim) rotated by `sign` times each position's angle (cos, sin: (length,
    head_dim)); x may be a slice of a wider row (q out of qkv), the result is contiguous."""
    if x.is_cuda:
        rows, length, heads, dim = x.shape
        if x.stride(3) != 1 or x.stride(2) != dim or x.stride(0) != length * x.stride(1):
            x = x.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _kernels().rotary[(rows * length,)](x, cos, sin, out, x.stride(1), length, heads, sign, HALF=dim // 2,
                                            BLOCK_H=_pow2(heads), BLOCK_D=_pow2(dim // 2))
        return out
    c, s = cos[:, None, :].to(x.dtype), sign * sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy.contiguous(), cos, sin, -1.0), None, None  # a rotation's transpose is its inverse


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb on one of q or k, laid out (rows, length, heads, head_dim)."""
    return _Rotary.apply(x, cos.contiguous(), sin.contiguous())


# ---- SwiGLU and down_proj ------------------------------------------------------------------
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.is_cuda:
        out = torch.empty_like(gate)
        n = gate.numel()
        _kernels().swiglu_fwd[(-(-n // POINTWISE_BLOCK),)](gate, up, out, n, BLOCK=POINTWISE_BLOCK)
        return out
    return F.silu(gate) * up


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)  # not silu(gate) * up: the backward recomputes it
        return F.linear(_swiglu(gate, up), weight)

    @staticmethod
    def backward(ctx, d_out):
        gate, up, weight = ctx.saved_tensors
        d_product = d_out.matmul(weight).contiguous()
        if gate.is_cuda:  # one pass: both input gradients and the recomputed product
            d_gate, d_up, product = torch.empty_like(gate), torch.empty_like(up), torch.empty_like(gate)
            n = gate.numel()
            _kernels().swiglu_bwd[(-(-n // POINTWISE_BLOCK),)](d_product, gate, up, d_gate, d_up, product, n,
                                                               BLOCK=POINTWISE_BLOCK)
        else:
            product = _swiglu(gate, up)
            s = torch.sigmoid(gate.float())
            d_up = (d_product.float() * gate.float() * s).to(up.dtype)
            d_gate = (d_product.float() * up.float() * s * (1 + gate.float() * (1 - s))).to(gate.dtype)
        d_weight = d_out.reshape(-1, d_out.shape[-1]).t().mm(product.reshape(-1, product.shape[-1]))
        return d_gate, d_up, d_weight


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Qwen2MLP after its two input projections: down_proj(silu(gate) * up)."""
    return _SwiGLUDown.apply(gate.contiguous(), up.contiguous(), weight)


# ---- the Triton kernels ------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def build_layer_kernels(device: torch.device, dtype: torch.dtype, config) -> None:
    """Compile (or load from the disk cache) every kernel here, forward and backward, with one short
    row of the model's own sizes: Triton builds a kernel per block size and per argument alignment,
    so smaller stand-ins would leave the real variants to be built in the first training step."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tensor = lambda *shape, grad=True: torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)
    x, w = tensor(1, 16, config.hidden_size), tensor(config.hidden_size)
    qkv = tensor(1, 16, heads + 2 * kv_heads, head_dim)  # q and k as slices of a wider row, as in the layer
    cos, sin = tensor(16, head_dim, grad=False), tensor(16, head_dim, grad=False)
    gate, up = tensor(1, 16, config.intermediate_size), tensor(1, 16, config.intermediate_size)
    down = tensor(config.hidden_size, config.intermediate_size)
    outputs = (rms_norm(x, w, 1e-6), rotary(qkv[:, :, :heads], cos, sin),
               rotary(qkv[:, :, heads:heads + kv_heads], cos, sin), swiglu_down(gate, up, down))
    torch.autograd.backward([o.sum() for o in outputs])


_KERNELS: list = []


def _kernels():
    """Defined on first use; Triton compiles each on its first launch and caches the binary on disk."""
    if _KERNELS:
        return _KERNELS[0]
    import types

    import triton
    import triton.language as tl

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

    _KERNELS.append(types.SimpleNamespace(rms_norm_fwd=rms_norm_fwd, rms_norm_bwd=rms_norm_bwd, rotary=rotary,
                                          swiglu_fwd=swiglu_fwd, swiglu_bwd=swiglu_bwd))
    return _KERNELS[0]
