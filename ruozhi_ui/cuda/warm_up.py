"""Building the CUDA kernels on a thread while the engine reads the data and loads the model.

Cold, the Triton builds (and, for a non-Qwen2 model, torch.compile's imports and worker
pool) are several seconds that would otherwise come one after the other with setup.
A failure here is left for the main thread to meet again and report; `wait_for_warm_up`
comes before any use.
"""

from __future__ import annotations

import threading
import time

import torch

from .head_loss import fused_head_chunk
from .layers import use_persistent_compile_cache


def build_kernels(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
    """Compile (or load from the disk cache) the optimizer and LM-head kernels with tiny launches."""
    from .kernels import adamw_bf16

    use_persistent_compile_cache()
    one = torch.ones((), device=device)
    zeros = lambda *shape, dtype=dtype: torch.zeros(*shape, dtype=dtype, device=device)
    adamw_bf16.step(zeros(16), zeros(16), zeros(16, dtype=torch.float32), zeros(16, dtype=torch.float32), one, one,
                    (0.9, 0.999), 1e-8, 0.0)
    fused_head_chunk(zeros(1, 16), zeros(1, dtype=torch.long), zeros(16, 16), one)  # 16 | V, as 151,936


_warm_up: list[threading.Thread] = []
warm_up_seconds: dict[str, float] = {}  # the last warm-up's parts and how long each took


def start_warm_up(device: torch.device, dtype: torch.dtype, fast_layers: bool, model_spec: str | None) -> None:
    """Build the optimizer and head kernels and, with `fast_layers`, get the layers ready: the fused-layer
    kernels at the model's own sizes when it (`model_spec`; None for remote code, never fused) is a
    Qwen2, else torch.compile's imports and worker processes."""
    def layers() -> None:
        from transformers import AutoConfig

        from .qwen2_layer import build_layer_kernels, fusable
        from ..models import resolve_spec

        config = AutoConfig.from_pretrained(resolve_spec(model_spec)) if model_spec else None
        if config is not None and fusable(config):
            build_layer_kernels(device, dtype, config)
            return
        from torch._inductor.async_compile import maybe_warm_pool
        from torch._inductor.compile_fx import compile_fx  # noqa: F401  (the import is the work)

        maybe_warm_pool()

    def run() -> None:
        warm_up_seconds.clear()
        for name, work in (("kernels", lambda: build_kernels(device, dtype)), ("layers", layers if fast_layers else None)):
            t0 = time.perf_counter()
            try:
                if work:
                    with torch.cuda.device(device):
                        work()
                    warm_up_seconds[name] = time.perf_counter() - t0
            except Exception:  # noqa: BLE001
                pass

    thread = threading.Thread(target=run, name="cuda-warm-up", daemon=True)
    thread.start()
    _warm_up.append(thread)


def wait_for_warm_up() -> None:
    while _warm_up:
        _warm_up.pop().join()
