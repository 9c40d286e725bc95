"""Paged attention for decode rows (one query token per row), reading the cache in place.

Each program takes one row, one KV head (with the query heads of its GQA group) and one split
of the row's keys, and walks the row's block table through that split with an online softmax.
Only the row's own keys are read: no gather into a padded ``[B, kv_len]`` copy and no mask.
When rows x KV heads are too few to fill the GPU (small batches), the keys are split
(flash-decoding) and a second kernel merges the partial results; the split count depends only
on shapes, so the launch is the same in every replay of a CUDA graph.

The query heads of a group are padded to 16 rows so that q.k and p.v run on tensor cores
(``tl.dot``, which also lets Triton pipeline the key and value loads); p is rounded to the cache
dtype before p.v, as flash attention does. Decode programs are short (a few blocks of keys each),
so the kernel is bound by the latency of its dependent loads (position, block table, keys):
many small programs hide it best. The constants below are the best of a sweep on the H200
(``docs/benchmarks.md``).
"""
from __future__ import annotations

import torch

from . import launch_then_wait, programmatic_launch, tl, triton

KEYS_PER_ITERATION = 16  # one block of the default block size
TARGET_PROGRAMS = 2048  # rows x KV heads x splits: about 15 per SM of an H200
MAX_SPLITS = 16
NUM_WARPS = 2


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
    wanted = max(1, min(MAX_SPLITS, TARGET_PROGRAMS // (rows * kv_heads)))
    splits = 1 << (wanted.bit_length() - 1)  # a power of two
    if splits > 1:  # unnormalised partial outputs, their running max and softmax denominator
        part_out = q.new_empty(rows, heads, splits, dim, dtype=torch.float32)
        part_max = q.new_empty(rows, heads, splits, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out
    dim_pad = triton.next_power_of_2(dim)
    pdl = programmatic_launch(q)
    _decode_kernel[(rows, kv_heads, splits)](
        q, cache, block_tables, positions, out, part_out, part_max, part_sum, scale,
        cache.stride(0), block_tables.stride(0), positions.stride(0), BLOCK_SIZE=block_size,
        HEADS=heads, KV_HEADS=kv_heads, DIM=dim, GROUP=group,
        GROUP_PAD=max(triton.next_power_of_2(group), 16), DIM_PAD=dim_pad,
        BLOCK_N=KEYS_PER_ITERATION, SPLITS=splits, IEEE=q.dtype == torch.float32,
        PDL=pdl, launch_pdl=pdl, num_warps=NUM_WARPS)
    if splits > 1:
        _merge_kernel[(rows, heads)](part_out, part_max, part_sum, out, DIM=dim, DIM_PAD=dim_pad,
                                     SPLITS=splits, PDL=pdl, launch_pdl=pdl, num_warps=1)
    return out


if triton is not None:
    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` in float32: exact float32 products for a float32 cache, not TF32."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _decode_kernel(q_ptr, cache_ptr, tables_ptr, pos_ptr, out_ptr, part_out_ptr, part_max_ptr,
                       part_sum_ptr, scale, kv_plane, table_stride, pos_stride,
                       BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                       DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                       IEEE: tl.constexpr, PDL: tl.constexpr):
        launch_then_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        q_mask = (g < GROUP)[:, None] & (d < DIM)[None, :]
        q_off = (row * HEADS + kv_head * GROUP + g)[:, None] * DIM + d[None, :]
        q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
        seq_len = tl.load(pos_ptr + row * pos_stride) + 1
        per_split = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
        first = split * per_split
        last = tl.minimum(first + per_split, seq_len)
        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        denom = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, DIM_PAD), tl.float32)
        for start in range(first, last, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < last
            block = tl.load(tables_ptr + row * table_stride + n // BLOCK_SIZE, mask=n_mask,
                            other=0)
            slot = block * BLOCK_SIZE + n % BLOCK_SIZE
            kv_off = slot[:, None] * (KV_HEADS * DIM) + kv_head * DIM + d[None, :]
            kv_mask = n_mask[:, None] & (d < DIM)[None, :]
            k = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)
            s = tl.where(n_mask[None, :], _dot(q, tl.trans(k), IEEE) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(cache_ptr + kv_plane + kv_off, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        if SPLITS == 1:
            tl.store(out_ptr + q_off, (acc / denom[:, None]).to(out_ptr.dtype.element_ty),
                     mask=q_mask)
        else:
            head = (row * HEADS + kv_head * GROUP + g) * SPLITS + split  # [GROUP_PAD]
            tl.store(part_out_ptr + head[:, None] * DIM + d[None, :], acc, mask=q_mask)
            tl.store(part_max_ptr + head, m, mask=g < GROUP)
            tl.store(part_sum_ptr + head, denom, mask=g < GROUP)

    @triton.jit
    def _merge_kernel(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, DIM: tl.constexpr,
                      DIM_PAD: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
        """Combine one head's splits; an empty split has max -inf and weighs zero."""
        launch_then_wait(PDL)
        head = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, DIM_PAD)
        m = tl.load(part_max_ptr + head * SPLITS + s)
        weight = tl.exp(m - tl.max(m, axis=0))
        denom = tl.sum(tl.load(part_sum_ptr + head * SPLITS + s) * weight, axis=0)
        part = tl.load(part_out_ptr + (head * SPLITS + s)[:, None] * DIM + d[None, :],
                       mask=(d < DIM)[None, :], other=0.0)
        out = tl.sum(part * weight[:, None], axis=0) / denom
        tl.store(out_ptr + head * DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < DIM)
