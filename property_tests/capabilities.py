"""What an engine under test supports, and how the harness narrows its workloads to it.

An adapter declares a :class:`Capabilities`; strategies and the stateful machine generate only
what it declares, :func:`narrowing` says in words what was left out and why (every run prints it:
never a silent narrowing), and :func:`unsupported` names the first thing a saved workload uses
that the engine cannot run (``lockstep replay`` refuses it with exit status 2).
"""
from __future__ import annotations

from dataclasses import dataclass

from lockstep.engine import SamplingParams

from .workload import Workload

# per-request sampling options, by the SamplingParams fields that carry them
SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "seed", "min_tokens",
                    "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty",
                    "repetition_penalty")
_DEFAULTS = SamplingParams()


@dataclass(frozen=True)
class Capabilities:
    """An engine's declaration. ``sampling``: the per-request options it honours (see
    ``SAMPLING_OPTIONS``; greedy decoding and ``max_tokens`` are always needed).
    ``max_logprobs``: None when it reports no logprobs, k when it reports the sampled token's
    and up to k others. ``modes``: where it runs, as ``(async_scheduling, device)`` pairs.
    ``exact``: its numerics are batch-invariant, so runs compare token for token; otherwise a
    first divergence must be a near-tie, judged on top-2 logprobs (which it must then report),
    or the adapter makes ties impossible and says so in ``notes``."""

    engine: str
    adapter_version: str
    sampling: frozenset[str] = frozenset(SAMPLING_OPTIONS)
    max_logprobs: int | None = 20
    abort: bool = True
    reuse_ids: bool = True
    force_preempt: bool = True
    modes: frozenset[tuple[bool, str]] = frozenset({(False, "sim"), (True, "sim")})
    exact: bool = True
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.sampling) - set(SAMPLING_OPTIONS)
        if unknown:
            raise ValueError(f"Capabilities.sampling: unknown options {sorted(unknown)}; "
                             f"choose from {SAMPLING_OPTIONS}")

    def supports(self, option: str) -> bool:
        return option in self.sampling

    def devices(self) -> list[str]:
        return sorted({device for _, device in self.modes})

    def runs(self, async_scheduling: bool, device: str) -> bool:
        return (async_scheduling, device) in self.modes


def capabilities_of(factory: object) -> Capabilities:
    """``factory.capabilities``; TypeError naming the factory when it declares none."""
    caps = getattr(factory, "capabilities", None)
    if not isinstance(caps, Capabilities):
        raise TypeError(f"engine factory {factory!r} has no `capabilities` (a Capabilities "
                        f"declaring what the engine supports)")
    return caps


def narrowing(caps: Capabilities) -> list[str]:
    """What the harness leaves out for this engine, one line each, with the reason."""
    lines = []
    random = [o for o in ("temperature", "top_k", "top_p", "min_p") if caps.supports(o)]
    if not caps.supports("seed"):
        lines.append("no per-request seed: every request is greedy (unseeded random sampling "
                     "differs from run to run, so it could not be compared)")
    elif "temperature" not in random:
        lines.append("no temperature: every request is greedy")
    for option in ("top_k", "top_p", "min_p", "min_tokens", "stop_token_ids", "ignore_eos"):
        if not caps.supports(option):
            lines.append(f"no {option}: left at its default ({getattr(_DEFAULTS, option)!r})")
    penalties = [o for o in ("presence_penalty", "frequency_penalty", "repetition_penalty")
                 if not caps.supports(o)]
    if penalties:
        lines.append(f"no {', '.join(penalties)}: left at the defaults")
    if caps.max_logprobs is None:
        lines.append("no logprobs: none asked for")
    if not caps.abort:
        lines.append("no abort: no workload aborts a request")
    if not caps.reuse_ids:
        lines.append("no request-id reuse: every request has an id of its own")
    if not caps.force_preempt:
        lines.append("no forced preemption: the engine preempts only when it runs out of KV "
                     "blocks")
    return lines + list(caps.notes)


def narrow_params(params: SamplingParams, caps: Capabilities) -> SamplingParams:
    """``params`` with every option ``caps`` lacks set back to its default (greedy where
    random sampling cannot be compared)."""
    changes = {}
    greedy = not caps.supports("seed") or not caps.supports("temperature")
    if greedy:
        changes.update(temperature=0.0, seed=None)
    for option in SAMPLING_OPTIONS:
        if not caps.supports(option) and option not in changes:
            changes[option] = getattr(_DEFAULTS, option)
    if params.logprobs is not None:
        if caps.max_logprobs is None:
            changes["logprobs"] = None
        elif params.logprobs > caps.max_logprobs:
            changes["logprobs"] = caps.max_logprobs
    if not changes:
        return params
    fields = {**{f: getattr(params, f) for f in params.__dataclass_fields__}, **changes}
    return SamplingParams(**fields)


def unsupported(workload: Workload, caps: Capabilities) -> str | None:
    """The first thing ``workload`` uses that ``caps`` does not declare, naming the field; None
    when the engine can run all of it."""
    for i, request in enumerate(workload.requests):
        params = request.params
        narrowed = narrow_params(params, caps)
        for option in (*SAMPLING_OPTIONS, "logprobs"):
            if getattr(narrowed, option) != getattr(params, option):
                return (f"requests[{i}].params.{option}={getattr(params, option)!r}: "
                        f"{caps.engine} does not support it")
    if workload.aborts and not caps.abort:
        return f"aborts[0]: {caps.engine} cannot abort a request"
    ids = [r.request_id for r in workload.requests]
    if len(set(ids)) < len(ids) and not caps.reuse_ids:
        return f"requests: an id is reused; {caps.engine} cannot reuse request ids"
    if workload.preempt_steps and not caps.force_preempt:
        return f"preempt_steps: {caps.engine} cannot be forced to preempt"
    return None


def narrow_workload(workload: Workload, caps: Capabilities) -> Workload:
    """``workload`` with only what ``caps`` declares: options reset (greedy where random
    sampling cannot be compared), aborts and forced preemptions dropped, reused ids renamed."""
    import dataclasses
    requests, seen = [], {}
    for r in workload.requests:
        rid = r.request_id
        if not caps.reuse_ids and rid in seen:
            rid = f"{rid}~{seen[r.request_id]}"
        seen[r.request_id] = seen.get(r.request_id, 0) + 1
        requests.append(dataclasses.replace(r, request_id=rid,
                                            params=narrow_params(r.params, caps)))
    # an abort names (id, occurrence): a renamed occurrence is occurrence 0 of its new id
    renamed = {key: (r.request_id, 0 if r.request_id != key[0] else key[1])
               for key, r in zip(workload.keys(), requests)}
    aborts = tuple(dataclasses.replace(a, request_id=renamed[key][0], occurrence=renamed[key][1])
                   for a in workload.aborts
                   if (key := (a.request_id, a.occurrence)) in renamed) if caps.abort else ()
    return dataclasses.replace(
        workload, requests=tuple(requests), aborts=aborts,
        preempt_steps=workload.preempt_steps if caps.force_preempt else ())
