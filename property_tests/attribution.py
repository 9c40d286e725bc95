"""Per-step timeline attribution under overlap: each step's spans belong to that step.

With async scheduling the host collects step N while step N+1's device work runs, so a span
recorded under "the current step" lands on the wrong one (NVIDIA/TensorRT-LLM#3785: per-
iteration stats that mixed two iterations under the overlap scheduler; #11860). Read from an
idle engine's :class:`~lockstep.engine.timeline.Timeline`, the rules are causal, so they hold
whatever the timing:

* step N's device span begins after the host began launching step N;
* each launched step is collected exactly once, in step order, and a collect that got the
  outputs ends after the step's device span ended (the outputs come after the work);
* the device spans of one compute stream follow each other in step order.

Device times on CUDA are anchored to host time once, with a bounded error
(``Timeline.anchor_error_ns``): the rules that compare a device time with a host time allow it.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable


def attribution_errors(host_spans: Iterable, device_spans: list[tuple[int, int, int]],
                       launched: Iterable[int] | None = None, tolerance_ns: int = 0) -> list[str]:
    """What breaks the rules; ``launched``: the steps whose launch returned (default: every
    step with a device span), each of which must be collected once."""
    host_spans = list(host_spans)
    launches = {s.step: s for s in host_spans if s.name == "launch"}
    collects: dict[int, list] = defaultdict(list)
    for span in host_spans:
        if span.name == "collect":
            collects[span.step].append(span)
    oldest = min(launches, default=0)   # the ring may have dropped older steps
    problems: list[str] = []
    for step, start, end in device_spans:
        launch = launches.get(step)
        if launch is None:
            if step >= oldest:
                problems.append(f"a device span for step {step}, which no launch span names")
            continue
        if start < launch.start_ns:
            problems.append(f"step {step}'s device span began {_us(launch.start_ns - start)} "
                            f"before the host launched step {step}")
        for collect in collects.get(step, ()):
            if not collect.failed and collect.end_ns + tolerance_ns < end:
                problems.append(f"the collect span of step {step} ended {_us(end - collect.end_ns)}"
                                f" before step {step}'s device span did")
    ordered = sorted(device_spans)
    for (step, _, end), (later, start, _) in zip(ordered, ordered[1:]):
        if start < end:
            problems.append(f"step {later}'s device span began {_us(end - start)} before step "
                            f"{step}'s ended (one compute stream)")
    expected = {s for s, _, _ in device_spans} if launched is None else set(launched)
    for step in sorted(s for s in expected if s >= oldest):
        if len(collects.get(step, ())) != 1:
            problems.append(f"step {step} has {len(collects.get(step, ()))} collect spans, not 1")
    for step in sorted(set(collects) - set(launches)):
        if step >= oldest:
            problems.append(f"a collect span for step {step}, which was never launched")
    order = [s.step for s in sorted((s for s in host_spans if s.name == "collect"),
                                    key=lambda s: s.start_ns)]
    if order != sorted(order):
        problems.append(f"collect spans out of step order: {order[:12]}")
    return problems


def _us(ns: int) -> str:
    return f"{ns / 1e3:.1f} µs"
