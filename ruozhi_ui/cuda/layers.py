"""Swapping a faster forward into every decoder layer while a captured step runs, and the CUDA set-up
the fast path needs (causal-only attention, attention backends, kernel caches).

A Qwen2 layer gets the hand-fused forward of `qwen2_layer.py`; another architecture's layer
forward is one `torch.compile` region shared by all its layers and dynamic in rows and length
(one compile per process, cached on disk for the next run). Either way `LayerForwards.active()`
is the one place that swaps a forward in and back out, so validation and generation outside
the captured step run the plain layers.
"""

from __future__ import annotations

import contextlib
import functools
import os
from contextlib import contextmanager

import torch

from ..anatomy import decoder_and_head
from .qwen2_layer import fused_layer_forward

CAUSAL_ONLY = "ruozhi_causal_sdpa"  # attention implementation name registered below
ACTIVATION_MEMORY_BUDGET = 0.7  # compiled layers keep this share of activations; cheap ops are recomputed


def use_persistent_compile_cache() -> None:
    """Keep Triton and torch.compile artefacts under the app's cache, so a second run starts warm."""
    from ..models import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))


def use_causal_only_attention(model) -> None:
    """Run attention with a causal mask alone, so PyTorch's SDPA can take its flash kernel.

    Every batch here is right-padded, so causality alone already keeps each real
    token from seeing a pad (pads come after it), and pad outputs carry no loss.
    transformers would otherwise build an explicit mask while a CUDA graph is being
    captured, which rules the flash kernel out.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_ONLY, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_ONLY, lambda *args, **kwargs: None)
    model.set_attn_implementation(CAUSAL_ONLY)


def attention_backends(device: torch.device):
    """On CUDA, PyTorch's attention without its cuDNN kernel: cuDNN builds a plan for every new shape
    (~0.2 s each, and training buckets plus validation batches make dozens), flash attention needs
    none and runs these steps as fast."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class LayerForwards:
    """Every decoder layer runs `forward(layer, ...)` inside `active()` (with `settings` entered); outside
    it, the class's plain forward."""

    def __init__(self, model, forward, settings=contextlib.nullcontext, name: str = ""):
        decoder, _ = decoder_and_head(model)
        self.layers, self.forward, self.settings, self.name = list(decoder.layers), forward, settings, name

    @contextmanager
    def active(self):
        for layer in self.layers:
            layer.forward = functools.partial(self.forward, layer)
        try:
            with self.settings():
                yield
        finally:
            for layer in self.layers:
                del layer.forward  # back to the class's plain forward


def fused_layers(model) -> LayerForwards:
    return LayerForwards(model, fused_layer_forward, name="fused Triton layer kernels")


@functools.cache
def compiled_layer_forward(layer_class: type, backend: str = "inductor"):
    """One torch.compile of a decoder layer class's forward per process. Its compiled code is
    guarded on shapes, dtypes and config values, not on which layer or model, so a second run in
    the app's process reuses the first's compile without tracing again."""
    return torch.compile(layer_class.forward, backend=backend)


@contextmanager
def compile_settings():
    """Without duck sizing a first length that equals a model dimension (e.g. 64 = head_dim) is not merged
    with it, which would pin the compiled graph to that length. One launch configuration per pointwise
    kernel, not several benchmarked on first use: ~3 s less of a cold start, no slower here."""
    import torch._inductor.config as inductor_config
    from torch.fx.experimental import _config as shape_config

    with shape_config.patch(use_duck_shape=False), \
            torch._functorch.config.patch(activation_memory_budget=ACTIVATION_MEMORY_BUDGET), \
            inductor_config.patch({"triton.autotune_pointwise": False}):
        yield


def compiled_layers(model, backend: str = "inductor") -> LayerForwards:
    """The layer forward compiled once for every layer and bucket: rows and length are symbolic from the
    first compile (`dynamic=True` would also make the hidden size symbolic, then specialise it and trace
    everything twice)."""
    use_persistent_compile_cache()
    decoder, _ = decoder_and_head(model)
    compiled = compiled_layer_forward(type(decoder.layers[0]), backend)

    def forward(layer, hidden_states, *args, position_ids=None, position_embeddings=None, **kwargs):
        for tensor, dims in ((hidden_states, (0, 1)), (position_ids, (1,)), *((t, (1,)) for t in position_embeddings)):
            if tensor is not None:
                torch._dynamo.mark_dynamic(tensor, dims)
        return compiled(layer, hidden_states, *args, position_ids=position_ids,
                        position_embeddings=position_embeddings, **kwargs)

    return LayerForwards(model, forward, compile_settings, name="torch.compile")
