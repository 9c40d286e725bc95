"""Decode attention (one query token per row) with the rotary embedding and the KV-cache write
fused in, reading the cache in place.

The input is the fused qkv projection ``[B, (H + 2 * H_kv) * D]`` of each row's new token. Each
program takes one row, one KV head (with the query heads of its GQA group) and one split of the
row's keys. It rotates its query heads and the new key (RMS-normed first for Qwen3's q/k-norm)
with :mod:`engine.kernels.rope_kv`'s ``rotated_heads``, walks the row's block table through the
cached keys of its split with an online softmax, and the split that holds the new position adds
the new key and value from registers; split 0 also writes them to the cache at the row's slot.
No program reads the slot another one writes, so one kernel replaces rope_kv's and attention's.
Only the row's own keys are read: no gather into a padded ``[B, kv_len]`` copy and no mask.

When rows x KV heads are too few to fill the GPU, the keys are split (flash-decoding) and a
second kernel merges the partial results; the split count depends only on shapes, so the launch
is the same in every replay of a CUDA graph. The query heads of a group are padded to 16 rows
and each head dim is handled as its two rotary halves, so that q.k and p.v run on tensor cores
(``tl.dot``, which also lets Triton pipeline the key and value loads); p is rounded to the cache
dtype before p.v, as flash attention does. Decode programs are short (a few blocks of keys
each), so the kernel is bound by the latency of its dependent loads (position, block table,
keys): many small programs hide it best. The constants below are the best of a sweep on the
H200 (``docs/benchmarks.md``).
"""
from __future__ import annotations

import torch

from . import launch_then_wait, programmatic_launch, tl, triton
from .rope_kv import rotated_heads

KEYS_PER_ITERATION = 16  # one block of the default block size
TARGET_PROGRAMS = 2048  # rows x KV heads x splits: about 15 per SM of an H200
MAX_SPLITS = 16
NUM_WARPS = 2


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
                     positions: torch.Tensor, heads: int, kv_heads: int, dim: int, scale: float,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """Row b's new token (at ``positions[b]``, cache slot ``slots[b]``) attends to keys
    ``0..positions[b]`` of its row, itself included; returns ``[B, H, D]``.

    ``cache`` is one layer's ``[2, N, block_size, H_kv, D]``; ``cos``/``sin`` are float32
    ``[B, D/2]``; ``positions`` is ``[B]`` or a ``[B, 1]`` view. Same result as
    ``rope_and_cache`` followed by attention over the cache.
    """
    rows = qkv.shape[0]
    block_size = cache.shape[2]
    assert cache.shape[3:] == (kv_heads, dim) and cache.is_contiguous()
    assert qkv.stride(-1) == 1 and block_tables.stride(-1) == 1
    out = qkv.new_empty(rows, heads, dim)
    wanted = max(1, min(MAX_SPLITS, TARGET_PROGRAMS // (rows * kv_heads)))
    splits = 1 << (wanted.bit_length() - 1)  # a power of two
    if splits > 1:  # unnormalised partial outputs, their running max and softmax denominator
        part_out = qkv.new_empty(rows, heads, splits, dim, dtype=torch.float32)
        part_max = qkv.new_empty(rows, heads, splits, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out
    qk_norm = q_norm is not None
    group = heads // kv_heads
    pdl = programmatic_launch(qkv)
    _decode_kernel[(rows, kv_heads, splits)](
        qkv, cos, sin, q_norm if qk_norm else cos, k_norm if qk_norm else cos, slots, cache,
        block_tables, positions, out, part_out, part_max, part_sum, scale, eps, qkv.stride(0),
        cache.stride(0), block_tables.stride(0), positions.stride(0), BLOCK_SIZE=block_size,
        HEADS=heads, KV_HEADS=kv_heads, DIM=dim, GROUP=group,
        GROUP_PAD=max(triton.next_power_of_2(group), 16),
        HALF_PAD=max(triton.next_power_of_2(dim // 2), 16), BLOCK_N=KEYS_PER_ITERATION,
        SPLITS=splits, QK_NORM=qk_norm, IEEE=qkv.dtype == torch.float32, PDL=pdl,
        launch_pdl=pdl, num_warps=NUM_WARPS)
    if splits > 1:
        _merge_kernel[(rows, heads)](part_out, part_max, part_sum, out, DIM=dim,
                                     DIM_PAD=triton.next_power_of_2(dim), SPLITS=splits,
                                     PDL=pdl, launch_pdl=pdl, num_warps=1)
    return out


if triton is not None:
    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` in float32: exact float32 products for a float32 cache, not TF32."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _decode_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr, cache_ptr,
                       tables_ptr, pos_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
                       scale, eps, qkv_stride, kv_plane, table_stride, pos_stride,
                       BLOCK_SIZE: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                       DIM: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       HALF_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
                       QK_NORM: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        launch_then_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, GROUP_PAD)
        h = tl.arange(0, HALF_PAD)
        h_mask = h < DIM // 2
        q_mask = (g < GROUP)[:, None] & h_mask[None, :]
        cos = tl.load(cos_ptr + row * (DIM // 2) + h, mask=h_mask, other=0.0)
        sin = tl.load(sin_ptr + row * (DIM // 2) + h, mask=h_mask, other=0.0)
        src = qkv_ptr + row * qkv_stride
        q1, q2 = rotated_heads(src, (kv_head * GROUP + g)[:, None] * DIM + h[None, :], q_mask,
                               cos, sin, qw_ptr, h, h_mask, eps, QK_NORM, DIM)
        new_off, new_mask = h[None, :], h_mask[None, :]  # the new token's head, [1, HALF_PAD]
        k1, k2 = rotated_heads(src + (HEADS + kv_head) * DIM, new_off, new_mask, cos, sin,
                               kw_ptr, h, h_mask, eps, QK_NORM, DIM)
        v_src = src + (HEADS + KV_HEADS + kv_head) * DIM
        v1 = tl.load(v_src + new_off, mask=new_mask, other=0.0)
        v2 = tl.load(v_src + new_off + DIM // 2, mask=new_mask, other=0.0)
        seq_len = tl.load(pos_ptr + row * pos_stride) + 1
        head_row = cache_ptr + kv_head * DIM + new_off  # + slot * KV_HEADS * DIM
        if split == 0:
            dst = head_row + tl.load(slot_ptr + row) * (KV_HEADS * DIM)
            tl.store(dst, k1, mask=new_mask)
            tl.store(dst + DIM // 2, k2, mask=new_mask)
            tl.store(dst + kv_plane, v1, mask=new_mask)
            tl.store(dst + kv_plane + DIM // 2, v2, mask=new_mask)
        per_split = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
        first = split * per_split
        last = tl.minimum(first + per_split, seq_len)
        cached = tl.minimum(last, seq_len - 1)  # the new key comes from registers, not the cache
        m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        denom = tl.zeros((GROUP_PAD,), tl.float32)
        acc1 = tl.zeros((GROUP_PAD, HALF_PAD), tl.float32)
        acc2 = tl.zeros((GROUP_PAD, HALF_PAD), tl.float32)
        for start in range(first, cached, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_mask = n < cached
            block = tl.load(tables_ptr + row * table_stride + n // BLOCK_SIZE, mask=n_mask,
                            other=0)
            kv_off = ((block * BLOCK_SIZE + n % BLOCK_SIZE) * (KV_HEADS * DIM))[:, None] \
                + kv_head * DIM + h[None, :]
            kv_mask = n_mask[:, None] & h_mask[None, :]
            kc1 = tl.load(cache_ptr + kv_off, mask=kv_mask, other=0.0)
            kc2 = tl.load(cache_ptr + kv_off + DIM // 2, mask=kv_mask, other=0.0)
            s = _dot(q1, tl.trans(kc1), IEEE) + _dot(q2, tl.trans(kc2), IEEE)
            s = tl.where(n_mask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            vc1 = tl.load(cache_ptr + kv_plane + kv_off, mask=kv_mask, other=0.0)
            vc2 = tl.load(cache_ptr + kv_plane + kv_off + DIM // 2, mask=kv_mask, other=0.0)
            acc1 = acc1 * alpha[:, None] + _dot(p.to(vc1.dtype), vc1, IEEE)
            acc2 = acc2 * alpha[:, None] + _dot(p.to(vc1.dtype), vc2, IEEE)
            denom = denom * alpha + tl.sum(p, axis=1)
            m = m_new
        if (first < seq_len) & (seq_len <= last):  # this split holds the new position
            s = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32), axis=1)
                 + tl.sum(q2.to(tl.float32) * k2.to(tl.float32), axis=1)) * scale
            m_new = tl.maximum(m, s)
            p = tl.exp(s - m_new)
            alpha = tl.exp(m - m_new)
            weight = p.to(v1.dtype).to(tl.float32)[:, None]
            acc1 = acc1 * alpha[:, None] + weight * v1.to(tl.float32)
            acc2 = acc2 * alpha[:, None] + weight * v2.to(tl.float32)
            denom = denom * alpha + p
            m = m_new
        heads = row * HEADS + kv_head * GROUP + g  # [GROUP_PAD]
        if SPLITS == 1:
            dst = out_ptr + heads[:, None] * DIM + h[None, :]
            tl.store(dst, (acc1 / denom[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
            tl.store(dst + DIM // 2, (acc2 / denom[:, None]).to(out_ptr.dtype.element_ty),
                     mask=q_mask)
        else:
            part = heads * SPLITS + split
            dst = part_out_ptr + part[:, None] * DIM + h[None, :]
            tl.store(dst, acc1, mask=q_mask)
            tl.store(dst + DIM // 2, acc2, mask=q_mask)
            tl.store(part_max_ptr + part, m, mask=g < GROUP)
            tl.store(part_sum_ptr + part, denom, mask=g < GROUP)

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
