"""Counter-based integer hashing on tensors: the same bits on every device and batch layout."""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # small enough that (2**32 - 1) * _MUL stays inside int64
GOLDEN = 0x9E3779B1


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit mixer over int64 tensors holding values in ``[0, 2**32)``."""
    x = x & MASK32
    x = ((x >> 16) ^ x) * _MUL & MASK32
    x = ((x >> 16) ^ x) * _MUL & MASK32
    return (x >> 16) ^ x


def mix32_int(x: int) -> int:
    """``mix32`` on a Python int (for host-side seed derivation): the same integer steps."""
    x &= MASK32
    x = ((x >> 16) ^ x) * _MUL & MASK32
    x = ((x >> 16) ^ x) * _MUL & MASK32
    return (x >> 16) ^ x


def seed_key(seed: int, domain: int = 0) -> int:
    """Fold a non-negative seed of any size into a 32-bit key.

    Each 32-bit word is mixed with its index, so ``h`` and ``h << 32`` differ; ``domain`` keeps
    user seeds (0) apart from keys the engine derives for unseeded requests (1).
    """
    key = mix32_int(GOLDEN ^ domain)
    index = 0
    while True:
        key = mix32_int(key ^ mix32_int((seed & MASK32) + index * GOLDEN))
        seed >>= 32
        index += 1
        if not seed:
            return key


def uniform_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[B, V]`` floats in (0, 1), a pure function of (key, position, token)."""
    row = mix32(keys + mix32(positions * GOLDEN))
    cols = torch.arange(vocab_size, device=keys.device, dtype=torch.int64) * GOLDEN
    bits = mix32(row[:, None] ^ mix32(cols)[None, :]) >> 8
    return (bits.float() + 0.5) / float(1 << 24)
