"""Triton kernels, one per file at module level (the layout of Liger-Kernel's `ops/`).

Each module holds its `@triton.jit` kernel(s) first, then the host function that launches
them. Importing one imports Triton: only CUDA code paths do, never the CPU path.
"""
