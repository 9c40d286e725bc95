"""Paged attention in plain torch over block tables, for mixed prefill/decode batches.

The flat token batch ``[T]`` is scattered into a padded query block ``[B, q_max]`` (row = request,
column = index of the token within the request's chunk); every row's keys and values are gathered
from the paged cache through its block table into ``[B, kv_len]``. A key at position j is visible
to a query at position p when j <= p, which is causal attention within the chunk and full attention
over the cached prefix. All shapes are known on the host, so nothing here syncs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step tensors (on the device) that tell attention where every token goes."""

    slot_mapping: torch.Tensor   # [T] flat cache slot of each new token
    block_tables: torch.Tensor   # [B, kv_len // block_size]
    token_rows: torch.Tensor     # [T] row of each token
    token_cols: torch.Tensor     # [T] index of each token within its row's chunk
    query_positions: torch.Tensor  # [B, q_max] absolute position of each padded query
    q_max: int
    kv_len: int

    def visible(self) -> torch.Tensor:
        """[B, 1, q_max, kv_len] bool: which cached keys each padded query may attend to."""
        keys = torch.arange(self.kv_len, device=self.query_positions.device)
        return (keys[None, None, :] <= self.query_positions[:, :, None]).unsqueeze(1)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store new keys/values ``[T, H_kv, D]`` at flat ``slots`` of ``cache[2, N, bs, H_kv, D]``."""
    flat = cache.view(2, -1, *cache.shape[3:])
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                    mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of flat queries ``[T, H, D]`` over the paged cache; returns ``[T, H, D]``.

    ``mask`` is boolean (True = visible), broadcastable to ``[B, H, q_max, kv_len]``.
    """
    num_rows = meta.block_tables.shape[0]
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = cache.shape[3]
    # gather each of K and V on its leading dim: a single gather over dim 1 is ~2x slower
    keys = cache[0][meta.block_tables].reshape(num_rows, meta.kv_len, kv_heads, dim)
    values = cache[1][meta.block_tables].reshape(num_rows, meta.kv_len, kv_heads, dim)
    decode = meta.q_max == 1 and q.shape[0] == num_rows  # one token per row: no padding
    if decode:
        padded = q[:, None]
    else:
        padded = q.new_zeros(num_rows, meta.q_max, heads, dim)
        padded[meta.token_rows, meta.token_cols] = q
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads).transpose(1, 2)
    return out[:, 0] if decode else out[meta.token_rows, meta.token_cols]
