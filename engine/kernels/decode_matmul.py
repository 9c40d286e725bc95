"""Matrix products for decode-sized batches, with the RMSNorm fused in front and SwiGLU behind.

A decode step multiplies a few rows by every weight of the model once, so its matrix products
are bound by how fast the weights stream from memory. For at most ``MAX_ROWS`` rows on CUDA,
``linear`` and ``norm_linear`` run one Triton kernel per product: each program reads a
``[BLOCK_N, K / SPLIT_K]`` slice of the weight and all the rows. ``norm_linear`` adds the
residual and RMS-normalises the rows in the same kernel (every program recomputes the norm of
its rows, which stay in L2), and with ``gated=True`` it applies ``silu(gate) * up`` before
storing, so the ``[T, 2I]`` gate/up product never reaches memory. When the output columns alone
cannot fill the GPU, the K dimension is split across programs and a second kernel adds the
partial sums in a fixed order (no atomics: every run gives the same bits).

On sm_90 and later, the kernels use programmatic dependent launch: each program lets the next
kernel launch at once and waits for the previous kernel's results only where it first reads
them, so launches overlap instead of leaving gaps. Rounding follows the torch path:
the residual sum and the normed rows are rounded to the storage dtype, products accumulate in
float32, and the gate and up halves are rounded before ``silu(gate) * up``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import tl, triton, use_triton
from .rms_norm import add_rms_norm
from .silu_mul import silu_mul

MAX_ROWS = 64
TARGET_PROGRAMS = 264  # two per SM of an H200
REDUCE_BLOCK = 1024


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [T, K]``."""
    if not takes(x, weight):
        return F.linear(x, weight, bias)
    return _launch(x, None, None, 0.0, weight, bias, gated=False)[0]


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(linear(rms_norm(x + residual) * norm_weight), x + residual)``, see ``add_rms_norm``.

    With ``gated`` the product is ``[T, 2I]`` (gate then up) and ``silu(gate) * up`` ``[T, I]``
    is returned in its place.
    """
    if not takes(x, weight):
        normed, residual = add_rms_norm(x, residual, norm_weight, eps)
        out = F.linear(normed, weight, bias)
        return (silu_mul(out) if gated else out), residual
    return _launch(x, residual, norm_weight, eps, weight, bias, gated)


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (use_triton(x) and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS
            and weight.stride(1) == 1 and x.dtype == weight.dtype)


@functools.lru_cache(maxsize=None)
def programmatic_launch(device_index: int) -> bool:
    """Whether kernels on this device may overlap their launch with the previous kernel."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def config(rows: int, n: int, k: int, gated: bool, dtype: torch.dtype) -> dict:
    """Tile sizes and K split for a ``[rows, k] x [k, n]`` product (``n`` outputs per half)."""
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    block_n = 32 if rows <= 16 else 64
    block_k = 128 if dtype != torch.float32 else 32
    programs = triton.cdiv(n, block_n) * triton.cdiv(rows, block_m)
    split = 1
    while (not gated and programs * split * 2 <= TARGET_PROGRAMS
           and k // (split * 2) >= 4 * block_k):
        split *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                num_warps=4, num_stages=4, DOT=True)


def _launch(x, residual, norm_weight, eps, weight, bias, gated):
    x = x.contiguous()
    rows, k = x.shape
    n = weight.shape[0] // (2 if gated else 1)
    norm = norm_weight is not None
    has_residual = residual is not None
    new_residual = x
    if has_residual:
        residual = residual.contiguous()
        assert residual.shape == x.shape
        new_residual = torch.empty_like(x)
    cfg = config(rows, n, k, gated, x.dtype)
    split = cfg["SPLIT_K"]
    out = x.new_empty(rows, n)
    part = out if split == 1 else x.new_empty(split, rows, n, dtype=torch.float32)
    pdl = programmatic_launch(x.device.index if x.device.index is not None else 0)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, triton.cdiv(rows, cfg["BLOCK_M"]))
    span = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]  # K per split
    _matmul_kernel[grid](
        x, residual if has_residual else x, new_residual, norm_weight if norm else x, weight,
        bias if bias is not None else x, part, rows, n, k, weight.stride(0), span, eps,
        NORM=norm, HAS_RESIDUAL=has_residual, GATED=gated, HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, PDL=pdl, launch_pdl=pdl, **cfg)
    if split > 1:
        _reduce_kernel[(rows, triton.cdiv(n, REDUCE_BLOCK))](
            part, bias if bias is not None else x, out, rows, n, SPLIT_K=split,
            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, PDL=pdl, launch_pdl=pdl, num_warps=4)
    return out, new_residual


if triton is not None:
    @triton.jit
    def _rows(x_ptr, res_ptr, rm, k, rows, K, HAS_RESIDUAL: tl.constexpr):
        """``x`` (plus the residual, rounded to the storage dtype) at rows ``rm``, columns ``k``."""
        mask = (rm < rows)[:, None] & (k < K)[None, :]
        off = rm.to(tl.int64)[:, None] * K + k[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + off, mask=mask, other=0.0)
            x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        return x, off, mask

    @triton.jit
    def _dot(a, w, acc, IEEE: tl.constexpr, DOT: tl.constexpr):
        """``acc + a @ w.T``: on tensor cores, or (a few rows) as broadcast products."""
        if not DOT:
            return acc + tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
        if IEEE:
            return tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        return tl.dot(a, tl.trans(w), acc)

    @triton.jit
    def _round(acc, b_ptr, rn, n_mask, dtype, HAS_BIAS: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        return acc.to(dtype)

    @triton.jit
    def _matmul_kernel(x_ptr, res_ptr, new_res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, rows, N, K,
                       w_stride, span, eps, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                       GATED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                       PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr):
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * w_stride  # the gate rows when GATED
        k_first = pid_k * span
        if PDL:
            tl.extra.cuda.gdc_wait()
        dtype = x_ptr.dtype.element_ty
        rstd = tl.zeros((BLOCK_M,), tl.float32)
        if NORM:  # the rows' RMS over all of K; one program per row block stores the residual
            squares = tl.zeros((BLOCK_M,), tl.float32)
            writes = (pid_n + pid_k) == 0
            for k0 in range(0, K, BLOCK_K):
                x, off, mask = _rows(x_ptr, res_ptr, rm, k0 + kk, rows, K, HAS_RESIDUAL)
                xf = x.to(tl.float32)
                squares += tl.sum(xf * xf, axis=1)
                if HAS_RESIDUAL:
                    tl.store(new_res_ptr + off, x, mask=mask & writes)
            rstd = tl.rsqrt(squares / K + eps)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, span, BLOCK_K):  # masked past K
            k = k_first + k0 + kk
            a, _, _ = _rows(x_ptr, res_ptr, rm, k, rows, K, NORM and HAS_RESIDUAL)
            if NORM:
                nw = tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                normed = (a.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
                a = (normed * nw[None, :]).to(dtype)
            w_mask = n_mask[:, None] & (k < K)[None, :]
            acc = _dot(a, tl.load(w_rows + k[None, :], mask=w_mask, other=0.0), acc, IEEE, DOT)
            if GATED:
                up = tl.load(w_rows + N * w_stride + k[None, :], mask=w_mask, other=0.0)
                acc_up = _dot(a, up, acc_up, IEEE, DOT)
        out_mask = (rm < rows)[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            y = _round(acc, b_ptr, rn, n_mask, dtype, HAS_BIAS)
            if GATED:
                gate = y.to(tl.float32)
                silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
                up = _round(acc_up, b_ptr + N, rn, n_mask, dtype, HAS_BIAS).to(tl.float32)
                y = (silu * up).to(dtype)
            tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y, mask=out_mask)
        else:  # float32 partial sums [SPLIT_K, rows, N]
            part = out_ptr + (pid_k * rows + rm.to(tl.int64))[:, None] * N + rn[None, :]
            tl.store(part, acc, mask=out_mask)

    @triton.jit
    def _reduce_kernel(part_ptr, b_ptr, out_ptr, rows, N, SPLIT_K: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + (s * rows + row) * N + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
