"""A simulated device: CPU tensors for device memory, queues for streams.

Device work (a launched function, an async copy, an event record, a wait on another stream's
event) is an item in its stream's queue. When the items run is the *policy*:

* ``eager``: at once, in the host thread (no lag at all);
* ``lazy``: as late as possible, only when the host waits on an event or a stream: the worst
  case lag, deterministic;
* ``threaded``: a worker thread per stream runs its queue, sleeping a seeded random delay
  before each item;
* ``skewed``: the compute stream runs at once and the copy stream as late as possible: one
  stream far ahead of the other, deterministic. A device buffer one stream writes while the
  other has yet to read it (a cross-stream reuse) shows here on every step.

A copy reads its source when it runs, not when it was issued, so a host write to a staging buffer
before the copy ran changes what the "device" receives, and a host read of a copy's destination
before waiting sees stale data, exactly as on a GPU.
"""
from __future__ import annotations

import random
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from sync_guard import hooks

from .device import Device


class SimEvent:
    """Completion of every item queued on a stream before ``record``."""

    def __init__(self, stream: "SimStream") -> None:
        self.stream = stream
        self.done = threading.Event()
        self.time_ns: int | None = None

    def _complete(self) -> None:
        self.time_ns = time.perf_counter_ns()
        self.done.set()

    def query(self) -> bool:
        done = self.done.is_set()
        hooks.on_event_query(self, done)
        return done

    def synchronize(self) -> None:
        hooks.on_host_wait("SimEvent.synchronize", event=self)
        self.stream.run_until(self)


class _WorkQueue:
    """A stream's queue, shared with its worker thread (which must not keep the stream alive)."""

    def __init__(self) -> None:
        self.items: deque[Callable[[], None]] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.error: BaseException | None = None

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.wake.notify()

    def work(self, rng: random.Random, max_delay_s: float) -> None:
        while True:
            with self.lock:
                while not self.items and not self.closed:
                    self.wake.wait()
                if not self.items:
                    return
                item = self.items.popleft()
                delay = rng.uniform(0, max_delay_s)
            time.sleep(delay)
            try:
                with hooks.device_work():
                    item()
            except BaseException as exc:  # surfaced to the host at its next wait
                self.error = self.error or exc
            del item  # a finished item must not keep the stream (and engine) alive


class SimStream:
    """An in-order queue of device work."""

    def __init__(self, device: "SimDevice", name: str, policy: str) -> None:
        self.policy = policy
        self.name = name
        self._queue = _WorkQueue()
        if self.policy == "threaded":
            rng = random.Random(f"{device.seed}:{name}")
            threading.Thread(target=self._queue.work, args=(rng, device.max_delay_s),
                             name=f"sim-{name}", daemon=True).start()
            weakref.finalize(self, self._queue.close)

    def enqueue(self, item: Callable[[], None]) -> None:
        if self.policy == "eager":
            with hooks.device_work():
                item()
            return
        with self._queue.lock:
            self._queue.items.append(item)
            self._queue.wake.notify()

    def run_until(self, event: SimEvent) -> None:
        """Block the caller until ``event`` completed (running work itself when lazy)."""
        if self.policy == "lazy":
            while not event.done.is_set():
                with self._queue.lock:
                    item = self._queue.items.popleft()
                with hooks.device_work():
                    item()
        else:
            event.done.wait()
        if self._queue.error is not None:
            error, self._queue.error = self._queue.error, None
            raise RuntimeError(f"device work on sim stream {self.name!r} failed") from error

    def synchronize(self) -> None:
        hooks.on_host_wait("SimStream.synchronize", stream=self)
        event = SimEvent(self)
        self.enqueue(event._complete)
        self.run_until(event)


class SimDevice(Device):
    """The ``sim`` device (and ``cpu``, which is ``sim`` with the eager policy)."""

    def __init__(self, policy: str, seed: int = 0, kind: str = "sim",
                 max_delay_s: float = 0.002) -> None:
        self.kind = kind
        self.policy = policy
        self.seed = seed
        self.max_delay_s = max_delay_s
        self.torch_device = torch.device("cpu")
        self.pin_memory = False
        skewed = policy == "skewed"
        self.compute = SimStream(self, "compute", "eager" if skewed else policy)
        self.copy = SimStream(self, "copy", "lazy" if skewed else policy)

    @contextmanager
    def step_scope(self) -> Iterator[None]:
        yield  # work runs later on stream queues; ``launch`` enters inference mode there

    def launch(self, stream: SimStream, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            with torch.inference_mode():
                fn(*args)
        stream.enqueue(run)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: SimStream) -> None:
        hooks.on_copy(dst, src, stream)
        stream.enqueue(lambda: dst.copy_(src))

    def record(self, stream: SimStream, timing: bool = False) -> SimEvent:
        event = SimEvent(stream)
        hooks.on_record(event, stream)
        stream.enqueue(event._complete)
        return event

    def wait(self, stream: SimStream, event: SimEvent) -> None:
        hooks.on_wait(stream, event)
        stream.enqueue(event.synchronize)

    def zeros(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.zeros(*shape, dtype=dtype)
        hooks.register_device_memory(tensor)
        return tensor

    def empty(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(*shape, dtype=dtype)
        hooks.register_device_memory(tensor)
        return tensor

    def synchronize(self) -> None:
        self.compute.synchronize()
        self.copy.synchronize()

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def free_memory(self) -> int | None:
        return None
