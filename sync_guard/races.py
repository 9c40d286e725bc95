"""The pinned-buffer race checker: a happens-before model of host buffers used by async copies.

The host and each stream keep a vector clock. A copy or event record ticks its stream; an event
snapshots its stream's clock; a stream wait joins the event's clock into the stream's; a host wait
(event, stream or device; a successful ``query`` counts) joins it into the host's. A copy stays
*pending* until the host's clock covers it. Meanwhile a host write to its source (H2D) or any host
access to its destination (D2H) raises :class:`BufferRace`: torch ops through a dispatch mode, and
``tolist``/``numpy``/``repr``, which skip the dispatcher for CPU tensors, through patches. Writes
torch never sees (numpy views) change the source's digest, compared when the host learns the copy
completed, when an overlapping copy is enqueued, and when the outermost scope exits.
The ``sim`` device reports through :mod:`sync_guard.hooks`; plain torch CUDA code is observed
directly. All state belongs to the thread or asyncio task that armed the checker.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import sys
import threading
import traceback
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from . import _mode, _scope, hooks, native, pages

__all__ = ["race_check", "BufferRace", "copy_enqueued", "event_recorded", "stream_waited",
           "host_waited"]

aten = torch.ops.aten
H2D, D2H = "host-to-device", "device-to-host"
# Ops that take a tensor only for its metadata: they read no element.
_METADATA_ONLY = frozenset({
    aten.empty_like, aten.zeros_like, aten.ones_like, aten.full_like, aten.new_empty,
    aten.new_empty_strided, aten.new_zeros, aten.new_ones, aten.new_full, aten.is_pinned})
_CALIBRATION_CYCLES = 20_000_000  # ~10 ms of torch.cuda._sleep on current GPUs
_cycles_per_ms: float | None = None


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The host byte range ``t`` touches (a strided view: its whole extent)."""
    if t.numel() == 0:
        return 0, 0
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _digest(t: torch.Tensor) -> bytes:
    # Raw bytes through ctypes: no torch op (which the checker would judge), any dtype.
    lo, hi = _span(t)
    return hashlib.blake2b(ctypes.string_at(lo, hi - lo), digest_size=16).digest()


def _stream_key(stream: Any) -> Hashable:
    """Python wrappers of one CUDA stream are many objects: key them by the raw stream."""
    if isinstance(stream, torch.cuda.Stream):
        return stream.device_index, stream.cuda_stream
    return id(stream)


def _join(clock: dict, other: dict) -> None:
    for key, tick in other.items():
        if clock.get(key, 0) < tick:
            clock[key] = tick


def _format(frames: list[traceback.FrameSummary]) -> str:
    return "".join(traceback.format_list(frames[-6:])) or "    (no user frames)\n"


@dataclass(slots=True)
class _Copy:
    direction: str                 # H2D: the device reads ``host`` later; D2H: writes it
    host: torch.Tensor             # kept alive (and digestible) while pending
    lo: int
    hi: int
    stream: Hashable
    stream_name: str
    tick: int
    site: list[traceback.FrameSummary]
    digest: bytes | None           # None where no digest applies (a device write is pending)


class BufferRace(_scope.GuardError):
    """A host access to a buffer that an asynchronous copy may still be using.

    ``copy_site`` and ``access_site`` are the user frames of the copy's enqueue and of the
    access (or of the point where a changed digest was noticed).
    """

    __module__ = "sync_guard"

    @classmethod
    def at_reuse(cls, what: str) -> "BufferRace":
        """A race found where a buffer is reused (the always-on mode: no copy site known)."""
        return cls.from_access(f"{what}, in thread {_scope.thread_name()!r}",
                               _scope.user_frames())

    @classmethod
    def from_access(cls, message: str, access_site: list) -> "BufferRace":
        """A race known by its access alone (a reuse point, or the page guard's fault)."""
        race = cls.__new__(cls)
        race.copy_site, race.access_site = [], access_site
        _scope.GuardError.__init__(race, f"{message}\n  at:\n{_format(access_site)}")
        return race

    def __init__(self, what: str, copy: _Copy) -> None:
        self.copy_site = copy.site
        self.access_site = _scope.user_frames()
        host = copy.host
        super().__init__(
            f"{what}, in thread {_scope.thread_name()!r}\n"
            f"  buffer: shape={tuple(host.shape)} dtype={host.dtype} data_ptr={copy.lo:#x}\n"
            f"  the {copy.direction} copy (stream {copy.stream_name}) was enqueued at:\n"
            f"{_format(copy.site)}  the offending access is at:\n{_format(self.access_site)}")


@dataclass(slots=True)
class _HB:
    """Happens-before state of one armed context: vector clocks, event snapshots, copies."""

    streams: dict[Hashable, dict[Hashable, int]] = field(default_factory=dict)
    host: dict[Hashable, int] = field(default_factory=dict)
    # id -> (event, its clock). Strong references: a weakref callback on a CUDA event runs in
    # the event's dealloc, which drops the GIL mid-garbage-collection and crashed the process.
    # An entry goes once the host's clock covers it: waiting on it can teach nothing more.
    events: dict[int, tuple[Any, dict]] = field(default_factory=dict)
    pending: list[_Copy] = field(default_factory=list)
    logged: list | None = None   # under race_check(level="log"): races are recorded, not raised

    def report(self, race: "BufferRace") -> None:
        if self.logged is None:
            raise race
        self.logged.append(race)
        _scope.logger.warning("%s", race)

    def tick(self, stream: Any) -> tuple[Hashable, int]:
        key = _stream_key(stream)
        clock = self.streams.setdefault(key, {})
        clock[key] = clock.get(key, 0) + 1
        return key, clock[key]

    def enqueue(self, direction: str, host: torch.Tensor, stream: Any) -> None:
        lo, hi = _span(host)
        if lo == hi:
            return
        overlapping = [c for c in self.pending if c.lo < hi and lo < c.hi]
        for old in overlapping:
            self.verify(old, "a new copy of an overlapping region")
            if direction == D2H:
                old.digest = None  # the device writes there next: a change is no longer the host's
        device_write_pending = direction == D2H or any(c.direction == D2H for c in overlapping)
        key, tick = self.tick(stream)
        self.pending.append(_Copy(
            direction, host, lo, hi, key, str(getattr(stream, "name", None) or key), tick,
            _scope.user_frames(), None if device_write_pending else _digest(host)))

    def record(self, event: Any, stream: Any) -> None:
        key, _ = self.tick(stream)
        self.events[id(event)] = event, dict(self.streams[key])  # re-recording replaces it

    def event_clock(self, event: Any) -> dict:
        entry = self.events.get(id(event))
        return {} if entry is None else entry[1]  # recorded outside the checker: says nothing

    def learn(self, clocks: list[dict]) -> None:
        """The host waited for ``clocks``: drop the copies that are now known complete."""
        for clock in clocks:
            _join(self.host, clock)
        host = self.host
        self.events = {eid: entry for eid, entry in self.events.items()
                       if any(host.get(k, 0) < t for k, t in entry[1].items())}
        done = [c for c in self.pending if self.host.get(c.stream, 0) >= c.tick]
        if done:
            self.pending = [c for c in self.pending if self.host.get(c.stream, 0) < c.tick]
            for copy in done:
                self.verify(copy, "the host wait that completed it")

    def verify(self, copy: _Copy, where: str) -> None:
        if copy.digest is not None and _digest(copy.host) != copy.digest:
            copy.digest = None  # reported once
            self.report(BufferRace(
                f"host buffer changed while a {copy.direction} copy from it was pending (a write "
                f"torch did not see, e.g. through a numpy view), noticed at {where}", copy))

    def access(self, t: torch.Tensor, write: bool, op: str) -> None:
        lo, hi = _span(t)
        for copy in self.pending:
            if lo < copy.hi and copy.lo < hi and (write or copy.direction == D2H):
                device = "read" if copy.direction == H2D else "be writing"
                kind, prep = ("write", "to") if write else ("read", "of")
                copy.digest = None  # this race is reported here, not again at the exit
                self.report(BufferRace(f"host {kind} ({op}) {prep} a buffer that a pending "
                                       f"{copy.direction} copy may still {device}", copy))
                return


@dataclass(slots=True)
class _Armed:
    hb: _HB
    widen_ms: float | None
    thread: int


_armed: ContextVar[_Armed | None] = ContextVar("sync_guard_races", default=None)


def _active() -> _Armed | None:
    """The armed state judging the caller, or None (off, another thread, or device work)."""
    armed = _armed.get()
    if armed is None or armed.thread != threading.get_ident() or hooks.in_device_work():
        return None
    return armed


def copy_enqueued(dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
    """A device layer enqueued ``dst.copy_(src)`` on ``stream`` (host<->device ones are tracked)."""
    armed = _active()
    if armed is None:
        return
    on_host = [t.device.type == "cpu" and not hooks.is_device_memory(t) for t in (dst, src)]
    if on_host == [False, True] and hooks.is_device_memory(dst):
        armed.hb.enqueue(H2D, src, stream)
    elif on_host == [True, False] and hooks.is_device_memory(src):
        armed.hb.enqueue(D2H, dst, stream)


def event_recorded(event: Any, stream: Any) -> None:
    """``event`` now stands for all work enqueued on ``stream`` so far."""
    armed = _active()
    if armed is not None:
        armed.hb.record(event, stream)


def stream_waited(stream: Any, event: Any) -> None:
    """Work enqueued on ``stream`` from now on runs after ``event``."""
    armed = _active()
    if armed is not None:
        _join(armed.hb.streams.setdefault(_stream_key(stream), {}), armed.hb.event_clock(event))


def host_waited(stream: Any = None, event: Any = None) -> None:
    """The host blocked on ``event``, on ``stream``, or (both None) on every stream."""
    armed = _active()
    if armed is None:
        return
    hb = armed.hb
    clocks = [hb.event_clock(event)] if event is not None else []
    if stream is not None:
        clocks.append(hb.streams.get(_stream_key(stream), {}))
    if event is None and stream is None:
        clocks = list(hb.streams.values())
    hb.learn(clocks)


def _cuda_direction(func, args, kwargs) -> str | None:
    """H2D/D2H for a non-blocking CUDA<->CPU ``copy_`` or ``_to_copy``, else None."""
    if func is aten.copy_.default:
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        src_type, dst_type = args[1].device.type, args[0].device.type
    elif func is aten._to_copy.default:
        non_blocking = kwargs.get("non_blocking", False)
        src_type = args[0].device.type
        dst_type = torch.device(kwargs["device"]).type if kwargs.get("device") else src_type
    else:
        return None
    if not non_blocking:
        return None
    return {("cpu", "cuda"): H2D, ("cuda", "cpu"): D2H}.get((src_type, dst_type))


def _calibrate() -> float:
    """GPU cycles per millisecond of ``torch.cuda._sleep``, measured once per process."""
    global _cycles_per_ms
    if _cycles_per_ms is None:
        # The base class's methods: calibrating is neither the user's sync nor their event.
        base = torch.cuda.Event.__base__
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(1_000_000)  # the first launch also pays for loading the kernel
        base.record(start, stream)
        torch.cuda._sleep(_CALIBRATION_CYCLES)
        base.record(end, stream)
        base.synchronize(end)
        _cycles_per_ms = _CALIBRATION_CYCLES / start.elapsed_time(end)
    return _cycles_per_ms


def before_op(func, args, kwargs):
    """Judge the op's host accesses (the shared dispatch mode calls this); for a tracked copy,
    what ``after_op`` needs to enqueue it."""
    armed = _active()
    if armed is None:
        return None
    direction = _cuda_direction(func, args, kwargs)
    if direction is not None:
        if armed.widen_ms:  # delay the copy: a latent race then corrupts data for sure
            torch.cuda._sleep(int(armed.widen_ms * _calibrate()))
        return armed, direction
    if armed.hb.pending and _touches_host(args, kwargs) and (
            func.overloadpacket not in _METADATA_ONLY):
        _check_args(armed.hb, func, args, kwargs)
    return None


def after_op(state, func, args, out) -> None:
    armed, direction = state
    if func is aten.copy_.default:
        host = args[1] if direction == H2D else args[0]
    else:
        host = args[0] if direction == H2D else out
    if host.is_pinned():  # pageable memory makes the copy synchronous for the host side
        armed.hb.enqueue(direction, host, torch.cuda.current_stream())


def _touches_host(args, kwargs) -> bool:
    """A cheap first look: most ops of a CUDA step take no CPU tensor at all."""
    for value in (*args, *kwargs.values()):
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                return True
    return False


def _check_args(hb: _HB, func, args, kwargs) -> None:
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        alias = arg.alias_info
        if alias is not None and not alias.is_write:
            continue  # a view: it aliases the buffer but reads nothing
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                hb.access(t, alias is not None, str(func))


def _host_read(name: str, original: Callable) -> Callable:
    """CPU tensors' ``tolist``/``numpy``/``repr`` never reach the dispatcher."""
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        if _armed.get() is not None:
            armed = _active()
            if armed is not None and armed.hb.pending and self.device.type == "cpu":
                armed.hb.access(self, False, f"Tensor.{name}")
        return original(self, *args, **kwargs)
    return wrapper


def _feeding(original: Callable, feed: Callable) -> Callable:
    """``original``, then (when armed) ``feed(result, *args)`` tells the model what happened."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if _armed.get() is not None:
            feed(result, *args, **kwargs)
        return result
    return wrapper


def _or_current(stream: Any) -> Any:
    return torch.cuda.current_stream() if stream is None else stream


# Stream.wait_event, wait_stream and record_event are built on Event.wait and Event.record.
_CUDA_FEEDS = (
    (torch.cuda.Event, "record", lambda _, e, stream=None: event_recorded(e, _or_current(stream))),
    (torch.cuda.Event, "wait", lambda _, e, stream=None: stream_waited(_or_current(stream), e)),
    (torch.cuda.Event, "query", lambda done, e: done and host_waited(event=e)),
    (torch.cuda.Event, "synchronize", lambda _, e: host_waited(event=e)),
    (torch.cuda.Stream, "query", lambda done, s: done and host_waited(stream=s)),
    (torch.cuda.Stream, "synchronize", lambda _, s: host_waited(stream=s)),
    (torch.cuda, "synchronize", lambda _, device=None: host_waited()),
)
_patched = False
_patch_lock = threading.Lock()


def _install_patches() -> None:
    global _patched
    with _patch_lock:
        if _patched:
            return
        for owner, name, feed in _CUDA_FEEDS:
            setattr(owner, name, _feeding(getattr(owner, name), feed))
        for name in ("tolist", "numpy", "__repr__"):
            setattr(torch.Tensor, name, _host_read(name, getattr(torch.Tensor, name)))
        _patched = True


class race_check:
    """Arm the race checker for the calling thread or asyncio task (context manager, decorator).

    Nested scopes share one happens-before state. ``widen_ms`` (CUDA only) delays each tracked
    copy by that many milliseconds so a latent race corrupts data deterministically::

        with race_check():
            dev_ids.copy_(host_ids, non_blocking=True)
            host_ids.fill_(0)   # BufferRace: the copy may not have read host_ids yet

    ``level="log"`` records each race (``with race_check(level="log") as races:``) and logs it
    (logger ``sync_guard``) instead of raising.
    """

    def __init__(self, widen_ms: float | None = None, level: str = "disallow") -> None:
        if widen_ms is not None and not widen_ms > 0:
            raise ValueError(f"widen_ms={widen_ms!r}: must be a positive number of ms, or None")
        level = _scope.normalize_level(level)
        if level == "allow":
            raise ValueError("race_check(level='allow') checks nothing: leave it out instead")
        self.widen_ms = widen_ms
        self.races: list[BufferRace] = []   # under level="log": the races seen, in order
        self._log = level == "log"
        self._tokens: list = []

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with race_check(self.widen_ms, "log" if self._log else "disallow"):
                return fn(*args, **kwargs)
        return wrapper

    def __enter__(self) -> list["BufferRace"]:
        _install_patches()
        native.install_if_requested()   # on CUDA: the page guard watches staging buffers too
        if self.widen_ms and torch.cuda.is_available():
            _calibrate()  # before arming: the calibration's own sync is not judged
        outer, thread = _armed.get(), threading.get_ident()
        shared = outer is not None and outer.thread == thread
        widen_ms = outer.widen_ms if shared and self.widen_ms is None else self.widen_ms
        hb = outer.hb if shared else _HB(logged=self.races if self._log else None)
        self._tokens.append(_armed.set(_Armed(hb, widen_ms, thread)))
        _mode.arm(sys.modules[__name__])
        pages.arm_races(+1)
        return self.races

    def __exit__(self, exc_type, *exc) -> None:
        _mode.disarm(sys.modules[__name__])
        pages.arm_races(-1)
        armed = _armed.get()
        _armed.reset(self._tokens.pop())
        outer = _armed.get()
        if exc_type is None and (outer is None or outer.hb is not armed.hb):
            for copy in armed.hb.pending:  # never waited for: was the source changed meanwhile?
                armed.hb.verify(copy, "the exit of race_check")
        self.races.extend(pages.raise_races("log" if self._log else "disallow", exc_type))
