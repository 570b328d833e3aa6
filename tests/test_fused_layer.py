"""The hand-fused Qwen2 decoder layer: its wiring on the CPU (plain-torch Functions) against transformers'
own layer, and its Triton kernels on CUDA against the same Functions' torch path."""


import pytest
import torch

from ruozhi_ui.cuda.layers import fused_layers, use_causal_only_attention
from ruozhi_ui.cuda.qwen2_layer import build_layer_kernels, fusable, rms_norm, rotate_qk, swiglu_down

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA GPU")


def layer_outputs_and_grads(model, ids, upstream, fused: bool):
    model.zero_grad(set_to_none=True)
    if fused:
        with fused_layers(model).active():
            out = model.model(input_ids=ids, use_cache=False).last_hidden_state
    else:
        out = model.model(input_ids=ids, use_cache=False).last_hidden_state
    out.backward(upstream)
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_fused_layer_gives_transformers_qwen2_outputs_and_gradients(demo_model):
    demo_model.train()
    use_causal_only_attention(demo_model)  # right-padded blocks: a causal mask alone, as the engine trains
    ids = torch.randint(0, 100, (3, 40))
    upstream = torch.randn(3, 40, demo_model.config.hidden_size)
    plain, plain_grads = layer_outputs_and_grads(demo_model, ids, upstream, fused=False)
    fused, fused_grads = layer_outputs_and_grads(demo_model, ids, upstream, fused=True)
    assert torch.allclose(plain, fused, atol=1e-5)
    for name, grad in plain_grads.items():  # fp32, summed in another order: equal to ~1e-6 of the largest
        assert (fused_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name
    assert all("forward" not in vars(layer) for layer in demo_model.model.layers)  # restored after active()


def test_only_plain_causal_qwen2_configs_are_fused(demo_model):
    config = demo_model.config
    assert fusable(config)
    assert not fusable(type(config)(**{**config.to_dict(), "hidden_act": "gelu"}))
    assert not fusable(type(config)(**{**config.to_dict(), "attention_dropout": 0.1}))
    sliding = type(config)(**{**config.to_dict(), "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
                              "layer_types": None})
    assert not fusable(sliding)
    from transformers import LlamaConfig

    assert not fusable(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4))


def test_the_warm_up_runs_every_function_at_the_model_s_sizes_forward_and_backward(demo_model, monkeypatch):
    """On CUDA this builds each kernel variant training needs (Triton builds one per block size)."""
    import ruozhi_ui.cuda.qwen2_layer as fused

    rotated, products = [], []
    real_rotate, real_swiglu = fused._rotate, fused._swiglu
    monkeypatch.setattr(fused, "_rotate", lambda x, *a: rotated.append((x.shape[2:], a[-1])) or real_rotate(x, *a))
    monkeypatch.setattr(fused, "_swiglu", lambda g, u: products.append(g.shape[-1]) or real_swiglu(g, u))
    config = demo_model.config
    build_layer_kernels(torch.device("cpu"), torch.float32, config)
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv = (config.num_attention_heads, head_dim), (config.num_key_value_heads, head_dim)
    assert sorted(rotated) == sorted([(q, 1.0), (kv, 1.0), (q, -1.0), (kv, -1.0)])  # forward and backward
    assert products == [config.intermediate_size] * 2  # forward, and the backward's recomputation


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_kernels_give_the_torch_path_results_forward_and_backward(dtype):
    """Each operation on CUDA (Liger's RMSNorm and RoPE, our SwiGLU) against the same one on the CPU (torch),
    with odd sizes."""
    torch.manual_seed(0)
    rows, length, hidden, heads, head_dim, inter = 3, 37, 200, 5, 24, 333
    cpu = {
        "x": torch.randn(rows, length, hidden), "w": torch.rand(hidden) + 0.5,
        "q": torch.randn(rows, length, heads, head_dim), "k": torch.randn(rows, length, 2, head_dim),
        "gate": torch.randn(rows, length, inter), "up": torch.randn(rows, length, inter),
        "down": torch.randn(hidden, inter) / inter ** 0.5,
    }
    angles = torch.arange(length)[:, None] * torch.rand(head_dim // 2)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    g_norm, g_mlp = torch.randn(rows, length, hidden), torch.randn(rows, length, hidden)
    g_q, g_k = torch.randn(rows, heads, length, head_dim), torch.randn(rows, 2, length, head_dim)

    def run(device):
        t = {k: v.to(device, dtype).requires_grad_() for k, v in cpu.items()}
        c, s = cos[None].to(device, dtype), sin[None].to(device, dtype)
        wide = torch.cat((t["q"], t["q"]), dim=2)  # q as a slice of a wider row, as it comes out of qkv
        q, k = rotate_qk(wide[:, :, heads:], t["k"], c, s)
        outs = (rms_norm(t["x"], t["w"], 1e-6), q, k, swiglu_down(t["gate"], t["up"], t["down"]))
        # one backward for all four: on CUDA q and k come out of one Liger RoPE call, whose graph a first
        # backward would free
        torch.autograd.backward(outs, [g.to(device, dtype) for g in (g_norm, g_q, g_k, g_mlp)])
        return [o.detach().float().cpu() for o in outs] + [t[k].grad.float().cpu() for k in cpu]

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for name, got, want in zip(["norm", "rotary q", "rotary k", "mlp", *cpu], run("cuda"), run("cpu")):
        scale = want.abs().max().item()
        assert torch.allclose(got / scale, want / scale, **tol), name
