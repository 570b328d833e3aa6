"""How the engine reaches into a model and an optimizer it did not build.

The transformer body and the LM head of a causal LM (through a peft wrapper when there is
one), and where an optimizer keeps its learning rate (also the device copy a captured CUDA
graph reads). A leaf: plain attribute access, no imports, so the CPU path (`train/`) and
the CUDA speed code (`cuda/`) share it without importing each other.
"""

from __future__ import annotations


def decoder_and_head(model):
    """(the transformer body, the LM head) of a transformers causal LM, through a peft wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate for the next step. An optimizer whose update is captured in a CUDA graph keeps
    it in a device tensor `lr_t` too (train/precision.py's AdamWBF16): that copy is what the graph reads."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    lr_t = getattr(optimizer, "lr_t", None)
    if lr_t is not None:
        lr_t.fill_(lr)
