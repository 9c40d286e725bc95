"""Fused Triton kernels for the CUDA path, each next to the plain-torch version that sim/cpu run.

Every op here is a function that takes torch tensors and picks its implementation: the Triton
kernel when the tensors live on a CUDA device and Triton is installed, the torch version
otherwise. Both compute in float32 and round once to the storage dtype, so they agree to within
float32 rounding; ``tests/test_kernels.py`` holds them to that on a GPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: every op runs its torch version
    triton = tl = None


def use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def num_warps_for(block: int) -> int:
    """Warps for a one-row program over ``block`` elements: about 8 elements per thread."""
    return max(1, min(16, block // 256))
