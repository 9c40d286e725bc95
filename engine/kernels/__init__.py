"""Fused Triton kernels for the CUDA path, each next to the plain-torch version that sim/cpu run.

Every op here is a function that takes torch tensors and picks its implementation: the Triton
kernel when the tensors live on a CUDA device and Triton is installed, the torch version
otherwise. Both compute in float32 and round once to the storage dtype, so they agree to within
float32 rounding; ``tests/test_kernels.py`` holds them to that on a GPU.

On sm_90 and later the kernels use programmatic dependent launch (PDL): each program first lets
the next kernel in the stream launch, then waits until the previous kernel's results are
visible, so a kernel's launch and start-up overlap the tail of the one before it instead of
leaving a gap. Every PDL kernel waits before it touches global memory, which keeps the
stream's order for everything it reads and writes.
"""
from __future__ import annotations

import functools

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


PDL_ENABLED = True  # cleared to measure the kernels without programmatic dependent launch


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def programmatic_launch(x: torch.Tensor) -> bool:
    """Whether kernels on ``x``'s device launch with PDL (Hopper and later)."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return PDL_ENABLED and _capability(index)[0] >= 9


launch_then_wait = None  # the CPU-only install has no kernels to call it
if triton is not None:
    @triton.jit
    def launch_then_wait(PDL: tl.constexpr):
        """Let the next kernel launch, then wait for the previous one's writes (under PDL)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
