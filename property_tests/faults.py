"""Faults injected into the phases of Lockstep's engine step, judged by the containment contract.

A fault is one raised :class:`InjectedFault` at the k-th call of one phase of one engine:

* ``schedule`` (``Scheduler.schedule``), ``launch`` (``ModelRunner.execute_model``),
  ``prepare`` (``InputBatch.prepare``, inside the launch);
* ``device`` (the model runner's device work, run later on a stream queue on sim lazy and
  threaded) and ``fill`` (the end of it, after the model ran);
* ``wait`` (``PendingOutput.get_output``, the output wait) and ``update``
  (``Scheduler.update_from_output``).

The contract (``EngineCore.step``): the requests the failing phase touched end with "error",
the cause named, having received a prefix of their tokens; every other request is exact; the
engine drains (a step bound: a run that never finishes is a failure, not a hang of the
harness); afterwards nothing is held (KV blocks, slots, requests, steps in flight); and a fresh
request then runs exactly as it runs alone.

:func:`fault_sweep` puts a fault at every call of every phase of one workload whose requests
retire at staggered steps (in async mode, at most launches a request's last token is in
flight and the launching step does not hold it: the state where a launch failure that drops
the steps in flight loses that request), in every mode. :func:`check_fault` judges one.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lockstep.engine import SamplingParams as P
from lockstep.engine.core import EngineCore
from lockstep.engine.input_batch import InputBatch
from lockstep.engine.model_runner import DeviceResult, ModelRunner, PendingOutput
from lockstep.engine.scheduler import Scheduler

from .driver import EngineHang, RunRecord, drive
from .engine_under_test import LockstepEngine, Mode
from .workload import EngineSpec, RequestSpec, Workload

PHASES: dict[str, tuple[type, str]] = {
    "schedule": (Scheduler, "schedule"), "launch": (ModelRunner, "execute_model"),
    "prepare": (InputBatch, "prepare"), "device": (ModelRunner, "_device_step"),
    "fill": (DeviceResult, "fill"), "wait": (PendingOutput, "get_output"),
    "update": (Scheduler, "update_from_output")}
SIM_FAULT_MODES = (Mode(False, "sim", "eager"), Mode(True, "sim", "eager"),
                   Mode(True, "sim", "lazy"), Mode(True, "sim", "threaded"),
                   Mode(True, "sim", "skewed"), Mode(False, "sim", "lazy"),
                   Mode(True, "sim", "skewed", collect="eager"),
                   Mode(True, "sim", "lazy", output_wait="poll"))
MAX_SWEEP_CALLS = 24
ERROR_STEP = re.compile(r"step (\d+) failed in (\w+)")


class InjectedFault(RuntimeError):
    """The fault the harness raised (never a bug of its own)."""


class FaultContractError(AssertionError):
    """The engine broke the containment contract after an injected fault."""


@dataclass
class Shot:
    """One injected fault and what the engine held when it fired."""

    phase: str
    at_call: int
    calls: int = 0
    fired: bool = False
    step: int | None = None               # the engine step it struck (schedule: the next one)
    touched: set[str] = field(default_factory=set)      # unfinished requests it touched
    bystanders: set[str] = field(default_factory=set)   # in flight, not in the failing step
    rows: dict[int, set[str]] = field(default_factory=dict)   # each launched step's requests

    def __str__(self) -> str:
        return f"{self.phase} fault at call {self.at_call}"


_MISSING = object()


@contextmanager
def _patched(obj: object, name: str, value: object) -> Iterator[None]:
    """``obj.name = value`` for the duration: on a class, the static attribute comes back; on an
    instance, its own attribute (or none) does."""
    previous = inspect.getattr_static(obj, name) if isinstance(obj, type) else \
        obj.__dict__.get(name, _MISSING)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if previous is _MISSING:
            del obj.__dict__[name]
        else:
            setattr(obj, name, previous)


@contextmanager
def injected(core: EngineCore, shot: Shot) -> Iterator[dict[int, set[str]]]:
    """Raise :class:`InjectedFault` at call ``shot.at_call`` of ``shot.phase`` in ``core`` (the
    per-step objects' methods are patched on their classes, for the duration). Yields the
    request ids of each launched step, recorded as they launch (the fault's reach)."""
    rows: dict[int, set[str]] = {}
    owner, name = PHASES[shot.phase]
    instance = {Scheduler: core.scheduler, ModelRunner: core.runner,
                InputBatch: core.runner.input_batch}.get(owner)

    def fire(args: tuple) -> None:
        shot.calls += 1
        if shot.calls == shot.at_call:
            shot.fired = True
            _note_reach(core, shot, args)
            raise InjectedFault(f"injected {shot}")

    if instance is not None:
        real = getattr(instance, name)

        def faulty(*args, **kwargs):
            fire(args)
            return real(*args, **kwargs)
        patch = _patched(instance, name, faulty)
    else:
        method = inspect.getattr_static(owner, name)

        def faulty_method(self, *args, **kwargs):
            fire((self, *args))
            return method(self, *args, **kwargs)
        patch = _patched(owner, name, faulty_method)
    with patch:
        launch = core.runner.execute_model   # the faulty one, for a launch fault

        def recorded(sched, block_tables, step):
            rows[step] = {row.request.request_id for row in sched.rows}
            return launch(sched, block_tables, step)
        with _patched(core.runner, "execute_model", recorded):
            yield rows


def _note_reach(core, shot: Shot, args: tuple) -> None:
    """The step the fault strikes and the unfinished requests it touches (for device work, known
    only from the error it causes: see :func:`check_fault`); and the bystanders: requests of
    the steps in flight that the failing step does not hold."""
    in_flight = {row.request.request_id for _, sched, _ in core._in_flight for row in sched.rows}
    if shot.phase == "schedule":
        shot.step = core.num_steps + 1
        shot.touched = {r.request_id for r in core.scheduler.running}
    elif shot.phase in ("launch", "prepare"):
        shot.step = core.num_steps
        shot.touched = {row.request.request_id for row in args[0].rows}
    elif shot.phase == "wait":   # args[0]: the step's PendingOutput (already out of flight)
        shot.touched = {row.request.request_id for row in args[0].sched.rows}
    elif shot.phase == "update":
        shot.touched = {row.request.request_id for row in args[0].rows}
    unfinished = {rid for rid, req in core.scheduler.requests.items() if not req.is_finished}
    shot.touched &= unfinished
    shot.bystanders = (in_flight - shot.touched) & unfinished


def retiring_workload() -> Workload:
    """Requests that retire at staggered steps (max_tokens 1 to 7, arrivals spread, a chunked
    prefill, penalties and seeds): in async mode most launches have some request's last
    token in flight outside the launching step."""
    def prompt(n: int, a: int) -> tuple[int, ...]:
        return tuple((a * j + 5) % 499 + 1 for j in range(n))
    requests = tuple(RequestSpec(f"f{i}", prompt(3 + 4 * (i % 3), 11 + 2 * i), P(
        temperature=0.8 * (i % 2), seed=40 + i, max_tokens=1 + (i * 3) % 7,
        presence_penalty=0.5 * (i % 3 == 1), logprobs=1 if i % 4 == 0 else None), i // 2)
        for i in range(8))
    return Workload(EngineSpec(model="oracle", block_size=4, max_num_batched_tokens=12,
                               max_num_seqs=4), requests)


def fresh_request(spec: EngineSpec) -> RequestSpec:
    """The request run after the faulty workload: sampled, penalised, with logprobs; as long as
    the engine's KV cache allows (a tight cache holds a few tokens only)."""
    capacity = 64 if spec.num_kv_blocks is None else spec.num_kv_blocks * spec.block_size
    prompt = (9, 8, 7, 6, 5)[:max(1, min(5, capacity - 1))]
    return RequestSpec("fresh", prompt, P(
        temperature=1.0, seed=99, max_tokens=max(1, min(6, capacity - len(prompt))),
        frequency_penalty=0.5, logprobs=1))


def run_with_fault(workload: Workload, mode: Mode, shot: Shot) -> tuple[RunRecord,
                                                                         LockstepEngine]:
    engine = LockstepEngine(workload.engine, mode)
    with injected(engine.core, shot) as rows:
        record = drive(workload, engine, f"{mode.name} with an injected {shot}",
                       engine.eos_token_ids)
    shot.rows = rows
    return record, engine


def check_fault(workload: Workload, mode: Mode, shot: Shot, reference: RunRecord,
                fresh_reference: RunRecord) -> Shot:
    """Run ``workload`` in ``mode`` with the fault ``shot``; raise
    :class:`FaultContractError` where the contract is broken."""
    where = f"{mode.name}, {shot}"
    try:
        record, engine = run_with_fault(workload, mode, shot)
    except EngineHang as exc:
        raise FaultContractError(f"{where}: the engine did not drain: {exc}") from None
    except InjectedFault as exc:
        raise FaultContractError(f"{where}: the injected fault reached the caller: {exc}") \
            from None
    except Exception as exc:   # an invariant, an output rule, sync_guard, a crash
        raise FaultContractError(f"{where}: {type(exc).__name__}: {exc}") from exc
    if not shot.fired:
        return shot
    errors = {key: r for key, r in record.results.items() if r.finish_reason == "error"}
    steps = set()
    for key, result in errors.items():
        found = ERROR_STEP.search(result.error or "")
        if "InjectedFault" not in (result.error or "") or not found:
            raise FaultContractError(f"{where}: request {key[0]!r} ended with an error that "
                                     f"does not name the injected fault: {result.error!r}")
        steps.add(int(found.group(1)))
        if shot.phase not in ("device", "fill") and key[0] not in shot.touched:
            raise FaultContractError(f"{where}: request {key[0]!r} ended with an error but the "
                                     f"fault touched only {sorted(shot.touched)}")
        ref = reference.results[key].token_ids
        if result.token_ids != ref[:len(result.token_ids)]:
            raise FaultContractError(f"{where}: failed request {key[0]!r} received "
                                     f"{result.token_ids}, not a prefix of {ref}")
    if len(steps) > 1:
        raise FaultContractError(f"{where}: one fault ended requests of steps {sorted(steps)}")
    if shot.phase in ("device", "fill") and steps:   # the device work of the step it names
        shot.step = steps.pop()
        shot.touched = shot.rows.get(shot.step, set())
        outside = sorted(k[0] for k in errors if k[0] not in shot.touched)
        if outside:
            raise FaultContractError(f"{where}: the device work of step {shot.step} failed and "
                                     f"requests outside it ended with an error: {outside}")
    if shot.touched and not errors:
        raise FaultContractError(f"{where}: the fault touched {sorted(shot.touched)} and no "
                                 f"request ended with an error")
    for key, ref in reference.results.items():
        got = record.results.get(key)
        if key in errors:
            continue
        if got is None or (got.token_ids, got.finish_reason, got.logprobs) != (
                ref.token_ids, ref.finish_reason, ref.logprobs):
            raise FaultContractError(
                f"{where}: untouched request {key[0]!r}: expected {ref.token_ids} "
                f"({ref.finish_reason}), got "
                f"{'no final output' if got is None else (got.token_ids, got.finish_reason)}")
    check_nothing_held(engine, where)
    try:
        fresh = drive(Workload(workload.engine, (fresh_request(workload.engine),)), engine,
                      f"{where}, then fresh", engine.eos_token_ids)
    except EngineHang as exc:
        raise FaultContractError(f"{where}: a fresh request afterwards never finished: "
                                 f"{exc}") from None
    got, ref = fresh.results[("fresh", 0)], fresh_reference.results[("fresh", 0)]
    if (got.token_ids, got.finish_reason) != (ref.token_ids, ref.finish_reason):
        raise FaultContractError(f"{where}: a fresh request afterwards gave {got.token_ids} "
                                 f"({got.finish_reason}), alone it gives {ref.token_ids}")
    check_nothing_held(engine, f"{where}, after the fresh request")
    return shot


def check_nothing_held(engine: LockstepEngine, where: str) -> None:
    """Once every request ended: no KV block, request, step in flight or slot is held."""
    core = engine.core
    if core.kv.num_free_blocks != core.kv.pool.num_blocks:
        raise FaultContractError(f"{where}: {core.kv.pool.num_blocks - core.kv.num_free_blocks}"
                                 f" KV blocks held after every request ended")
    if core.scheduler.requests or core._in_flight:
        raise FaultContractError(f"{where}: still held: requests "
                                 f"{sorted(core.scheduler.requests)}, "
                                 f"{len(core._in_flight)} steps in flight")
    held = set(core.runner.input_batch.slot_of) - set(core.scheduler._freed)
    if held:
        raise FaultContractError(f"{where}: slots still held by {sorted(held)}")


def references(workload: Workload) -> tuple[RunRecord, RunRecord]:
    """The fault-free run (sync, eager) and the fresh request alone."""
    sync = Mode(False, "sim", "eager")
    plain, alone = LockstepEngine(workload.engine, sync), LockstepEngine(workload.engine, sync)
    return (drive(workload, plain, "sync sim/eager", plain.eos_token_ids),
            drive(Workload(workload.engine, (fresh_request(workload.engine),)), alone,
                  "fresh alone", alone.eos_token_ids))


@dataclass
class SweepReport:
    faults: int = 0           # faults that fired
    bystander_faults: int = 0  # ... with a request's tokens in flight outside the failing step
    by_phase: dict[str, int] = field(default_factory=dict)


def fault_sweep(workload: Workload | None = None, modes: tuple[Mode, ...] = SIM_FAULT_MODES,
                phases: tuple[str, ...] = tuple(PHASES)) -> SweepReport:
    """A fault at each call (up to :data:`MAX_SWEEP_CALLS`) of each phase, in each mode."""
    workload = workload or retiring_workload()
    reference, fresh = references(workload)
    report = SweepReport()
    for mode in modes:
        for phase in phases:
            for at_call in range(1, MAX_SWEEP_CALLS + 1):
                shot = check_fault(workload, mode, Shot(phase, at_call), reference, fresh)
                if not shot.fired:
                    break   # past the last call of this phase in this run
                report.faults += 1
                report.bystander_faults += bool(shot.bystanders)
                report.by_phase[phase] = report.by_phase.get(phase, 0) + 1
    return report


def random_faults_property(modes: tuple[Mode, ...] = SIM_FAULT_MODES):
    """A hypothesis property: a generated workload (no aborts or forced preemptions, whose
    timing a fault may shift), one fault at a drawn call of a drawn phase, in a drawn mode.
    A failure saves the workload and names the fault (``python -m
    lockstep.property_tests.faults FILE --mode ... --phase ... --call ...`` replays it)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from .properties import failure, replay_dir
    from .strategies import workloads

    @given(workload=workloads(model="oracle"), mode=st.sampled_from(modes),
           phase=st.sampled_from(list(PHASES)), at_call=st.integers(1, 16))
    def faults_are_contained(workload: Workload, mode: Mode, phase: str, at_call: int) -> None:
        workload = dataclasses.replace(workload, aborts=(), preempt_steps=())
        reference, fresh = references(workload)
        try:
            check_fault(workload, mode, Shot(phase, at_call), reference, fresh)
        except FaultContractError as exc:
            path = replay_dir() / "faults_are_contained.json"
            saved = failure(exc, workload, path)
            raise FaultContractError(
                f"{exc}\n  replay: python -m lockstep.property_tests.faults {path} --mode "
                f"{_mode_arg(mode)} --phase {phase} --call {at_call}") from saved
    return faults_are_contained


def _mode_arg(mode: Mode) -> str:
    return f"{'async' if mode.async_scheduling else 'sync'}/{mode.policy}"


def main(argv: list[str] | None = None) -> int:
    """Replay one fault on a saved workload: exit 0 when contained, 1 when not, 2 bad input."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m lockstep.property_tests.faults",
                                     description=main.__doc__)
    parser.add_argument("workload", help="a workload file (a replay file)")
    parser.add_argument("--mode", default="async/lazy", help="sync|async / eager|lazy|threaded"
                        "|skewed (the simulated device)")
    parser.add_argument("--phase", required=True, choices=list(PHASES))
    parser.add_argument("--call", type=int, required=True)
    args = parser.parse_args(argv)
    kind, _, policy = args.mode.partition("/")
    if kind not in ("sync", "async") or policy not in ("eager", "lazy", "threaded", "skewed"):
        print(f"--mode={args.mode!r}: give sync|async/eager|lazy|threaded|skewed",
              file=sys.stderr)
        return 2
    if args.call < 1:
        print(f"--call={args.call}: at least 1", file=sys.stderr)
        return 2
    try:
        workload = Workload.load(args.workload)
    except (OSError, ValueError) as exc:
        print(f"{args.workload}: {exc}", file=sys.stderr)
        return 2
    reference, fresh = references(workload)
    shot = Shot(args.phase, args.call)
    try:
        check_fault(workload, Mode(kind == "async", "sim", policy), shot, reference, fresh)
    except FaultContractError as exc:
        print(f"not contained: {exc}")
        return 1
    print(f"contained ({'fired' if shot.fired else 'the run made fewer calls: nothing fired'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
