"""Paged KV cache bookkeeping: a pool of fixed-size blocks and per-request block tables."""
from __future__ import annotations

from collections import deque


class BlockPool:
    """Free list of block ids ``0..num_blocks-1``."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        assert n <= len(self._free), f"asked for {n} blocks, {len(self._free)} free"
        return [self._free.popleft() for _ in range(n)]

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
        assert len(self._free) <= self.num_blocks, "a block was freed twice"


class KVCacheManager:
    """Owns every request's block table; a request holds blocks for all its computed tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request_id: str, total_tokens: int) -> int:
        """Blocks ``request_id`` must add so that its table covers ``total_tokens`` tokens."""
        held = len(self.block_tables.get(request_id, ()))
        return max(0, self.blocks_for(total_tokens) - held)

    def can_allocate(self, request_id: str, total_tokens: int) -> bool:
        return self.num_new_blocks(request_id, total_tokens) <= self.pool.num_free

    def allocate(self, request_id: str, total_tokens: int) -> None:
        """Grow ``request_id``'s table to cover ``total_tokens``; caller checked can_allocate."""
        n = self.num_new_blocks(request_id, total_tokens)
        self.block_tables.setdefault(request_id, []).extend(self.pool.take(n))

    def free(self, request_id: str) -> None:
        self.pool.give_back(self.block_tables.pop(request_id, []))
