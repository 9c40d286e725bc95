"""Paged attention in plain torch over block tables, for mixed prefill/decode batches.

The flat token batch ``[T]`` is scattered into a padded query block ``[B, q_max]`` (row = request,
column = index of the token within the request's chunk); every row's keys and values are gathered
from the paged cache through its block table into ``[B, kv_len]``. A key at position j is visible
to a query at position p when j <= p, which is causal attention within the chunk and full attention
over the cached prefix. All shapes are known on the host, so nothing here syncs.

On CUDA with Triton, decode-only batches take :mod:`engine.kernels.decode_attention` instead,
which also applies the rotary embedding and writes the new keys and values, and reads each row's
own blocks in place (``Attention.forward`` in :mod:`engine.models.llama` picks the path).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kernels import use_triton


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
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def visible(self) -> torch.Tensor:
        """[B, 1, q_max, kv_len] bool: which cached keys each padded query may attend to.

        Built on first use and shared by every layer of the step.
        """
        if self._mask is None:
            keys = torch.arange(self.kv_len, device=self.query_positions.device)
            self._mask = (keys[None, None, :] <= self.query_positions[:, :, None]).unsqueeze(1)
        return self._mask


def takes_decode_kernel(x: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether a step's attention runs the fused decode kernel: one token per row, on CUDA."""
    return meta.q_max == 1 and x.shape[0] == meta.block_tables.shape[0] and use_triton(x)


def torch_paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
    """The plain-torch path: gather each row's keys and values, then masked SDPA."""
    num_rows = meta.block_tables.shape[0]
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = cache.shape[3]
    decode = meta.q_max == 1 and q.shape[0] == num_rows  # one token per row: no padding
    # gather each of K and V on its leading dim: a single gather over dim 1 is ~2x slower
    keys = cache[0][meta.block_tables].reshape(num_rows, meta.kv_len, kv_heads, dim)
    values = cache[1][meta.block_tables].reshape(num_rows, meta.kv_len, kv_heads, dim)
    if decode:
        padded = q[:, None]
    else:
        padded = q.new_zeros(num_rows, meta.q_max, heads, dim)
        padded[meta.token_rows, meta.token_cols] = q
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=meta.visible(), scale=scale, enable_gqa=kv_heads != heads).transpose(1, 2)
    return out[:, 0] if decode else out[meta.token_rows, meta.token_cols]
