"""The differential runner: one workload through three kinds of reference.

1. the sync engine (the reference);
2. the async engine on ``sim`` eager, lazy and threaded (and ``cuda`` when asked);
3. every request *alone* in a fresh sync engine with a roomy cache and no chunking, which shares
   no batching with either: a bug in code sync and async share (penalty bookkeeping, resume
   after preemption) makes (1) and (2) agree while both are wrong, and (3) catches it.

Solo runs are cached by request (engine model and seed, prompt, parameters, and for unseeded
sampling the arrival index), so the search pays for each distinct request once.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lockstep.engine import SamplingParams

from .comparator import Comparison, compare_runs
from .driver import RequestResult, RunRecord, drive
from .capabilities import capabilities_of
from .engine_under_test import ASYNC_MODES, SYNC, EngineFactory, Mode, lockstep_engine
from .invariants import InvariantViolation
from .occupancy import occupancy_applies, occupancy_errors
from .workload import EngineSpec, RequestSpec, Workload

SOLO_CACHE_SIZE = 4096
_solo_cache: "OrderedDict[tuple, RequestResult]" = OrderedDict()


@dataclass
class DifferentialReport:
    """What a passing differential run compared, accepted and reached."""

    runs: dict[str, RunRecord] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)

    @property
    def near_ties(self) -> int:
        return sum(len(c.near_ties) for c in self.comparisons.values())

    def stat(self, name: str) -> int:
        return max((r.stats.get(name, 0) for r in self.runs.values()), default=0)


def is_exact(spec: EngineSpec, factory: EngineFactory = lockstep_engine) -> bool:
    """Exact comparison for the batch-invariant oracle, for an engine that declares exact
    numerics, and for one that reports no top-2 logprobs to judge a near-tie with (its adapter
    must make ties impossible); near-tie rules for other float models."""
    caps = capabilities_of(factory)
    return (spec.model == "oracle" or caps.exact or caps.max_logprobs is None
            or caps.max_logprobs < 2)


def for_comparison(workload: Workload, factory: EngineFactory = lockstep_engine) -> Workload:
    """Float models need each run's top-2 logprobs to judge a near-tie: ask for at least 2."""
    if is_exact(workload.engine, factory):
        return workload
    reqs = tuple(dataclasses.replace(r, params=dataclasses.replace(
        r.params, logprobs=max(r.params.logprobs or 0, 2))) for r in workload.requests)
    return dataclasses.replace(workload, requests=reqs)


def run_mode(workload: Workload, mode: Mode, factory: EngineFactory = lockstep_engine,
             guard: bool = True) -> RunRecord:
    engine = factory(workload.engine, mode)
    return drive(workload, engine, mode.name, getattr(engine, "eos_token_ids", ()), guard)


def reference_mode(modes: tuple[Mode, ...], reference: Mode | None = None) -> Mode:
    """The sync mode the others are compared with: ``reference``, or sync on ``modes``' one
    device (float logprobs differ between devices)."""
    devices = {m.device for m in modes} | ({reference.device} if reference else set())
    if len(devices) != 1:
        raise ValueError(f"modes={[m.name for m in modes]}: give modes of one device (the sync "
                         f"reference runs there; float logprobs differ between devices)")
    if reference is not None:
        return reference
    device = devices.pop()
    return SYNC if device == "sim" else Mode(False, device)


def run_differential(workload: Workload, modes: tuple[Mode, ...] = ASYNC_MODES,
                     factory: EngineFactory = lockstep_engine, solo: bool = True,
                     replay: str | None = None, guard: bool = True,
                     reference: Mode | None = None) -> DifferentialReport:
    """Run ``workload`` on the sync ``reference`` (by default sync on ``modes``' device), on
    each of ``modes`` and (``solo``) each request alone; raise
    :class:`~lockstep.property_tests.comparator.Divergence` or an invariant error on failure."""
    sync = reference_mode(modes, reference)
    workload = for_comparison(workload, factory)
    exact = is_exact(workload.engine, factory)
    report = DifferentialReport()
    # threaded sim spends its time waiting for its device threads: run it beside the others
    waiting = [m for m in modes if m.device == "sim" and m.policy == "threaded"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        background = {m: pool.submit(run_mode, workload, m, factory, guard) for m in waiting}
        reference = report.runs[sync.name] = run_mode(workload, sync, factory, guard)
        for mode in modes:
            run = background[mode].result() if mode in background else run_mode(
                workload, mode, factory, guard)
            report.runs[mode.name] = run
            report.comparisons[mode.name] = compare_runs(reference, run, workload, exact, replay)
            if mode.async_scheduling and occupancy_applies(workload, reference, run):
                _check_occupancy(reference, run)
    if solo:
        # solo runs witness token streams; the batched runs above already ran this code guarded
        alone = report.runs["solo"] = run_solo(workload, factory, guard=False, mode=sync)
        report.comparisons["solo"] = compare_runs(alone, reference, workload, exact, replay)
    return report


def _check_occupancy(sync: RunRecord, run: RunRecord) -> None:
    """Async runs no more and no smaller steps than sync (:mod:`.occupancy`)."""
    problems = occupancy_errors(sync.stats["rows_per_step"], run.stats["rows_per_step"])
    if problems:
        raise InvariantViolation(f"{run.name}: occupancy: {'; '.join(problems)}")


def solo_spec(spec: EngineSpec, request: RequestSpec) -> EngineSpec:
    need = len(request.prompt) + request.params.max_tokens
    return dataclasses.replace(spec, num_kv_blocks=-(-need // spec.block_size) + 1,
                               max_num_batched_tokens=max(need, 16), max_num_seqs=1)


def run_solo(workload: Workload, factory: EngineFactory = lockstep_engine,
             guard: bool = False, mode: Mode = SYNC) -> RunRecord:
    """Each request alone in a fresh sync engine (cached by request)."""
    record = RunRecord("solo")
    for index, (spec, key) in enumerate(zip(workload.requests, workload.keys())):
        record.results[key] = solo_result(workload.engine, spec, index, factory, guard, mode)
    return record


def solo_result(spec: EngineSpec, request: RequestSpec, index: int,
                factory: EngineFactory = lockstep_engine, guard: bool = False,
                mode: Mode = SYNC) -> RequestResult:
    """``request`` alone in a fresh sync engine, as the ``index``-th arrival (cached)."""
    cache_key = (mode, *_solo_key(spec, request, index, factory))
    if cache_key not in _solo_cache:
        alone = Workload(solo_spec(spec, request),
                         (RequestSpec(request.request_id, request.prompt, request.params, 0),))
        engine = factory(alone.engine, mode)
        # the same arrival index as in the batched runs: unseeded streams are keyed on it
        result = drive(alone, engine, "solo", getattr(engine, "eos_token_ids", ()), guard,
                       first_arrival_index=index)
        _solo_cache[cache_key] = result.results[(request.request_id, 0)]
        if len(_solo_cache) > SOLO_CACHE_SIZE:
            _solo_cache.popitem(last=False)
    return _solo_cache[cache_key]


def _solo_key(spec: EngineSpec, request: RequestSpec, index: int, factory) -> tuple:
    params: SamplingParams = request.params
    unseeded_random = params.seed is None and not params.greedy
    return (factory, spec.model, spec.seed, spec.block_size, spec.max_model_len,
            request.prompt, params, index if unseeded_random else None)
