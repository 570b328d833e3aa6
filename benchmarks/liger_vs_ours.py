"""Liger-Kernel's Qwen2 ops against ours, inside our captured training step, on one GPU.

    python benchmarks/liger_vs_ours.py      # CUDA + the liger-kernel package; ~2 minutes on an H200

Each variant runs in a fresh process on empty Triton/inductor caches: a random-init
Qwen2.5-0.5B-architecture model (bf16, the config below), our CUDA-graph step (`cuda/graph_step.py`,
flat bf16 AdamW, our LM-head kernel) over a 12 x 160 block, with the decoder layer's RMSNorm,
rotary and SwiGLU either ours (`cuda/qwen2_layer.py`) or Liger's (`LigerRMSNormFunction`,
`LigerRopeFunction`, `LigerSiLUMulFunction`), swapped op by op. Measured: the median step time of
30 graph replays, the cold cost (the first, eager step, which builds every kernel), and peak
memory. Liger's fused linear cross-entropy is not swapped in: our head already computes the loss
and both gradients chunk by chunk inside the graph (`cuda/head_loss.py`); Liger's returns the
loss and keeps the gradient for its backward, which would need a different step shape.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu")
VARIANTS = {  # name -> which ops are Liger's
    "ours": (),
    "liger rms_norm": ("rms_norm",),
    "liger rope": ("rope",),
    "liger swiglu": ("swiglu",),
    "liger all three": ("rms_norm", "rope", "swiglu"),
}
ROWS, PROMPT, ANSWER, REPLAYS = 12, 50, 110, 30


def layer_forward(liger: tuple[str, ...]):
    """Our fused Qwen2 layer forward with the named ops replaced by Liger's."""
    import torch
    import torch.nn.functional as F

    from ruozhi_ui.cuda import qwen2_layer as ours

    if "rms_norm" in liger:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        def norm(x, w, eps):
            return LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
    else:
        norm = ours.rms_norm

    def forward(layer, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        attn, mlp = layer.self_attn, layer.mlp
        rows, length, _ = hidden_states.shape
        cos, sin = position_embeddings
        h = norm(hidden_states, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv = F.linear(h, torch.cat([m.weight for m in projections]), torch.cat([m.bias for m in projections]))
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.split([m.out_features for m in projections], -1))
        if "rope" in liger:
            from liger_kernel.ops.rope import LigerRopeFunction

            q, k = LigerRopeFunction.apply(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), cos, sin)
        else:
            q, k = ours.rotary(q, cos[0], sin[0]).transpose(1, 2), ours.rotary(k, cos[0], sin[0]).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=attn.scaling,
                                           enable_gqa=True)
        x = hidden_states + F.linear(o.transpose(1, 2).reshape(rows, length, -1), attn.o_proj.weight)
        h = norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        gate, up = F.linear(h, mlp.gate_proj.weight), F.linear(h, mlp.up_proj.weight)
        if "swiglu" in liger:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return x + F.linear(LigerSiLUMulFunction.apply(gate, up), mlp.down_proj.weight)
        return x + ours.swiglu_down(gate, up, mlp.down_proj.weight)

    return forward


def measure(liger: tuple[str, ...]) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ruozhi_ui.config import TrainConfig
    from ruozhi_ui.cuda.graph_step import CudaGraphStep
    from ruozhi_ui.cuda.layers import LayerForwards
    from ruozhi_ui.encoding import IGNORE_INDEX, EncodedExample
    from ruozhi_ui.train.precision import AdamWBF16

    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(torch.bfloat16)
    model.config.use_cache = False
    optimizer = AdamWBF16(model.parameters(), lr=1e-4, fused_kernel=True)
    cfg = TrainConfig(batch_size=ROWS)
    stepper = CudaGraphStep(model, optimizer, cfg, 0, device, fast_layers=True)
    stepper.regions = LayerForwards(model, layer_forward(liger), name="+".join(liger) or "ours")
    ids = torch.randint(10, 150000, (ROWS, PROMPT + ANSWER)).tolist()
    examples = [EncodedExample(row, [IGNORE_INDEX] * PROMPT + row[PROMPT:], PROMPT, False, False) for row in ids]
    stepper.prepare_epoch(examples, [list(range(ROWS))] * (REPLAYS + 2))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stepper(0, examples, 1e-4)  # eager: builds every kernel
    torch.cuda.synchronize()
    cold_s = time.perf_counter() - t0
    stepper(1, examples, 1e-4)  # captures
    times = []
    for i in range(REPLAYS):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = stepper(i + 2, examples, 1e-4)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"step_ms": statistics.median(times) * 1e3, "cold_s": cold_s, "loss": loss.item(),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=list(VARIANTS))
    args = parser.parse_args()
    if args.variant:  # one measurement, in this fresh process
        print(json.dumps(measure(VARIANTS[args.variant])))
        return
    import torch

    results = {}
    for name in VARIANTS:
        with tempfile.TemporaryDirectory() as cache:  # empty kernel caches: cold builds count
            env = dict(os.environ, TRITON_CACHE_DIR=f"{cache}/triton", TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor",
                       RUOZHI_CACHE=cache)
            out = subprocess.run([sys.executable, __file__, "--variant", name], env=env, capture_output=True, text=True)
        if out.returncode:
            results[name] = {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
        else:
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; block {ROWS} x {PROMPT + ANSWER}")
    print(f"{'variant':<18} {'step ms':>8} {'vs ours':>8} {'cold s':>7} {'peak GiB':>9}")
    base = results["ours"].get("step_ms")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} failed: {r['error']}")
            continue
        print(f"{name:<18} {r['step_ms']:8.2f} {r['step_ms'] / base:7.3f}x {r['cold_s']:7.2f} {r['peak_gib']:9.2f}")
    print(json.dumps({"liger_vs_ours": results}))


if __name__ == "__main__":
    main()
