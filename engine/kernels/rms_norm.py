"""RMSNorm, optionally fused with the residual add that precedes it (one kernel instead of two)."""
from __future__ import annotations

import torch

from . import launch_then_wait, num_warps_for, programmatic_launch, tl, triton, use_triton


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) * weight, x + residual)`` over the last dim of ``[T, N]``.

    ``residual=None`` normalises ``x`` and returns it as the residual. Rounding follows
    transformers: the sum is rounded to the storage dtype, the norm is computed in float32 and
    rounded before the weight multiplies it. The Triton version updates ``residual`` in place.
    """
    if use_triton(x):
        return _add_rms_norm_triton(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def _add_rms_norm_triton(x, residual, weight, eps):
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    has_residual = residual is not None
    pdl = programmatic_launch(x)
    if has_residual:
        assert residual.is_contiguous() and residual.shape == x.shape
    _add_rms_norm_kernel[(rows,)](x, residual if has_residual else x, weight, out, n, eps,
                                  HAS_RESIDUAL=has_residual, BLOCK=block, PDL=pdl,
                                  launch_pdl=pdl, num_warps=num_warps_for(block))
    return out, residual if has_residual else x


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
        launch_then_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
            tl.store(res_ptr + row * n_cols + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (xf * rstd).to(x.dtype).to(tl.float32) * w
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
