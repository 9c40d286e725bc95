"""Paged attention for decode rows (one query token per row), reading the cache in place.

Each program takes one row and one KV head, with the query heads of its GQA group, and walks
the row's block table up to the row's length (its position + 1) with an online softmax. Only the
row's own keys are read: no gather into a padded ``[B, kv_len]`` copy and no mask.
"""
from __future__ import annotations

import torch

from . import tl, triton

KEYS_PER_ITERATION = 32


def decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                     positions: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [B, H, D]`` attends to keys ``0..positions[b]`` of its row; returns ``[B, H, D]``.

    ``cache`` is one layer's ``[2, N, block_size, H_kv, D]``; ``positions`` is ``[B]`` or a
    ``[B, 1]`` view.
    """
    rows, heads, dim = q.shape
    block_size, kv_heads = cache.shape[2], cache.shape[3]
    q = q.contiguous()
    assert cache.is_contiguous() and block_tables.stride(-1) == 1
    out = torch.empty_like(q)
    group = heads // kv_heads
    _decode_kernel[(rows, kv_heads)](
        q, cache, block_tables, positions, out, scale, cache.stride(0), block_tables.stride(0),
        positions.stride(0), BLOCK_SIZE=block_size, HEADS=heads, KV_HEADS=kv_heads, DIM=dim,
        GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 2),
        DIM_PAD=triton.next_power_of_2(dim), BLOCK_N=KEYS_PER_ITERATION, num_warps=4)
    return out


if triton is not None:
    @triton.jit
    def _decode_kernel(q_ptr, cache_ptr, tables_ptr, pos_ptr, out_ptr, scale, kv_plane,
                       table_stride, pos_stride, BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr,
                       KV_HEADS: tl.constexpr, DIM: tl.constexpr, GROUP: tl.constexpr,
                       GROUP_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        q_mask = (g < GROUP)[:, None] & (d < DIM)[None, :]
        q_off = (row * HEADS + kv_head * GROUP + g)[:, None] * DIM + d[None, :]
        q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32) * scale
        seq_len = tl.load(pos_ptr + row * pos_stride) + 1
        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        denom = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, DIM_PAD), tl.float32)
        for start in range(0, seq_len, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < seq_len
            block = tl.load(tables_ptr + row * table_stride + n // BLOCK_SIZE, mask=n_mask,
                            other=0)
            slot = block * BLOCK_SIZE + n % BLOCK_SIZE
            kv_off = slot[:, None] * (KV_HEADS * DIM) + kv_head * DIM + d[None, :]
            kv_mask = n_mask[:, None] & (d < DIM)[None, :]
            k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(cache_ptr + kv_plane + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / denom[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=q_mask)
