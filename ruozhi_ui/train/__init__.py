"""Training: the SFT loop (`loop.train`), one optimiser step (`step`), precision and the bf16 optimizer,
the label-only loss, evaluation, checkpoints and the run's book-keeping. Plain PyTorch; the CUDA speed
code is in `ruozhi_ui/cuda/`, imported only on a GPU.
"""

from .loop import train

__all__ = ["train"]
