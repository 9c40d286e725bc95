"""The oracle: a toy LM whose logits are an exact integer function of each row's token history.

It stores token ids in a paged cache (so block-table bugs change its output) and derives logits
from an integer hash of the whole history read back through the block table. Integer sums do not
depend on batch layout, so its outputs are exactly batch-invariant: ideal for async-vs-sync diffs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..hashing import GOLDEN, mix32
from .attention import AttentionMetadata


@dataclass(frozen=True)
class OracleConfig:
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = (0,)
    logit_spread: float = 10.0


class OracleModel(nn.Module):
    """Same interface as the real models: ``forward`` then ``compute_logits``."""

    def __init__(self, config: OracleConfig = OracleConfig()) -> None:
        super().__init__()
        self.config = config
        weights = mix32(torch.arange(config.max_position_embeddings, dtype=torch.int64) + 12345)
        self.register_buffer("position_weights", weights >> 12, persistent=False)

    kv_cache_dtype = torch.int64

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        kv_cache.view(-1).index_copy_(0, meta.slot_mapping, input_ids)
        history = kv_cache[meta.block_tables[meta.token_rows]].reshape(len(input_ids), meta.kv_len)
        keys = torch.arange(meta.kv_len, device=input_ids.device)
        visible = keys[None, :] <= positions[:, None]
        terms = (history + 1) * self.position_weights[:meta.kv_len][None, :]
        return torch.where(visible, terms, 0).sum(dim=1, keepdim=True)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        row = mix32(hidden[:, 0])
        cols = torch.arange(self.config.vocab_size, device=hidden.device, dtype=torch.int64)
        bits = mix32(row[:, None] + cols[None, :] * GOLDEN) >> 8
        spread = self.config.logit_spread
        return bits.float() * (spread / float(1 << 24)) - spread / 2
