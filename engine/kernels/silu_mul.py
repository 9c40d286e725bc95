"""SwiGLU's ``silu(gate) * up`` over the fused gate/up projection, in one kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import launch_then_wait, programmatic_launch, tl, triton, use_triton

BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[T, 2I]`` (gate then up) to ``[T, I]``; silu in float32, rounded as torch rounds it."""
    inter = gate_up.shape[-1] // 2
    if not use_triton(gate_up):
        gate, up = gate_up.split(inter, dim=-1)
        return F.silu(gate.float()).to(gate.dtype) * up
    gate_up = gate_up.contiguous()
    rows = gate_up.numel() // (2 * inter)
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    pdl = programmatic_launch(gate_up)
    _silu_mul_kernel[(rows, triton.cdiv(inter, BLOCK))](gate_up, out, inter, BLOCK=BLOCK,
                                                        PDL=pdl, launch_pdl=pdl, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):
        launch_then_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(x_ptr + row * 2 * inter + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        y = silu.to(tl.float32) * up.to(tl.float32)
        tl.store(out_ptr + row * inter + cols, y.to(gate.dtype), mask=mask)
