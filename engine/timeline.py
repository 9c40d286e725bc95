"""Step timeline: host spans and device spans per step, exportable as a Chrome/Perfetto trace.

Host spans (schedule, prepare, launch, collect) are timed with ``perf_counter_ns``. A device span
is a pair of events recorded on the compute stream around the step's device work: CUDA timing
events, or the completion time stamps of ``sim`` events. Device times are resolved only on
export, never on the step's path. The timeline is a ring over the last ``max_steps`` steps
(``EngineConfig.timeline_steps``); 0 records nothing, not even the device events.

Reading device spans waits for the device and walks rings the step appends to, so the readers
run under the engine's one-caller guard: from another thread while a step runs they are refused
at once (waiting on the device from there would also have raced the step's own waits).
"""
from __future__ import annotations

import json
import time
from collections import deque
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

from .device import Device

HOST_SPANS_PER_STEP = 4  # schedule, prepare, launch, collect


@dataclass(slots=True)
class HostSpan:
    name: str
    step: int
    start_ns: int
    end_ns: int
    failed: bool = False  # the phase raised (a collect that failed never got the outputs)


class Timeline:
    """Records what the host and the device did in each step."""

    def __init__(self, device: Device, max_steps: int = 1024,
                 exclusive: Callable[[str], AbstractContextManager] | None = None) -> None:
        """``exclusive(what)``: the owner's one-caller guard (``EngineCore.exclusive``)."""
        self.device = device
        self._exclusive = exclusive or (lambda what: nullcontext())
        self.enabled = max_steps > 0
        self.host_spans: deque[HostSpan] = deque(maxlen=HOST_SPANS_PER_STEP * max_steps)
        self._device_events: deque[tuple[int, object, object]] = deque(maxlen=max_steps)
        self._origin = None  # (event, host ns) pair that anchors CUDA times to host time
        self.current: tuple[str, int] | None = None  # the host phase running now, and its step
        self.anchor_error_ns = 0  # device times may be late by up to this much (CUDA)
        if device.kind == "cuda" and self.enabled:
            device.synchronize()
            before = time.perf_counter_ns()
            origin = device.record(device.compute, timing=True)
            origin.synchronize()
            after = time.perf_counter_ns()
            # the origin completed somewhere in [before, after]; it is taken to be ``after``
            self._origin, self.anchor_error_ns = (origin, after), after - before

    @contextmanager
    def host(self, name: str, step: int) -> Iterator[None]:
        """Time a host phase of ``step``; ``current`` names it while it runs (kept even with
        the timeline off: a watchdog reads it to say where a stuck step is)."""
        outer, self.current = self.current, (name, step)
        start, failed = time.perf_counter_ns() if self.enabled else 0, True
        try:
            yield
            failed = False
        finally:
            self.current = outer
            if self.enabled:
                self.host_spans.append(HostSpan(name, step, start, time.perf_counter_ns(),
                                                failed))

    def device_begin(self) -> object:
        return self.device.record(self.device.compute, timing=True) if self.enabled else None

    def device_end(self, step: int, begin: object) -> None:
        if not self.enabled:
            return
        end = self.device.record(self.device.compute, timing=True)
        self._device_events.append((step, begin, end))

    def device_spans(self) -> list[tuple[int, int, int]]:
        """(step, start ns, end ns) of every device span recorded (waits for the device)."""
        with self._exclusive("Timeline.device_spans"):
            self.device.synchronize()
            recorded = list(self._device_events)
        spans = []
        for step, begin, end in recorded:
            if self.device.kind == "cuda":
                origin, origin_ns = self._origin
                start = origin_ns + int(origin.elapsed_time(begin) * 1e6)
                stop = origin_ns + int(origin.elapsed_time(end) * 1e6)
            else:
                start, stop = begin.time_ns, end.time_ns
            spans.append((step, start, stop))
        return spans

    def busy_fraction(self, start_ns: int, end_ns: int) -> float:
        """Fraction of ``[start_ns, end_ns)`` during which some device span was running."""
        busy, cursor = 0, start_ns
        for _, lo, hi in sorted(self.device_spans(), key=lambda s: s[1]):
            lo, hi = max(lo, cursor), min(hi, end_ns)
            if hi > lo:
                busy += hi - lo
                cursor = hi
        return busy / max(1, end_ns - start_ns)

    def chrome_trace(self) -> dict:
        with self._exclusive("Timeline.chrome_trace"):
            host_spans, device_spans = list(self.host_spans), self.device_spans()
        events: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "host"}},
            {"name": "process_name", "ph": "M", "pid": 1,
             "args": {"name": f"device ({self.device.kind})"}}]
        for s in host_spans:
            events.append({"name": s.name, "cat": "host", "ph": "X", "pid": 0, "tid": 0,
                           "ts": s.start_ns / 1e3, "dur": (s.end_ns - s.start_ns) / 1e3,
                           "args": {"step": s.step, **({"failed": True} if s.failed else {})}})
        for step, start, stop in device_spans:
            events.append({"name": f"step {step}", "cat": "device", "ph": "X", "pid": 1,
                           "tid": 0, "ts": start / 1e3, "dur": (stop - start) / 1e3,
                           "args": {"step": step}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def export_chrome_trace(self, path: str) -> None:
        """Write the trace as JSON (open it in chrome://tracing or ui.perfetto.dev)."""
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)
