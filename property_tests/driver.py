"""Drive one workload through one engine, step by step, checking invariants after every step.

The driver adds requests at their arrival step (in list order; a reused id waits for its previous
holder to finish), applies aborts at their step, steps the engine until everything finished, and
records each request's final ids, finish reason and logprobs, keyed by (id, occurrence). The
whole run is under sync_guard (no host sync outside the engine's named waits, in a step or
between steps) and its race checker. A run that does not finish within a step bound is a hang, reported as such.
"""
from __future__ import annotations

from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import sync_guard

from .engine_under_test import EngineUnderTest
from .invariants import InvariantViolation, OutputRules
from .workload import Workload

Key = tuple[str, int]


class EngineHang(AssertionError):
    """The engine did not finish the workload within the driver's step bound."""


@dataclass
class RequestResult:
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None
    error: str | None = None


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
    keys = workload.keys()
    pending = deque(range(len(workload.requests)))
    live: dict[str, tuple[Key, OutputRules]] = {}
    aborts = defaultdict(list)
    for a in workload.aborts:
        aborts[a.step].append((a.request_id, a.occurrence))
    preempt_steps = set(workload.preempt_steps)
    limit, step, arrivals = step_bound(workload), 0, 0
    # the whole loop is guarded, not only ``step()``: a sync in ``add``, ``abort`` or
    # ``has_unfinished`` (called between steps by every serving loop) stalls the device too
    race_scope = sync_guard.race_check() if guard else nullcontext()
    sync_scope = sync_guard.disallow() if guard else nullcontext()
    with race_scope, sync_scope:
        while pending or engine.has_unfinished():
            while pending and workload.requests[pending[0]].arrival <= step \
                    and workload.requests[pending[0]].request_id not in live:
                spec = workload.requests[pending.popleft()]
                key = keys[arrivals]
                engine.add(spec.request_id, list(spec.prompt), spec.params,
                           first_arrival_index + arrivals)
                arrivals += 1
                live[spec.request_id] = (key, OutputRules(spec.params, eos_token_ids,
                                                          f"{name}: request {key[0]!r}#{key[1]}"))
            for rid, occurrence in aborts.pop(step, ()):
                if rid in live and live[rid][0] == (rid, occurrence) and engine.abort(rid):
                    record.aborted.add((rid, occurrence))
            if step in preempt_steps and hasattr(engine, "preempt_newest"):
                engine.preempt_newest()
            outputs = engine.step()
            for out in outputs:
                observe(record.results, live, out, name)
            engine.check_invariants()
            step += 1
            if step > limit:
                raise EngineHang(f"{name}: not finished after {limit} steps; unfinished: "
                                 f"{sorted(live)}; stats {engine.stats()}")
    record.steps, record.stats = step, engine.stats()


def observe(results: dict[Key, RequestResult], live: dict[str, tuple[Key, OutputRules]], out,
            name: str) -> None:
    """Check one output against its request's rules and record it; a finished request leaves
    ``live``. An output for an id that is not live is an invariant violation."""
    entry = live.get(out.request_id)
    if entry is None:
        raise InvariantViolation(f"{name}: output for {out.request_id!r}, which is not live "
                                 f"(finished or never added): {list(out.token_ids)} "
                                 f"{out.finish_reason}")
    key, rules = entry
    rules.observe(out.token_ids, out.finish_reason)
    logprobs = None if out.logprobs is None else list(out.logprobs)
    results[key] = RequestResult(list(out.token_ids), out.finish_reason, logprobs,
                                 getattr(out, "error", None))
    if out.finish_reason is not None:
        del live[out.request_id]

