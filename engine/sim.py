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

import atexit
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


class StepFault:
    """The first failure in one engine step's device work; the step's later events carry it."""

    __slots__ = ("step", "error")

    def __init__(self, step: int | None) -> None:
        self.step = step
        self.error: BaseException | None = None


_completion = threading.Lock()  # guards the moment a waiter is attached or an event completes
_exiting = False  # set once at interpreter exit: no device worker waits or runs work any more
_blocked: set[threading.Event] = set()  # waiters a thread is blocked on (woken at exit)
_workers: set["_WorkQueue"] = set()  # queues whose worker thread is alive


class SimEvent:
    """Completion of every item queued on a stream before ``record``.

    Costs no kernel object until a thread blocks on it (``threaded`` policy only). An event
    recorded in a step whose device work failed before it completed carries that failure, and
    ``synchronize`` raises it: the step's results are never read as if they were good.
    """

    __slots__ = ("stream", "fault", "error", "time_ns", "_done", "_waiter", "__weakref__")

    def __init__(self, stream: "SimStream", fault: StepFault | None = None) -> None:
        self.stream = stream
        self.fault = fault
        self.error: BaseException | None = None
        self.time_ns: int | None = None
        self._done = False
        self._waiter: threading.Event | None = None

    def _complete(self) -> None:
        try:
            self.time_ns = time.perf_counter_ns()
            if self.fault is not None:
                self.error = self.fault.error
        finally:  # an interrupt striking here (eager: the host thread) must not leave it pending
            with _completion:
                self._done = True
                waiter = self._waiter
            if waiter is not None:
                waiter.set()

    def is_done(self) -> bool:
        return self._done

    def wait_done(self) -> None:
        """Block until another thread completes the event."""
        with _completion:
            if self._done or _exiting:
                return
            if self._waiter is None:
                self._waiter = threading.Event()
            waiter = self._waiter
            _blocked.add(waiter)
        try:
            waiter.wait()
        finally:
            with _completion:
                _blocked.discard(waiter)

    def query(self) -> bool:
        done = self._done
        hooks.on_event_query(self, done)
        return done

    def synchronize(self) -> None:
        hooks.on_host_wait("SimEvent.synchronize", event=self)
        self.stream.run_until(self)
        if self.error is not None:
            self.stream.raise_fault(self.error, self.fault)


class _WorkQueue:
    """A stream's queue, shared with its worker thread (which must not keep the stream alive)."""

    def __init__(self) -> None:
        self.items: deque[tuple[Callable[[], None], StepFault | None]] = deque()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.closed = False
        self.error: BaseException | None = None
        self.worker: threading.Thread | None = None

    def start_worker(self, name: str, rng: random.Random, max_delay_s: float) -> None:
        self.worker = threading.Thread(target=self.work, args=(rng, max_delay_s), name=name,
                                       daemon=True)
        with _completion:
            _workers.add(self)
        self.worker.start()

    def close(self, discard: bool = False) -> None:
        """The worker returns once the queue is empty; ``discard`` empties it now (exit)."""
        with self.lock:
            self.closed = True
            if discard:
                self.items.clear()
            self.wake.notify()

    def work(self, rng: random.Random, max_delay_s: float) -> None:
        try:
            while True:
                with self.lock:
                    while not self.items and not self.closed:
                        self.wake.wait()
                    if not self.items:
                        return
                    item = self.items.popleft()
                    delay = rng.uniform(0, max_delay_s)
                time.sleep(delay)
                self.execute(item)
                del item  # a finished item must not keep the stream (and engine) alive
        finally:
            with _completion:
                _workers.discard(self)

    def execute(self, item: tuple[Callable[[], None], StepFault | None]) -> None:
        """Run one item as the device; a failure is kept for the host's next wait."""
        fn, fault = item
        try:
            with hooks.device_work():
                fn()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the host, never dropped
            if fault is None:
                self.error = self.error or exc
            elif fault.error is None:
                fault.error = exc


@atexit.register
def stop_workers(timeout_s: float = 10.0) -> None:
    """Stop every device worker before the interpreter finalizes.

    A daemon thread still inside a torch call when finalization starts is killed as it takes the
    GIL back, and the C++ unwind through torch's frames aborts the whole process ("terminate
    called without an active exception"): a broken or abandoned engine, or a Ctrl-C, would turn
    a clean exit into SIGABRT. At exit, queued work is discarded (nobody will read it), workers
    blocked on another stream's event are woken, and each worker finishes its current item and
    returns.
    """
    global _exiting
    with _completion:
        _exiting = True
        queues, waiters = list(_workers), list(_blocked)
    for waiter in waiters:
        waiter.set()
    for queue in queues:
        queue.close(discard=True)
    deadline = time.monotonic() + timeout_s
    for queue in queues:
        queue.worker.join(max(0.0, deadline - time.monotonic()))


class SimStream:
    """An in-order queue of device work."""

    def __init__(self, device: "SimDevice", name: str, policy: str) -> None:
        self.device = device
        self.policy = policy
        self.name = name
        self._queue = _WorkQueue()
        if self.policy == "threaded":
            rng = random.Random(f"{device.seed}:{name}")
            self._queue.start_worker(f"sim-{name}", rng, device.max_delay_s)
            weakref.finalize(self, self._queue.close)

    def enqueue(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` as device work of the current step (if any): its failure is that step's."""
        item = (fn, self.device.fault)
        if self.policy == "eager":
            self._queue.execute(item)
            return
        with self._queue.lock:
            self._queue.items.append(item)
            self._queue.wake.notify()

    def run_until(self, event: SimEvent) -> None:
        """Block the caller until ``event`` completed (running work itself when lazy)."""
        if self.policy == "lazy":
            # one host thread at a time runs lazy work: a second thread waiting on the device
            # (any thread may, as on a GPU) must not pop the next item while the first still
            # runs the previous one (out of order, a copy read its source before it was written)
            with self.device.run_lock:
                while not event.is_done():
                    with self._queue.lock:
                        if not self._queue.items:
                            self._never_completes(event)
                        item = self._queue.items.popleft()
                    self._queue.execute(item)
        elif not event.is_done():
            if self.policy == "eager":  # its completion already ran, in the host thread
                self._never_completes(event)
            event.wait_done()
        if self._queue.error is not None:  # work queued outside any step failed
            error, self._queue.error = self._queue.error, None
            self.raise_fault(error, None)

    def advance(self) -> None:
        """Run the next queued item, if any (lazy): the work the device does while the host
        idles. Never a host wait: nothing is reported to sync_guard."""
        with self.device.run_lock:
            with self._queue.lock:
                if not self._queue.items:
                    return
                item = self._queue.items.popleft()
            self._queue.execute(item)

    def _never_completes(self, event: SimEvent) -> None:
        """No work left that could complete ``event`` (the item that would have was cut short,
        by an interrupt in the host thread): an error, never a wait that cannot end."""
        raise RuntimeError(f"sim stream {self.name!r}: an event was waited on that can never "
                           f"complete (the work completing it was interrupted)")

    def raise_fault(self, error: BaseException, fault: StepFault | None) -> None:
        """Report device work's failure to the host: an interrupt (any BaseException that is not
        an Exception) as itself; an error as a RuntimeError naming the step and the cause."""
        if not isinstance(error, Exception):
            error.lockstep_device_fault = True  # raised inside one step's device work
            raise error
        step = "" if fault is None or fault.step is None else f" of step {fault.step}"
        raise RuntimeError(f"device work{step} on sim stream {self.name!r} failed: "
                           f"{type(error).__name__}: {error}") from error

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
        self.fault: StepFault | None = None  # the step whose device work is being enqueued
        self.run_lock = threading.RLock()  # held by the host thread running lazy work
        skewed = policy == "skewed"
        self.compute = SimStream(self, "compute", "eager" if skewed else policy)
        self.copy = SimStream(self, "copy", "lazy" if skewed else policy)

    @contextmanager
    def step_scope(self, step: int | None = None) -> Iterator[None]:
        """Device work enqueued inside belongs to ``step``: its first failure is carried by the
        step's later events (work runs later on stream queues; ``launch`` enters inference
        mode there)."""
        self.fault = StepFault(step)
        try:
            yield
        finally:
            self.fault = None

    def launch(self, stream: SimStream, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            with torch.inference_mode():
                fn(*args)
        stream.enqueue(run)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, stream: SimStream) -> None:
        hooks.on_copy(dst, src, stream)
        stream.enqueue(lambda: dst.copy_(src))

    def record(self, stream: SimStream, timing: bool = False, fence: bool = False) -> SimEvent:
        """``fence``: the event only tells the host that the work before it ran (an input-prep
        fence); it does not carry the step's failure, which the step's results report."""
        event = SimEvent(stream, None if fence else self.fault)
        hooks.on_record(event, stream)
        stream.enqueue(event._complete)
        return event

    def wait(self, stream: SimStream, event: SimEvent) -> None:
        hooks.on_wait(stream, event)
        stream.enqueue(event.synchronize)

    def idle(self, seconds: float, waiting_for: SimEvent) -> None:
        """The host idles while it polls ``waiting_for`` (a back-off): a lazy stream runs its
        next item, as a GPU goes on while the host sleeps (only the event's stream, so no more
        work runs than the event needs, as lazy promises); a threaded one runs by itself."""
        stream = waiting_for.stream
        if stream.policy == "lazy":
            stream.advance()
        elif stream.policy == "threaded":
            time.sleep(seconds)

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

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype,
                   name: str = "a staging buffer", staging: bool = True) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def free_memory(self) -> int | None:
        return None
