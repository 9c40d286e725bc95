"""Rotary embedding of q and k plus the KV-cache write, in one kernel per layer.

The input is the fused qkv projection ``[T, (H + 2 * H_kv) * D]``. Each program takes one head
of one token: a query head is (optionally RMS-normed, for Qwen3's q/k-norm,) rotated and written
to the returned ``q``; a key head is normed, rotated and stored at the token's cache slot along
with the matching value head. ``cos``/``sin`` are float32 ``[T, D/2]``; the rotation is
rotate-half style, computed in float32 and rounded once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import launch_then_wait, programmatic_launch, tl, triton, use_triton


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                   slots: torch.Tensor, heads: int, kv_heads: int, dim: int,
                   q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """Rotate q and k, write k and v to ``cache[2, N, bs, H_kv, D]`` at flat ``slots``; return q."""
    if not use_triton(qkv):
        return _rope_and_cache_torch(qkv, cos, sin, cache, slots, heads, kv_heads, dim,
                                     q_norm, k_norm, eps)
    tokens = qkv.shape[0]
    assert qkv.stride(-1) == 1 and cache.is_contiguous()
    q = qkv.new_empty(tokens, heads, dim)
    qk_norm = q_norm is not None
    half_pad = triton.next_power_of_2(dim // 2)
    pdl = programmatic_launch(qkv)
    _rope_kv_kernel[(tokens, heads + kv_heads)](
        qkv, cos, sin, q_norm if qk_norm else cos, k_norm if qk_norm else cos, q, cache, slots,
        qkv.stride(0), cache.stride(0), eps, HEADS=heads, KV_HEADS=kv_heads, DIM=dim,
        HALF_PAD=half_pad, QK_NORM=qk_norm, PDL=pdl, launch_pdl=pdl, num_warps=1)
    return q


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``[T, H, D]`` in float32, rounded to ``x``'s dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def _rope_and_cache_torch(qkv, cos, sin, cache, slots, heads, kv_heads, dim, q_norm, k_norm, eps):
    q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    q, k = q.reshape(-1, heads, dim), k.reshape(-1, kv_heads, dim)
    if q_norm is not None:
        q, k = F.rms_norm(q, (dim,), q_norm, eps), F.rms_norm(k, (dim,), k_norm, eps)
    flat = cache.view(2, -1, *cache.shape[3:])
    flat[0].index_copy_(0, slots, rotate(k, cos, sin))
    flat[1].index_copy_(0, slots, v.reshape(-1, kv_heads, dim))
    return rotate(q, cos, sin)


rotated_heads = None  # the CPU-only install has no kernels to call it
if triton is not None:
    @triton.jit
    def rotated_heads(src, offsets, mask, cos, sin, w_ptr, half, half_mask, eps,
                      QK_NORM: tl.constexpr, DIM: tl.constexpr):
        """The heads ``[N, HALF_PAD]`` whose first halves are at ``src + offsets`` (the second
        halves DIM/2 further), RMS-normed by ``w_ptr`` (QK_NORM) and rotated by ``cos``/``sin``
        ``[HALF_PAD]``, as two halves; rounded to the storage dtype after the norm and after
        the rotation. Decode attention rotates its heads with it too."""
        x1 = tl.load(src + offsets, mask=mask, other=0.0)
        x2 = tl.load(src + offsets + DIM // 2, mask=mask, other=0.0)
        dtype = x1.dtype
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        if QK_NORM:
            rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / DIM + eps)
            w1 = tl.load(w_ptr + half, mask=half_mask, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + DIM // 2 + half, mask=half_mask, other=0.0).to(tl.float32)
            x1 = (x1 * rstd[:, None] * w1[None, :]).to(dtype).to(tl.float32)
            x2 = (x2 * rstd[:, None] * w2[None, :]).to(dtype).to(tl.float32)
        return ((x1 * cos[None, :] - x2 * sin[None, :]).to(dtype),
                (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype))

    @triton.jit
    def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, cache_ptr, slot_ptr,
                        qkv_stride, kv_plane, eps, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                        DIM: tl.constexpr, HALF_PAD: tl.constexpr, QK_NORM: tl.constexpr,
                        PDL: tl.constexpr):
        launch_then_wait(PDL)
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        half = tl.arange(0, HALF_PAD)
        mask = half < DIM // 2
        cos = tl.load(cos_ptr + tok * (DIM // 2) + half, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + tok * (DIM // 2) + half, mask=mask, other=0.0)
        src = qkv_ptr + tok * qkv_stride + head * DIM
        head_off, head_mask = half[None, :], mask[None, :]  # one head, [1, HALF_PAD]
        if head < HEADS:
            x1, x2 = rotated_heads(src, head_off, head_mask, cos, sin, qw_ptr, half, mask, eps,
                                   QK_NORM, DIM)
            dst = q_ptr + (tok * HEADS + head) * DIM
        else:
            x1, x2 = rotated_heads(src, head_off, head_mask, cos, sin, kw_ptr, half, mask, eps,
                                   QK_NORM, DIM)
            slot = tl.load(slot_ptr + tok)
            dst = cache_ptr + slot * (KV_HEADS * DIM) + (head - HEADS) * DIM
            v1 = tl.load(src + KV_HEADS * DIM + half, mask=mask, other=0.0)
            v2 = tl.load(src + KV_HEADS * DIM + DIM // 2 + half, mask=mask, other=0.0)
            tl.store(dst + kv_plane + half, v1, mask=mask)
            tl.store(dst + kv_plane + DIM // 2 + half, v2, mask=mask)
        tl.store(dst + head_off, x1, mask=head_mask)
        tl.store(dst + DIM // 2 + head_off, x2, mask=head_mask)
