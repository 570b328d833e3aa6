"""What this process can do on its accelerator, and the one resource every CUDA graph capture shares.

A leaf: the standard library only (no torch import), so `cuda/`, `decoding/` and `train/` all
import it downward instead of reaching into each other for these facts.
"""

from __future__ import annotations

import importlib.util
import threading


def triton_available() -> bool:
    """The fused kernels and torch.compile's GPU backend are Triton; without it they stay off."""
    return importlib.util.find_spec("triton") is not None


def liger_available() -> bool:
    """Liger-Kernel is installed only on Linux (requirements.txt's marker): without it the fused layer's
    RMSNorm and rotary embedding run as plain torch, on CUDA too."""
    return importlib.util.find_spec("liger_kernel") is not None


# One CUDA graph capture at a time in the process: two decoders capturing at once (base and tuned warming
# up together) failed on an H200 with "operation not permitted when stream is capturing". Eager work on
# other threads during a capture is fine (thread_local capture mode). Everything that captures graphs in
# this process (the decode steps in decoding/engine.py, the training steps in cuda/graph_step.py) holds
# this lock around its capture. It is module-level on purpose: capture is a property of the process.
CAPTURE_LOCK = threading.Lock()
