"""The stateful machine with injected faults: the containment contract under random operations.

:class:`FaultMachine` is the :class:`~lockstep.property_tests.machine.EngineMachine` (its
rules: add, abort, reuse an id, step, force a preemption, drain) with one more rule, which
arms an injected fault: a drawn phase of the engine step
(:data:`~lockstep.property_tests.faults.PHASES`) failing at its 1st to 3rd call from then on,
on each async engine (sim lazy and sim skewed, each an
:class:`~lockstep.property_tests.armed_engine.ArmedEngine`); and the same rule aimed at one
hard state (a launch failing while a request's last token is in flight outside it). The sync
engine on sim eager runs beside them with no fault: the reference. At most one fault is armed
per step; a later one replaces it, so a run may see several faults, one at a time per engine.

A fault fires only in the engine it is armed on, at that engine's own k-th call, so which
requests end with "error" differs between engines: the machine adds under a reused id only
when no engine holds that id, and an abort reaches only the engines where the request is
still live. The contract (:mod:`~lockstep.property_tests.containment`): each fault ends exactly
the requests its failing phase touched, with an error naming it; those received a prefix of
their stream alone; every other request is exact against the reference (and the reference
against each request alone); at teardown the engines drain, nothing is held, and a fresh
request runs as it runs alone.

A failure saves the history as a replay file and names every fault armed (phase, call, the
step it was armed at, the engine step it struck); ``python -m
lockstep.property_tests.fault_machine FILE --mode async/lazy --fault STEP:PHASE:CALL ...``
replays it through the driver, whose step index is the machine's.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test

from .armed_engine import ArmedEngine, ArmedFault
from .comparator import compare_runs
from .containment import judge_run
from .differential import is_exact, run_solo
from .driver import EngineHang, RunRecord, drive
from .engine_under_test import SYNC, EngineUnderTest, LockstepEngine, Mode
from .faults import PHASES, FaultContractError
from .machine import EngineMachine
from .properties import PropertyFailure, replay_dir
from .workload import Workload

FAULTY_MODES = (Mode(True, "sim", "lazy"), Mode(True, "sim", "skewed"))
MAX_CALLS_AHEAD = 3
REPLAY_NAME = "fault_machine.json"


@dataclass
class FaultTally:
    """What the programs of one :func:`run_fault_machine` reached."""

    programs: int = 0
    armed: int = 0
    fired: int = 0
    bystanders: int = 0         # ... with a request's tokens in flight outside the failing step
    ended: int = 0              # requests that ended with "error"
    by_phase: dict[str, int] = field(default_factory=dict)   # faults fired, per phase


_tally = FaultTally()


class FaultMachine(EngineMachine):
    """Sync (fault-free) and async engines with injected faults under one random sequence of
    operations, judged by the containment contract."""

    modes = (SYNC, *FAULTY_MODES)

    def __init__(self) -> None:
        super().__init__()
        self.replay_path = replay_dir() / REPLAY_NAME
        self.armed_at = -1   # the step the last fault was armed at
        _tally.programs += 1

    def make_engine(self, mode: Mode) -> EngineUnderTest:
        if mode.async_scheduling:
            return ArmedEngine(self.spec, mode)
        return super().make_engine(mode)

    # one fault per step: a second would replace the first before it could fire
    @precondition(lambda self: self.armed_at != self.step_count)
    @rule(phase=st.sampled_from(list(PHASES)), call=st.integers(1, MAX_CALLS_AHEAD))
    def arm_fault(self, phase: str, call: int) -> None:
        """Arm a fault before the next step: the ``call``-th call of ``phase`` from then on."""
        fault, self.armed_at = ArmedFault(self.step_count, phase, call), self.step_count
        for engine in self._armed():
            engine.arm(fault)
        _tally.armed += len(self._armed())

    # the hard state of faults.retiring_workload, which random operations rarely meet with a
    # launch fault armed: the next launch fails while a request's last token is in flight and
    # that launch does not hold it (the state where dropping the steps in flight loses it)
    @precondition(lambda self: self.armed_at != self.step_count and self._retiring())
    @rule(phase=st.sampled_from(["launch", "prepare"]))
    def arm_a_launch_fault_as_a_request_retires(self, phase: str) -> None:
        self.arm_fault(phase, 1)

    def _compare_all(self) -> None:
        self.drain()
        workload, path = self.workload(), str(self.replay_path)
        exact = is_exact(self.spec, self.factory)
        reference = RunRecord(self.modes[0].name, self.results[self.modes[0].name])
        solo = run_solo(workload, self.factory, mode=self.modes[0])
        compare_runs(solo, reference, workload, exact, path)
        for name, engine in self.engines.items():
            if isinstance(engine, ArmedEngine):
                ended = judge_run(engine, RunRecord(name, self.results[name]), reference, solo,
                                  workload, exact, path)
                _count(engine, ended)
        self._record_states(workload)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, PropertyFailure):   # already saved and named
            super()._fail(exc)
        notes = [f"  faults on {e.mode.name}: " + "; ".join(s.describe() for s in e.shots)
                 for e in self._armed() if e.shots]
        replays = [f"  replay: python -m lockstep.property_tests.fault_machine "
                   f"{self.replay_path} --mode {_mode_arg(e.mode)} "
                   + " ".join(f"--fault {f}" for f in e.faults)
                   for e in self._armed() if e.faults]
        exc.__notes__ = [*getattr(exc, "__notes__", ()), *(notes or ["  faults: none armed"]),
                         *replays]
        super()._fail(exc)

    def _retiring(self) -> bool:
        return any(engine.retiring() for engine in self._armed())

    def _armed(self) -> list[ArmedEngine]:
        return [e for e in getattr(self, "engines", {}).values() if isinstance(e, ArmedEngine)]


def _count(engine: ArmedEngine, ended: int) -> None:
    fired = [shot for shot in engine.shots if shot.fired]
    _tally.fired += len(fired)
    _tally.ended += ended
    for shot in fired:
        _tally.by_phase[shot.phase] = _tally.by_phase.get(shot.phase, 0) + 1
        event(f"fault machine: a {shot.phase} fault fired")
        _tally.bystanders += bool(shot.bystanders)
        if shot.bystanders:
            event("fault machine: a request's tokens in flight outside the failing step")
    if ended:
        event("fault machine: a fault ended requests")


TestFaultMachine = FaultMachine.TestCase


def run_fault_machine(chosen: settings | None = None) -> str:
    """Run :class:`FaultMachine` under ``chosen`` (default: the current hypothesis settings);
    raise its failure, else return a one-line summary."""
    global _tally
    _tally = FaultTally()
    run_state_machine_as_test(FaultMachine, settings=chosen or settings())
    phases = ", ".join(f"{p} {n}" for p, n in sorted(_tally.by_phase.items()))
    return (f"{_tally.programs} programs, {_tally.fired} of {_tally.armed} armed faults fired "
            f"({phases or 'none'}; {_tally.bystanders} with a request's tokens in flight "
            f"outside the failing step), {_tally.ended} requests ended with an error, all "
            f"contained on {', '.join(m.name for m in FAULTY_MODES)}")


def _mode_arg(mode: Mode) -> str:
    return f"{'async' if mode.async_scheduling else 'sync'}/{mode.policy}"


def replay(workload: Workload, mode: Mode, faults: list[ArmedFault]) -> ArmedEngine:
    """Drive ``workload`` through ``mode`` with ``faults`` armed, and beside it the fault-free
    sync reference; judge by the contract (raises :class:`FaultContractError`, or the
    comparator's :class:`Divergence`)."""
    spec = workload.engine
    plain, engine = LockstepEngine(spec, SYNC), ArmedEngine(spec, mode, faults)
    reference = drive(workload, plain, SYNC.name, plain.eos_token_ids)
    try:
        record = drive(workload, engine, mode.name, engine.eos_token_ids)
    except EngineHang as exc:
        raise FaultContractError(f"{mode.name}: the engine did not drain: {exc}") from None
    solo = run_solo(workload, mode=SYNC)
    compare_runs(solo, reference, workload, is_exact(spec))
    judge_run(engine, record, reference, solo, workload, is_exact(spec))
    return engine


def main(argv: list[str] | None = None) -> int:
    """Replay a fault machine failure: exit 0 when contained, 1 when not, 2 bad input."""
    parser = argparse.ArgumentParser(prog="python -m lockstep.property_tests.fault_machine",
                                     description=main.__doc__)
    parser.add_argument("workload", help="the replay file the failure saved")
    parser.add_argument("--mode", default="async/lazy", help="async/lazy|skewed|eager")
    parser.add_argument("--fault", action="append", default=[], metavar="STEP:PHASE:CALL",
                        help="a fault armed before driver step STEP (repeat, in order)")
    args = parser.parse_args(argv)
    kind, _, policy = args.mode.partition("/")
    if kind not in ("sync", "async") or policy not in ("eager", "lazy", "skewed"):
        print(f"--mode={args.mode!r}: give sync|async/eager|lazy|skewed", file=sys.stderr)
        return 2
    try:
        faults = [ArmedFault.parse(text) for text in args.fault]
        workload = Workload.load(args.workload)
    except (OSError, ValueError) as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    try:
        engine = replay(workload, Mode(kind == "async", "sim", policy), faults)
    except AssertionError as exc:   # the contract, the comparator, an invariant, a hang
        print(f"not contained: {type(exc).__name__}: {exc}")
        return 1
    for shot in engine.shots:
        print(shot.describe())
    print("contained")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
