"""The device layer: where device work runs and how host data reaches it.

``cpu`` runs everything at once on host tensors; ``cuda`` uses real streams, events and pinned
memory. Every host-to-device input goes through :class:`HostBuffer`, the one staging-buffer type,
so later layers (fences, the race checker) have a single place to hook.
"""
from __future__ import annotations

import numpy as np
import torch


class Device:
    """A compute device as the engine sees it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.torch_device = torch.device("cuda" if kind == "cuda" else "cpu")
        self.pin_memory = kind == "cuda"

    def zeros(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=self.torch_device)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> "HostBuffer":
        return HostBuffer(self, numel, dtype)

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize()

    def free_memory(self) -> int | None:
        """Free device memory in bytes, or None where it is not bounded (host memory)."""
        return torch.cuda.mem_get_info()[0] if self.kind == "cuda" else None


class HostBuffer:
    """A host staging buffer (pinned on CUDA) and its device twin.

    ``stage`` packs several arrays into the host side, issues one non-blocking copy and returns
    device views, one per array. The buffer grows when a step needs more room.
    """

    def __init__(self, device: Device, numel: int, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._allocate(numel)

    def _allocate(self, numel: int) -> None:
        self.host = torch.zeros(numel, dtype=self.dtype, pin_memory=self.device.pin_memory)
        self.host_np = self.host.numpy()
        self.dev = self.device.zeros(numel, dtype=self.dtype)

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        sizes = [a.size for a in arrays]
        total = sum(sizes)
        if total > self.host.numel():
            self._allocate(max(total, 2 * self.host.numel()))
        offsets = np.cumsum([0] + sizes)
        for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:]):
            self.host_np[lo:hi] = a.reshape(-1)
        self.dev[:total].copy_(self.host[:total], non_blocking=True)
        return [self.dev[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]
