"""Lockstep's engine with injected faults armed at chosen driver steps, for stateful runs.

:func:`~lockstep.property_tests.faults.check_fault` injects one fault for a whole run. Under
a stateful sequence of client operations a fault is armed mid-run instead: an
:class:`ArmedFault` ``STEP:PHASE:CALL`` is armed before the engine's ``step()`` call number
``STEP`` (counted from 0, the driver's step index) and fires at the ``CALL``-th call of
``PHASE`` from then on. A later fault replaces the one armed before it, fired or not; every
fault ever armed is kept as an :class:`ArmedShot`, because device work launched while it was
armed may still fire it later.

The injection context is entered around each ``step()`` of this engine only (the phases run
nowhere else), so the class-level patches (``fill``, ``wait``) never count another engine's
calls. That holds on the policies whose device work runs in the host thread inside the
owner's calls (sim ``eager``, ``lazy``, ``skewed``); a ``threaded`` worker may run device work
while no context is open, so :class:`ArmedEngine` refuses it.

The same :class:`ArmedEngine` runs inside the stateful machine and, driven by
:func:`~lockstep.property_tests.driver.drive`, in its replay: the driver's step index is the
machine's, so a fault armed at one step fires at the same call in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .containment import check_reach
from .engine_under_test import LockstepEngine, Mode, Output
from .faults import PHASES, Shot, injected
from .workload import EngineSpec


@dataclass(frozen=True)
class ArmedFault:
    """Arm a fault before ``step()`` call ``step``: the ``call``-th call of ``phase`` after
    that fails."""

    step: int
    phase: str
    call: int

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r}: choose one of {', '.join(PHASES)}")
        if self.step < 0 or self.call < 1:
            raise ValueError(f"step={self.step}, call={self.call}: give step >= 0, call >= 1")

    def __str__(self) -> str:
        return f"{self.step}:{self.phase}:{self.call}"

    @classmethod
    def parse(cls, text: str) -> "ArmedFault":
        """``STEP:PHASE:CALL``, e.g. ``3:launch:2``; ValueError naming what is wrong."""
        parts = text.split(":")
        if len(parts) != 3 or not (parts[0].isdigit() and parts[2].isdigit()):
            raise ValueError(f"fault {text!r}: give STEP:PHASE:CALL, e.g. 3:launch:2")
        return cls(int(parts[0]), parts[1], int(parts[2]))


@dataclass
class ArmedShot(Shot):
    """A :class:`Shot` armed mid-run; its text (in the error it causes) names when."""

    fault: ArmedFault | None = None
    fired_during: int | None = None   # the step() call (driver step) in which it fired

    def __str__(self) -> str:
        armed = "" if self.fault is None else f" (armed at step {self.fault.step})"
        return f"{self.phase} fault at call {self.at_call}{armed}"

    def describe(self) -> str:
        """What it did, for a failure message."""
        if not self.fired:
            return f"{self}: not fired"
        fired = f"{self}: fired in driver step {self.fired_during}"
        if self.step is None:   # device work: its step is known once that step is collected
            return f"{fired}, its step not collected yet"
        return (f"{fired}, engine step {self.step}, touching "
                f"{sorted(self.touched) or 'no unfinished request'}")


class ArmedEngine:
    """:class:`LockstepEngine` (an :class:`EngineUnderTest`) whose ``step()`` runs under the
    fault armed last, and checks the reach of each fault's errors as they come out
    (:func:`~lockstep.property_tests.containment.check_reach`); ``shots`` holds every fault
    armed so far."""

    def __init__(self, spec: EngineSpec, mode: Mode, faults: Sequence[ArmedFault] = ()) -> None:
        if mode.device != "sim" or mode.policy == "threaded":
            raise ValueError(f"mode={mode.name!r}: faults are armed on sim eager, lazy or "
                             f"skewed (a threaded device runs work outside the engine's calls)")
        self.inner = LockstepEngine(spec, mode)
        self.mode, self.core = mode, self.inner.core
        self.due = sorted(faults, key=lambda f: f.step)
        self.shots: list[ArmedShot] = []
        self.armed = True
        self.steps = 0
        # each step's rows unfinished when its collect began: the reach of a failed collect,
        # by identity (faults._note_reach goes by id, and an aborted request's id may be
        # reused while its step is in flight)
        self.collected: dict[int, set[str]] = {}
        core, collect = self.core, self.core._collect

        def collecting():
            step, sched, _ = core._in_flight[0]
            unfinished = {row.request.request_id for row in sched.rows
                          if not row.request.is_finished}
            self.collected[step] = unfinished
            shot = self.current
            before = shot is not None and shot.fired
            try:
                return collect()
            finally:
                if shot is not None and shot.fired and not before and shot.phase in (
                        "wait", "update"):
                    shot.step, shot.touched = step, unfinished
        core._collect = collecting

    @property
    def current(self) -> ArmedShot | None:
        """The shot armed last, while the engine is armed."""
        return self.shots[-1] if self.shots and self.armed else None

    @property
    def faults(self) -> list[ArmedFault]:
        """Every fault armed or due, in order: what a replay arms."""
        return [shot.fault for shot in self.shots if shot.fault] + list(self.due)

    def retiring(self) -> bool:
        """A request's last token is in flight (it will not be scheduled again) beside a
        request still to run: a fault in the next step must not lose the retiring one (the
        state ``faults.retiring_workload`` builds)."""
        sched = self.core.scheduler
        last = [r for r in sched.running if r.num_placeholders
                and r.num_output_tokens_with_placeholders >= r.sampling_params.max_tokens]
        return bool(last) and len(sched.running) + len(sched.waiting) > len(last)

    def arm(self, fault: ArmedFault) -> None:
        """Arm ``fault`` at its step (at the earliest before the next ``step()`` call)."""
        self.due.append(fault)

    def disarm(self) -> None:
        """No further fault (device work launched under a shot may still fire it)."""
        self.due.clear()
        self.armed = False

    def step(self) -> Sequence[Output]:
        while self.armed and self.due and self.due[0].step <= self.steps:
            fault = self.due.pop(0)
            self.shots.append(ArmedShot(fault.phase, fault.call, fault=fault))
        shot = self.current
        self.steps += 1
        if shot is None or shot.fired:
            outputs = self.inner.step()
        else:
            with injected(self.core, shot):
                outputs = self.inner.step()
        # device work launched under an earlier shot may fire it now
        fired_now = [s for s in self.shots if s.fired and s.fired_during is None]
        for fired in fired_now:
            fired.fired_during = self.steps - 1
        check_reach([out for out in outputs if out.finish_reason == "error"], self.shots,
                    self.collected, fired_now, self.mode.name)
        return outputs

    # the rest of the protocol, unchanged
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.inner.eos_token_ids

    def add(self, request_id: str, prompt: list[int], params, arrival_index: int) -> None:
        self.inner.add(request_id, prompt, params, arrival_index)

    def abort(self, request_id: str) -> bool:
        return self.inner.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.inner.has_unfinished()

    def stats(self) -> dict:
        return self.inner.stats()

    def check_invariants(self) -> None:
        self.inner.check_invariants()

    def preempt_newest(self) -> bool:
        return self.inner.preempt_newest()
