"""Drive one workload through one engine, step by step, checking invariants after every step.

In each driver step the driver makes the workload's calls in their order (adds at their arrival,
in list order, a reused id waiting until its previous request finished or was aborted; aborts at
their step), then the forced preemption, then ``step()``; it records each request's final ids,
finish reason and logprobs, keyed by (id, occurrence). The whole run is under sync_guard (no host
sync outside the engine's named waits, in a step or between steps) and its race checker. A run
that does not finish within a step bound is a hang, reported as such.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import sync_guard

from .engine_under_test import EngineUnderTest
from .invariants import OutputRules
from .live import Key, LiveRequests, RequestResult
from .workload import ClientCalls, Workload

__all__ = ["EngineHang", "RequestResult", "RunRecord", "drive", "step_bound"]


class EngineHang(AssertionError):
    """The engine did not finish the workload within the driver's step bound."""


@dataclass
class RunRecord:
    """What one engine produced for a workload."""

    name: str
    results: dict[Key, RequestResult] = field(default_factory=dict)
    aborted: set[Key] = field(default_factory=set)   # an abort reached the engine while live
    stats: dict = field(default_factory=dict)
    steps: int = 0


def step_bound(workload: Workload) -> int:
    """Generous: every token of every request in its own step, twice, plus every arrival."""
    tokens = sum(len(r.prompt) + r.params.max_tokens for r in workload.requests)
    last = max([r.arrival for r in workload.requests] + [a.step for a in workload.aborts]
               + list(workload.preempt_steps) + [0])
    return 2 * tokens + last + 64


def drive(workload: Workload, engine: EngineUnderTest, name: str, eos_token_ids=(),
          guard: bool = True, first_arrival_index: int = 0) -> RunRecord:
    """Run ``workload`` on ``engine`` to the end; ``first_arrival_index`` offsets the arrival
    indices the engine is given (a solo run keeps the index its request had in the batch)."""
    record = RunRecord(name)
    try:
        _run(workload, engine, name, eos_token_ids, guard, first_arrival_index, record)
    except Exception as exc:
        notes = getattr(exc, "__notes__", None)
        exc.__notes__ = [*(notes or ()), f"  run: {name}"]  # which engine, for the report
        raise
    return record


def _run(workload, engine, name, eos_token_ids, guard, first_arrival_index, record) -> None:
    client = ClientCalls(workload)
    live = LiveRequests(name)
    preempt_steps = set(workload.preempt_steps)
    limit, step, arrivals = step_bound(workload), 0, 0
    # the whole loop is guarded, not only ``step()``: a sync in ``add``, ``abort`` or
    # ``has_unfinished`` (called between steps by every serving loop) stalls the device too
    race_scope = sync_guard.race_check() if guard else nullcontext()
    sync_scope = sync_guard.disallow() if guard else nullcontext()
    with race_scope, sync_scope:
        while client.pending or engine.has_unfinished():
            for call in client.calls(step, live.busy):
                if call[0] == "add":
                    spec, key = workload.requests[call[1]], client.keys[call[1]]
                    engine.add(spec.request_id, list(spec.prompt), spec.params,
                               first_arrival_index + arrivals)
                    arrivals += 1
                    live.add(spec.request_id, key, OutputRules(
                        spec.params, eos_token_ids, f"{name}: request {key[0]!r}#{key[1]}"))
                else:
                    _, rid, occurrence = call
                    if live.key(rid) == (rid, occurrence) and engine.abort(rid):
                        live.aborted(rid)
                        record.aborted.add((rid, occurrence))
            if step in preempt_steps and hasattr(engine, "preempt_newest"):
                engine.preempt_newest()
            outputs = engine.step()
            for out in outputs:
                live.observe(record.results, out)
            engine.check_invariants()
            step += 1
            if step > limit:
                raise EngineHang(f"{name}: not finished after {limit} steps; unfinished: "
                                 f"{live.unfinished()}; stats {engine.stats()}")
    record.steps, record.stats = step, engine.stats()
