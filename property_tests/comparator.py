"""Compare two runs of one workload, request by request, with torch.testing-style messages.

Exact mode (the oracle model: batch-invariant integer numerics): ids, finish reasons and logprobs
must be equal. Float mode (real checkpoints, the default model): at the first differing position
the difference is accepted only at a near-tie: in each run, the two picks' logprobs differ by at
most ``NEAR_TIE_NATS`` and the other run's pick ranks first or second; the streams may then
differ after it, and the accepted divergence is counted. A request aborted in either run must be
a prefix of the other run's stream. A request that ended with "error" is always a failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .driver import Key, RequestResult, RunRecord
from .workload import Workload

NEAR_TIE_NATS = 0.125
CONTEXT = 4  # ids shown before the divergent position


class Divergence(AssertionError):
    """Two runs of one workload disagree; the message is the comparator's report."""

    def __init__(self, message: str, workload: Workload | None = None) -> None:
        super().__init__(message)
        self.workload = workload


@dataclass
class Comparison:
    """What a comparison accepted without failing."""

    compared: int = 0
    near_ties: list[str] = field(default_factory=list)


def compare_runs(reference: RunRecord, candidate: RunRecord, workload: Workload,
                 exact: bool, replay: str | None = None) -> Comparison:
    """Raise :class:`Divergence` at the first request where ``candidate`` departs from
    ``reference``; otherwise return the counts of what was compared and accepted."""
    outcome = Comparison()
    for key in workload.keys():
        ref, got = reference.results.get(key), candidate.results.get(key)
        if ref is None or got is None:
            missing = reference.name if ref is None else candidate.name
            _fail(f"{missing} has no result for request {key[0]!r}#{key[1]}", workload, replay)
        for run, res in ((reference, ref), (candidate, got)):
            if res.finish_reason == "error":
                _fail(f"{run.name}: request {key[0]!r}#{key[1]} failed: {res.error}", workload,
                      replay)
        outcome.compared += 1
        problem = _first_difference(ref, got, exact, reference.name, candidate.name)
        if problem is None:
            continue
        position, why = problem
        if why == "near-tie":
            outcome.near_ties.append(f"{key[0]!r}#{key[1]} at {position}")
            continue
        _fail(_report(key, position, why, reference, candidate, workload, replay), workload,
              replay)
    return outcome


def _first_difference(ref: RequestResult, got: RequestResult, exact: bool, ref_name: str,
                      got_name: str) -> tuple[int, str] | None:
    a, b = ref.token_ids, got.token_ids
    position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    aborted = "abort" in (ref.finish_reason, got.finish_reason)
    if position is None:
        if aborted:
            shorter = ref if len(a) <= len(b) else got
            if shorter.finish_reason == "abort" or len(a) == len(b):
                return None
            return min(len(a), len(b)), "the longer stream belongs to the aborted run"
        if len(a) != len(b):
            return min(len(a), len(b)), "one stream is longer"
        if ref.finish_reason != got.finish_reason:
            return len(a), "finish reasons differ"
        if exact and ref.logprobs != got.logprobs:
            at = next(i for i, (x, y) in enumerate(zip(ref.logprobs or [], got.logprobs or []))
                      if x != y) if ref.logprobs and got.logprobs else 0
            return at, "logprobs differ"
        return None
    if not exact and _near_tie(ref, got, position):
        return position, "near-tie"
    return position, "ids differ"


def _near_tie(ref: RequestResult, got: RequestResult, i: int) -> bool:
    if not (ref.logprobs and got.logprobs and i < len(ref.logprobs) and i < len(got.logprobs)):
        return False
    a, b = ref.token_ids[i], got.token_ids[i]
    for lp, mine, other in ((ref.logprobs[i], a, b), (got.logprobs[i], b, a)):
        if lp is None:
            return False
        ranked = sorted(lp, key=lp.get, reverse=True)
        if other not in ranked[:2] or mine not in lp or abs(lp[mine] - lp[other]) > NEAR_TIE_NATS:
            return False
    return True


def _report(key: Key, i: int, why: str, reference: RunRecord, candidate: RunRecord,
            workload: Workload, replay: str | None) -> str:
    ref, got = reference.results[key], candidate.results[key]
    width = max(len(reference.name), len(candidate.name))
    lines = [f"{candidate.name} diverges from {reference.name}: request {key[0]!r}#{key[1]}, "
             f"output position {i} ({why})"]
    for run, res in ((reference, ref), (candidate, got)):
        lo = max(0, i - CONTEXT)
        shown = " ".join(str(t) for t in res.token_ids[lo:i])
        at = f"[{res.token_ids[i]}]" if i < len(res.token_ids) else "[end]"
        more = " ..." if i + 1 < len(res.token_ids) else ""
        lines.append(f"  {run.name:<{width}}  {'... ' if lo else ''}{shown} {at}{more}   "
                     f"({len(res.token_ids)} ids, finish={res.finish_reason})")
    for run, res in ((reference, ref), (candidate, got)):
        if res.logprobs and i < len(res.logprobs) and res.logprobs[i] is not None:
            top = sorted(res.logprobs[i].items(), key=lambda kv: -kv[1])[:3]
            lines.append(f"  logprobs at {i} in {run.name}: "
                         + ", ".join(f"{t}: {lp:.4f}" for t, lp in top))
    spec = next(r for r, k in zip(workload.requests, workload.keys()) if k == key)
    lines.append(f"  request: prompt of {len(spec.prompt)} ids, arrival {spec.arrival}, "
                 f"{spec.params}")
    lines.append(f"  engine: {workload.engine.describe()}")
    if replay:
        lines.append(f"  replay: lockstep replay {replay}")
    return "\n".join(lines)


def _fail(message: str, workload: Workload, replay: str | None) -> None:
    if replay and "replay:" not in message:
        message += f"\n  replay: lockstep replay {replay}"
    raise Divergence(message, workload)
