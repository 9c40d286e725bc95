"""The device layer: where device work runs and how data crosses between host and device.

All of the engine's device work goes through a :class:`Device`: ``launch`` runs a function on a
stream, ``copy_async`` issues a copy on a stream, ``record``/``wait`` order streams and the host.
``cuda`` maps these onto real CUDA streams, events and pinned memory. ``sim`` (see ``sim.py``)
runs them on CPU tensors with streams that are queues, so a host read before a wait sees stale
data and a host write to a staging buffer before its copy ran changes what the device receives.
``cpu`` is ``sim`` with the ``eager`` policy: every piece of work runs at once.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol

import torch

import sync_guard


class Event(Protocol):
    def synchronize(self) -> None: ...
    def query(self) -> bool: ...


class Device:
    """A CUDA device with one compute stream and one copy stream."""

    kind = "cuda"

    def __init__(self) -> None:
        self.torch_device = torch.device("cuda", torch.cuda.current_device())
        self.pin_memory = True
        self.compute = torch.cuda.current_stream()
        self.copy = torch.cuda.Stream()

    @contextmanager
    def step_scope(self, step: int | None = None) -> Iterator[None]:
        """Make the compute stream current (and autograd off) for one engine step.

        Inside it, work for the compute stream is issued without switching streams again: one
        stream switch per step instead of one per launch or copy.
        """
        with torch.cuda.stream(self.compute), torch.inference_mode():
            self._in_scope = True
            try:
                yield
            finally:
                self._in_scope = False

    _in_scope = False

    def launch(self, stream: Any, fn: Callable[..., None], *args: Any) -> None:
        """Run device work ``fn(*args)`` in stream order on ``stream``."""
        if stream is self.compute and self._in_scope:
            fn(*args)
            return
        with torch.cuda.stream(stream), torch.inference_mode():
            fn(*args)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        if stream is self.compute and self._in_scope:
            dst.copy_(src, non_blocking=True)
            return
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: Any, timing: bool = False, fence: bool = False) -> Event:
        event = torch.cuda.Event(enable_timing=timing)
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Event) -> None:
        stream.wait_event(event)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def idle(self, seconds: float, waiting_for: Event) -> None:
        """The host has nothing to do for ``seconds`` while it polls ``waiting_for`` (a
        back-off); the device goes on with its queued work meanwhile."""
        time.sleep(seconds)

    def zeros(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device=self.torch_device)

    def empty(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device=self.torch_device)

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype,
                   name: str = "a staging buffer", staging: bool = True) -> torch.Tensor:
        """Pinned host memory; a ``staging`` buffer (allocated once, reused every step) owns
        whole pages that sync_guard's page guard protects while a copy is pending, so an early
        host access is a race whoever makes it."""
        if not staging:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
        return sync_guard.staging_empty(shape, dtype, name=name, pin_memory=self.pin_memory)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> "HostBuffer":
        return HostBuffer(self, numel, dtype)

    def free_memory(self) -> int | None:
        """Free device memory in bytes, or None where it is not bounded (host memory)."""
        return torch.cuda.mem_get_info()[0]


def make_device(kind: str, sim_policy: str | None = None, seed: int = 0) -> Device:
    if kind == "cuda":
        return Device()
    from .sim import SimDevice
    return SimDevice(sim_policy or "eager", seed=seed, kind=kind)


class HostBuffer:
    """A host staging buffer (pinned on CUDA) and its device twin.

    ``stage`` packs several lists into the host side, issues one async copy on the compute
    stream and returns device views, one per array. The host must not rewrite the buffer until
    that copy ran: the caller fences on ``copied``, the event recorded after the copy.
    """

    def __init__(self, device: Device, numel: int, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.copied: Event | None = None
        self._allocate(numel)

    def _allocate(self, numel: int) -> None:
        self.host = self.device.host_empty((numel,), self.dtype, f"a {self.dtype} staging buffer")
        self.host.zero_()
        self.host_np = self.host.numpy()
        self.dev = self.device.zeros(numel, dtype=self.dtype)

    def stage(self, parts: list) -> tuple[torch.Tensor, ...]:
        """Pack ``parts`` (sequences of numbers) and ship them in one copy.

        Returns one device view per part, in order.
        """
        sizes = [len(p) for p in parts]
        flat: list = []
        for part in parts:
            flat.extend(part)
        total = len(flat)
        sync_guard.buffer_reused(self.copied, "a staging buffer")  # the always-on mode's race check
        if total > self.host.numel():
            self._allocate(max(total, 2 * self.host.numel()))
        self.host_np[:total] = flat
        stream = self.device.compute
        self.device.copy_async(self.dev[:total], self.host[:total], stream)
        self.copied = self.device.record(stream, fence=True)
        return self.dev[:total].split(sizes)

    def fence(self) -> None:
        """Input-prep fence: wait until the last staged copy has read the host side."""
        if self.copied is not None:
            with sync_guard.allow("input-prep fence: the staging buffer's last copy"):
                self.copied.synchronize()
