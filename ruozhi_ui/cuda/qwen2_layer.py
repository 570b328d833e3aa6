"""The Qwen2 decoder layer, forward and backward, with small fused kernels instead of torch.compile.

Eagerly, a Qwen2 layer's RMSNorms, rotary embedding and SwiGLU are dozens of small
kernels a layer (forward and backward); torch.compile fuses them, but compiling
costs ~10 s of every cold start, a third of a whole 3-epoch run here. On CUDA this
layer uses fused kernels that build in seconds, on the warm-up thread:
  - RMSNorm and rotary embedding: Liger-Kernel's (`LigerRMSNormFunction` in Llama's
    casting mode, which is Qwen2RMSNorm's; `LigerRopeFunction` on q and k together).
    Measured inside our captured step they are as fast as the kernels we had written
    (19.19 and 19.33 ms a step against 19.19; benchmarks/RESULTS.md), so ours are gone;
  - `swiglu_down`: down_proj(silu(gate) * up), our Triton kernel
    (`kernels/swiglu.py`), which keeps only gate and up for the backward and recomputes
    the product there (the layer's largest activation): Liger's keeps 0.42 GiB more.
q, k and v are one GEMM. The matrix products and attention stay PyTorch's (cuBLAS,
flash attention). Off CUDA the same operations run as plain-torch Functions, which is
what the CPU tests check the layer's wiring with; GPU tests compare the two.
`cuda/layers.py` swaps this forward in for every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capabilities import liger_available


def fusable(config) -> bool:
    """A Qwen2 model with the features these kernels implement: SiLU, full causal attention, no dropout."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (config.model_type == "qwen2" and config.hidden_act == "silu" and not config.attention_dropout
            and set(layer_types) == {"full_attention"} and head_dim % 2 == 0)


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
    q, k = rotate_qk(q, k, cos, sin)  # (rows, heads, length, head_dim)
    o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=attn.scaling, enable_gqa=True)
    x = hidden_states + F.linear(o.transpose(1, 2).reshape(rows, length, -1), attn.o_proj.weight, attn.o_proj.bias)
    h = rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
    return x + swiglu_down(F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)


# ---- RMSNorm --------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.reshape(-1, x.shape[-1])
        rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + eps)
        y = weight * (x2.float() * rstd[:, None]).to(x.dtype)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        xhat = x2.float() * rstd[:, None]
        dxhat = dy2.float() * weight.float()
        dx = rstd[:, None] * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        dw = (dy2.float() * xhat.to(x2.dtype).float()).sum(0)
        return dx.to(x2.dtype).view(dy.shape), dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm: weight * (x / rms(x)), the statistics in fp32 (Liger's kernel on CUDA)."""
    if x.is_cuda and liger_available():
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(x.contiguous(), weight, eps, 0.0, "llama", False)
    return _RMSNorm.apply(x.contiguous(), weight, eps)


# ---- rotary embedding --------------------------------------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x (rows, length, heads, head_dim) rotated by `sign` times each position's angle (cos, sin: (length,
    head_dim)); x may be a slice of a wider row (q out of qkv), the result is contiguous."""
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
    """apply_rotary_pos_emb on one of q or k, laid out (rows, length, heads, head_dim), in plain torch."""
    return _Rotary.apply(x, cos.contiguous(), sin.contiguous())


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q and k (rows, length, heads, head_dim) rotated by their positions' angles (cos, sin: (1, length,
    head_dim)), returned as (rows, heads, length, head_dim) for attention: Liger's kernel on CUDA."""
    if q.is_cuda and liger_available():
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction.apply(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), cos, sin)
    return rotary(q, cos[0], sin[0]).transpose(1, 2), rotary(k, cos[0], sin[0]).transpose(1, 2)


# ---- SwiGLU and down_proj ------------------------------------------------------------------
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.is_cuda:
        from .kernels import swiglu as kernel

        return kernel.forward(gate, up)
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
            from .kernels import swiglu as kernel

            d_gate, d_up, product = kernel.backward(d_product, gate, up)
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


def build_layer_kernels(device: torch.device, dtype: torch.dtype, config) -> None:
    """Compile (or load from the disk cache) every kernel here, forward and backward, with one short
    row of the model's own sizes: Triton builds a kernel per block size and per argument alignment,
    so smaller stand-ins would leave the real variants to be built in the first training step."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tensor = lambda *shape, grad=True: torch.randn(*shape, device=device, dtype=dtype, requires_grad=grad)
    x, w = tensor(1, 16, config.hidden_size), tensor(config.hidden_size)
    qkv = tensor(1, 16, heads + 2 * kv_heads, head_dim)  # q and k as slices of a wider row, as in the layer
    cos, sin = tensor(1, 16, head_dim, grad=False), tensor(1, 16, head_dim, grad=False)
    gate, up = tensor(1, 16, config.intermediate_size), tensor(1, 16, config.intermediate_size)
    down = tensor(config.hidden_size, config.intermediate_size)
    q, k = rotate_qk(qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], cos, sin)
    outputs = (rms_norm(x, w, 1e-6), q, k, swiglu_down(gate, up, down))
    torch.autograd.backward([o.sum() for o in outputs])
