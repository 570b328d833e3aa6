"""CUDA-only speed code for the training step: captured CUDA graphs, fused Qwen2 layers, the LM-head loss,
Triton kernels (`kernels/`) and their warm-up. Imported only when a run is on a CUDA device; the CPU
path (`train/`) never needs it. Below `train/` and beside `decoding/`: it imports neither (what it shares
with them, the capture lock, Triton's presence and the model's anatomy, comes from the leaves
`capabilities.py` and `anatomy.py`; see docs/design.md).
"""
