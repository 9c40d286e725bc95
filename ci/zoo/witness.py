"""Demonstrations: an injection must change what the engine does, or it is no bug at all.

A :class:`Witness` names one workload and one mode. :func:`demonstrate` runs it on the bare
engine (no harness invariants, no comparison between modes) once before the injection is applied
and once after, and reports how the faulty run departs from the clean one: different outputs
(ids, finish reasons, logprobs), a crash or a request that ended in "error", a hang (the step
bound passed, or blocked inside a step until the caller's watchdog interrupted it), KV blocks or
slots kept by finished requests, a host sync reported by ``sync_guard.log()`` around the steps,
a buffer race, lost overlap (async sim lazy: a step launched after the previous step's device
work had already run), or more device steps than needed (more steps, or more preemptions) for
the same outputs. The zoo keeps no injection whose demonstration shows nothing.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import sync_guard
from lockstep.engine.config import EngineConfig
from lockstep.engine.core import EngineCore
from lockstep.property_tests.attribution import attribution_errors
from lockstep.property_tests.driver import step_bound
from lockstep.property_tests.engine_under_test import Mode, heartbeat
from lockstep.property_tests.faults import Shot, injected
from lockstep.property_tests.workload import ClientCalls, Workload

from ..targeted import TARGETED
from ..watchdog import CheckHang

KINDS = ("outputs", "crash", "hang", "leak", "sync", "race", "overlap", "wasted work",
         "timeline")
SYNC = Mode(False, "sim", "eager")
LAZY = Mode(True, "sim", "lazy")
THREADED = Mode(True, "sim", "threaded")
SKEWED = Mode(True, "sim", "skewed")
SKEWED_EAGER_COLLECT = Mode(True, "sim", "skewed", collect="eager")


@dataclass(frozen=True)
class Witness:
    """Run targeted workload ``workload`` in ``mode``; ``expect`` lists the kinds of departure
    that count (see :data:`KINDS`); ``tries`` engine seeds for timing-dependent bugs."""

    workload: str
    mode: Mode
    expect: tuple[str, ...]
    tries: int = 1
    fault: tuple[str, int] | None = None   # (phase, call): a fault injected in both runs

    def __post_init__(self) -> None:
        unknown = set(self.expect) - set(KINDS)
        if unknown or self.workload not in TARGETED:
            raise ValueError(f"Witness({self.workload!r}, expect={self.expect}): unknown "
                             f"{sorted(unknown) or self.workload}")


@dataclass
class Outcome:
    outputs: dict = field(default_factory=dict)   # (id, occurrence) -> last output seen
    error: str | None = None
    hung: bool = False
    leak: str | None = None
    syncs: list[str] = field(default_factory=list)
    stale_launches: int = 0
    steps: int = 0
    preemptions: int = 0
    attribution: list[str] = field(default_factory=list)   # timeline spans on the wrong step


def run_bare(workload: Workload, mode: Mode, fault: tuple[str, int] | None = None) -> Outcome:
    """``workload`` on a bare EngineCore in ``mode``: what a user of the engine would see
    (with ``fault``, an :class:`~lockstep.property_tests.faults.InjectedFault` at that call of
    that phase: the containment path)."""
    spec, outcome = workload.engine, Outcome()
    core = EngineCore(EngineConfig(
        model=spec.model, device=mode.device, sim_policy=mode.sim_policy,
        async_scheduling=mode.async_scheduling, block_size=spec.block_size,
        num_kv_blocks=spec.num_kv_blocks, max_num_seqs=spec.max_num_seqs,
        max_num_batched_tokens=spec.max_num_batched_tokens, max_model_len=spec.max_model_len,
        seed=spec.seed, collect=mode.collect, output_wait=mode.output_wait))
    if mode.policy in ("lazy", "skewed"):  # deterministic there; on threaded, timing decides
        _count_stale_launches(core, outcome)
    reports: list = []
    shot = nullcontext() if fault is None else injected(core, Shot(*fault))
    try:
        with sync_guard.race_check(), sync_guard.log() as reports, shot:
            _drive(core, workload, outcome)
    except CheckHang:  # blocked inside a step: the caller's watchdog interrupted it
        outcome.hung = True
    except Exception as exc:  # a crash, a guard error: the departure itself
        outcome.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    outcome.syncs = [r.op for r in reports if r.allowed_by is None]
    outcome.steps, outcome.preemptions = core.num_steps, core.scheduler.num_preemptions
    if outcome.error is None and not outcome.hung:
        outcome.leak = _leak(core)
        outcome.attribution = attribution_errors(core.timeline.host_spans,
                                                 core.timeline.device_spans())
    return outcome


def _drive(core: EngineCore, workload: Workload, outcome: Outcome) -> None:
    """The harness driver's calls (:class:`ClientCalls`), with no rules: only what comes out."""
    client = ClientCalls(workload)
    live: dict[str, tuple[str, int]] = {}
    abort_due: dict[str, deque] = defaultdict(deque)   # aborted keys whose final output is due
    preempt = set(workload.preempt_steps)
    step, limit = 0, step_bound(workload)
    while client.pending or core.has_unfinished_requests():
        for call in client.calls(step, live.__contains__):
            if call[0] == "add":
                spec = workload.requests[call[1]]
                core._num_added = call[1]
                core.add_request(spec.request_id, list(spec.prompt), spec.params)
                live[spec.request_id] = client.keys[call[1]]
            elif live.get(call[1]) == (call[1], call[2]) and core.abort_request(call[1]):
                abort_due[call[1]].append(live.pop(call[1]))
        if step in preempt and core.scheduler.running:
            core.scheduler._preempt(core.scheduler.running[-1])
        heartbeat.beat(f"demonstration {mode_name(core)}", step, True, core.activity)
        outputs = core.step()
        heartbeat.beat(f"demonstration {mode_name(core)}", step, False)
        for out in outputs:
            rid = out.request_id
            if abort_due[rid] and out.finish_reason == "abort":
                key = abort_due[rid].popleft()
            else:
                key = live.get(rid, (rid, -1))
                if out.finished:
                    live.pop(rid, None)
            outcome.outputs[key] = (tuple(out.token_ids), out.finish_reason, out.logprobs,
                                    out.error is not None)
        step += 1
        if step > limit:
            outcome.hung = True
            return


def _count_stale_launches(core: EngineCore, outcome: Outcome) -> None:
    """Count launches that returned with the previous step's device work already run."""
    runner, execute = core.runner, core.runner.execute_model

    def counted(sched, block_tables, step):
        previous = core._in_flight[-1][2] if core._in_flight else None
        pending = execute(sched, block_tables, step)
        if previous is not None and previous.device_done.is_done():
            outcome.stale_launches += 1
        return pending
    runner.execute_model = counted


def mode_name(core: EngineCore) -> str:
    cfg = core.config
    return Mode(cfg.async_scheduling, cfg.device, cfg.sim_policy or "eager", cfg.collect,
                cfg.output_wait).name


def _leak(core: EngineCore) -> str | None:
    kv, batch = core.kv, core.runner.input_batch
    if kv.num_free_blocks != kv.pool.num_blocks:
        return f"{kv.pool.num_blocks - kv.num_free_blocks} KV blocks held after every request ended"
    kept = set(batch.slot_of) - set(core.scheduler._freed)
    if kept:
        return f"slots kept by finished requests {sorted(kept)}"
    return None


def departures(clean: Outcome, faulty: Outcome, contained: bool = False) -> dict[str, str]:
    """Each way ``faulty`` departs from ``clean``, by kind, with a short description
    (``contained``: both ran with an injected fault, so requests that ended in "error" are
    the clean run's too, and only different outputs count)."""
    found: dict[str, str] = {}
    if faulty.error and not clean.error:
        kind = "race" if faulty.error.startswith("BufferRace") else "crash"
        found[kind] = faulty.error
    if faulty.hung and not clean.hung:
        found["hang"] = f"not finished after {faulty.steps} engine steps"
    if faulty.leak and not clean.leak:
        found["leak"] = faulty.leak
    new_syncs = sorted(set(faulty.syncs) - set(clean.syncs))
    if new_syncs:
        found["sync"] = f"host syncs in the step: {', '.join(new_syncs)}"
    if faulty.stale_launches > clean.stale_launches:
        found["overlap"] = (f"{faulty.stale_launches} launches after the previous step's device "
                            f"work had run (clean: {clean.stale_launches})")
    if faulty.attribution and not clean.attribution:
        found["timeline"] = faulty.attribution[0]
    errors = [k for k, v in faulty.outputs.items() if v[3] and not contained]
    if errors and not found.get("crash"):
        found["crash"] = f"request {errors[0][0]!r} ended with an error"
    if not (faulty.error or faulty.hung):
        differ = [k for k in clean.outputs if faulty.outputs.get(k) != clean.outputs[k]]
        extra = [k for k in faulty.outputs if k not in clean.outputs]
        if differ:
            key = differ[0]
            got = faulty.outputs.get(key)
            found["outputs"] = (f"request {key[0]!r}: {clean.outputs[key][:2]} -> "
                                f"{got[:2] if got else 'no output'}")
        elif extra:
            found["outputs"] = (f"an output for {extra[0][0]!r} after it finished: "
                                f"{faulty.outputs[extra[0]][:2]}")
        elif (faulty.steps, faulty.preemptions) > (clean.steps, clean.preemptions):
            found["wasted work"] = (f"{faulty.steps} engine steps and {faulty.preemptions} "
                                    f"preemptions for the clean run's {clean.steps} and "
                                    f"{clean.preemptions}")
    return found


def demonstrate(witness: Witness, apply: Callable[[], Callable[[], None]]) -> str:
    """Run ``witness`` clean, then with the injection (``apply()`` patches and returns the
    undo); return the departure, or raise AssertionError if none of the expected kinds shows."""
    make, seen = TARGETED[witness.workload], {}
    for seed in range(witness.tries):
        workload = make()
        workload = dataclasses.replace(workload,
                                       engine=dataclasses.replace(workload.engine, seed=seed))
        clean = run_bare(workload, witness.mode, witness.fault)
        undo = apply()
        try:
            faulty = run_bare(workload, witness.mode, witness.fault)
        finally:
            undo()
        seen = departures(clean, faulty, contained=witness.fault is not None)
        hits = [k for k in witness.expect if k in seen]
        if hits:
            return f"{witness.workload} on {witness.mode.name}: {hits[0]}: {seen[hits[0]]}"
    raise AssertionError(f"no {'/'.join(witness.expect)} on {witness.workload} "
                         f"({witness.mode.name}, {witness.tries} tries); saw {seen or 'nothing'}")
