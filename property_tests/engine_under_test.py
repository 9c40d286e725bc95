"""The engine-under-test protocol, and Lockstep's engine as its first implementation.

The differential runner and the stateful machine drive engines only through
:class:`EngineUnderTest`, so a user can point them at their own engine: write a class with these
five methods (plus ``check_invariants``, which may do nothing) and a factory
``(EngineSpec, Mode) -> engine``; ``docs/property_tests.md`` shows a complete adapter.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from lockstep import __version__
from lockstep.engine import SamplingParams
from lockstep.engine.config import EngineConfig
from lockstep.engine.core import EngineCore

from .capabilities import Capabilities
from .invariants import EngineInvariants
from .workload import EngineSpec


@dataclass(frozen=True)
class Mode:
    """How an engine runs: sync or async scheduling, on which device and sim policy, and (for
    Lockstep's engine) how it collects a step: ``collect`` "eager" takes every step whose
    outputs already arrived before scheduling; ``output_wait`` "poll" polls with back-off."""

    async_scheduling: bool
    device: str = "sim"
    policy: str = "eager"
    collect: str = "lazy"
    output_wait: str = "block"

    @property
    def sim_policy(self) -> str | None:
        """What ``EngineConfig.sim_policy`` takes: the policy on ``sim``, None elsewhere."""
        return self.policy if self.device == "sim" else None

    @property
    def name(self) -> str:
        where = f"{self.device}/{self.policy}" if self.device == "sim" else self.device
        extra = (" eager-collect" if self.collect == "eager" else "") + \
            (" polling" if self.output_wait == "poll" else "")
        return f"{'async' if self.async_scheduling else 'sync'} {where}{extra}"


SYNC = Mode(async_scheduling=False)
ASYNC_MODES = (Mode(True, "sim", "eager"), Mode(True, "sim", "lazy"), Mode(True, "sim", "threaded"))


class Output(Protocol):
    """What ``step`` reports for a request that changed: cumulative ids and, at the end, why."""

    request_id: str
    token_ids: Sequence[int]
    finish_reason: str | None
    logprobs: Sequence[dict[int, float]] | None


class EngineUnderTest(Protocol):
    """The five calls the harness makes, plus an invariant hook run after every step."""

    def add(self, request_id: str, prompt: list[int], params: SamplingParams,
            arrival_index: int) -> None:
        """Queue a request. ``arrival_index`` is its position in arrival order; an engine that
        derives unseeded randomness from arrival order must use it (a solo run is index 0
        otherwise), others may ignore it."""

    def abort(self, request_id: str) -> bool:
        """End an unfinished request (finish reason "abort"); False when there is none."""

    def step(self) -> Sequence[Output]:
        """Advance the engine; outputs of the requests that changed."""

    def has_unfinished(self) -> bool:
        """True while any request (or any output of one) is still to come."""

    def stats(self) -> dict:
        """Counters for reports, e.g. ``num_steps`` and ``num_preemptions``."""

    def check_invariants(self) -> None:
        """Raise :class:`~lockstep.property_tests.invariants.InvariantViolation` when the engine's
        internal state is inconsistent; called after every step."""


EngineFactory = Callable[[EngineSpec, Mode], EngineUnderTest]


class Heartbeat:
    """The last engine step each thread's harness run began or ended: what a watchdog watches."""

    def __init__(self) -> None:
        self.beats: dict[int, tuple[str, int, bool, float]] = {}
        self.activity: dict[int, Callable[[], str]] = {}
        self.reset()

    def reset(self) -> None:
        self.beats = {threading.get_ident(): ("", 0, False, time.monotonic())}
        self.activity = {}

    def beat(self, run: str, step: int, in_step: bool,
             activity: Callable[[], str] | None = None) -> None:
        """``activity()``: where the engine is inside the step (e.g. ``EngineCore.activity``),
        asked only when a watchdog reports this run stuck."""
        me = threading.get_ident()
        self.beats[me] = (run, step, in_step, time.monotonic())
        if activity is not None:
            self.activity[me] = activity
        else:
            self.activity.pop(me, None)

    @property
    def time(self) -> float:
        return max(entry[3] for entry in list(self.beats.values()))

    def describe(self) -> str:
        """The runs inside a step (the ones that may be stuck), else the latest beat."""
        entries = sorted(list(self.beats.items()), key=lambda e: -e[1][3])
        inside = [e for e in entries if e[1][2]] or entries[:1]
        return "; ".join(f"{'inside' if e[2] else 'after'} step {e[1]} of run "
                         f"{e[0] or '(none yet)'}{self._activity(tid)}" for tid, e in inside)

    def _activity(self, thread_id: int) -> str:
        activity = self.activity.get(thread_id)
        if activity is None:
            return ""
        try:
            return f" ({activity()})"
        except Exception as exc:  # noqa: BLE001 - a report must never fail
            return f" (activity unknown: {type(exc).__name__})"


heartbeat = Heartbeat()


class LockstepEngine:
    """Lockstep's :class:`~lockstep.engine.core.EngineCore` behind the protocol, with its
    internal invariants (KV blocks, slots, placeholders, budgets, overlap) checked every step."""

    def __init__(self, spec: EngineSpec, mode: Mode) -> None:
        self.mode = mode
        self.core = EngineCore(EngineConfig(
            model=spec.model, device=mode.device, sim_policy=mode.sim_policy,
            async_scheduling=mode.async_scheduling, block_size=spec.block_size,
            num_kv_blocks=spec.num_kv_blocks, max_num_seqs=spec.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens,
            max_model_len=spec.max_model_len, seed=spec.seed, collect=mode.collect,
            output_wait=mode.output_wait, dtype="float32" if mode.device == "cuda" else None))
        self.invariants = EngineInvariants(self.core)
        self.steps = 0

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.core.eos_token_ids

    def add(self, request_id: str, prompt: list[int], params: SamplingParams,
            arrival_index: int) -> None:
        # the engine keys unseeded randomness on its count of added requests
        self.core._num_added = arrival_index
        self.core.add_request(request_id, list(prompt), params)

    def abort(self, request_id: str) -> bool:
        return self.core.abort_request(request_id)

    def step(self) -> Sequence[Output]:
        self.steps += 1
        heartbeat.beat(self.mode.name, self.steps, True, self.core.activity)
        outputs = self.core.step()
        heartbeat.beat(self.mode.name, self.steps, False)
        return outputs

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished_requests()

    def stats(self) -> dict:
        return {**self.core.stats(), **self.invariants.counters()}

    def check_invariants(self) -> None:
        self.invariants.check()

    def preempt_newest(self) -> bool:
        """Force a recompute preemption of the newest running request (the stateful machine's
        rule); False when nothing runs."""
        sched = self.core.scheduler
        if not sched.running:
            return False
        sched._preempt(sched.running[-1])
        return True


def lockstep_engine(spec: EngineSpec, mode: Mode) -> LockstepEngine:
    """The default :data:`EngineFactory`."""
    return LockstepEngine(spec, mode)


# Lockstep's engine declares everything: every sampling option per request, logprobs up to 20,
# aborts, id reuse, forced preemption, sync and async on the simulated device and on CUDA. Float
# models are judged by the near-tie rule; the oracle model compares exactly.
lockstep_engine.capabilities = Capabilities(
    engine="lockstep", adapter_version=__version__, exact=False,
    modes=frozenset({(False, "sim"), (True, "sim"), (False, "cpu"), (False, "cuda"),
                     (True, "cuda")}))
