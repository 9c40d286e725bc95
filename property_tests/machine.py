"""The stateful machine: sync and async engines driven in lockstep by one sequence of rules.

Rules add a request, abort a live or a just-finished id, reuse an id whose request finished or
was aborted, step, force a preemption and drain; every rule is applied to every engine (the shape
of hypothesis' own ``test_database_agreement``). Between two steps, adds, aborts and re-adds come
in any order, as a client makes them: "abort x, add x again" and "add x, abort x" inside one step,
an add of an id whose previous request finished with a step in flight, an abort of a request whose
step is in flight. A forced preemption ends a step's calls (the harness's action, not a client's).
After each step the engines' invariants and output rules are checked; at teardown every request
is compared with the sync engine's and with its solo run.

The rules' history is also a :class:`Workload` (each call with its ``order`` within its step), so
a failure is saved as a replay file that ``lockstep replay`` re-runs exactly.
"""
from __future__ import annotations

import sync_guard
from hypothesis import event
from hypothesis.errors import HypothesisException
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from .capabilities import Capabilities, narrow_params
from .comparator import compare_runs
from .differential import is_exact, run_solo
from .driver import RunRecord
from .engine_under_test import SYNC, EngineFactory, EngineUnderTest, Mode, lockstep_engine
from .invariants import InvariantViolation, OutputRules
from .live import LiveRequests, RequestResult
from .properties import PropertyFailure, failure, replay_dir
from .strategies import prompts, sampling_params
from .workload import AbortSpec, EngineSpec, RequestSpec, Workload

DRAIN_BOUND = 400


class EngineMachine(RuleBasedStateMachine):
    """Sync and async (sim lazy) Lockstep engines under one random sequence of operations.

    :func:`machine_for` makes the same machine for another engine: its reference mode first,
    only the rules and sampling options its adapter declares."""

    modes: tuple[Mode, ...] = (SYNC, Mode(True, "sim", "lazy"))
    factory = staticmethod(lockstep_engine)

    def __init__(self) -> None:
        super().__init__()
        self.step_count = 0
        self.requests: list[RequestSpec] = []
        self.aborts: list[AbortSpec] = []
        self.preempts: list[int] = []
        self.calls = 0           # client calls made in this step: the next one's ``order``
        self.preempted = False   # a forced preemption ended this step's calls
        self.spec = EngineSpec()
        self.failed = False
        engine = self.caps.engine
        self.replay_path = replay_dir() / ("engine_machine.json" if engine == "lockstep"
                                           else f"engine_machine-{engine}.json")

    @initialize(block_size=st.sampled_from([2, 4]), extra_blocks=st.integers(0, 8),
                budget=st.sampled_from([5, 16, 64]), max_num_seqs=st.integers(1, 6))
    def build(self, block_size: int, extra_blocks: int, budget: int, max_num_seqs: int) -> None:
        # room for the largest request the rules make (40 prompt + 12 new ids) and a little more
        need = -(-52 // block_size)
        self.spec = EngineSpec(block_size=block_size, num_kv_blocks=need + extra_blocks,
                               max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
        self.engines = {m.name: self.make_engine(m) for m in self.modes}
        self.live = {name: LiveRequests(name) for name in self.engines}
        self.results: dict[str, dict[tuple[str, int], RequestResult]] = {
            name: {} for name in self.engines}
        self.free_everywhere: set[str] = set()   # ids no engine holds a live request for
        self._races = sync_guard.race_check()
        self._races.__enter__()

    # -- rules --------------------------------------------------------------------------------

    @precondition(lambda self: not self.preempted)
    @rule(data=st.data())
    def add(self, data) -> None:
        self._add(f"r{len(self.requests)}", data)

    @precondition(lambda self: not self.preempted and self.free_everywhere
                  and self.caps.reuse_ids)
    @rule(data=st.data())
    def reuse_id(self, data) -> None:
        """A new request under an id whose request finished or was aborted (maybe in this
        very step, with a step in flight)."""
        self._add(data.draw(st.sampled_from(sorted(self.free_everywhere))), data)

    @precondition(lambda self: not self.preempted and self.requests and self.caps.abort)
    @rule(data=st.data())
    def abort(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted({r.request_id for r in self.requests})))
        occurrence = sum(r.request_id == rid for r in self.requests) - 1
        self.aborts.append(AbortSpec(self.step_count, rid, occurrence, self._next_order()))
        for name, engine in self.engines.items():
            live = self.live[name]
            if live.key(rid) == (rid, occurrence) and engine.abort(rid):
                live.aborted(rid)
        self._update_free()

    @precondition(lambda self: not self.preempted and self.caps.force_preempt)
    @rule()
    def force_preemption(self) -> None:
        self.preempts.append(self.step_count)
        for engine in self.engines.values():
            engine.preempt_newest()
        self.preempted = True

    @rule()
    def step(self) -> None:
        for name, engine in self.engines.items():
            try:
                with sync_guard.disallow():
                    outputs = engine.step()
                for out in outputs:
                    self.live[name].observe(self.results[name], out)
                engine.check_invariants()
            except HypothesisException:
                raise
            except Exception as exc:
                exc.__notes__ = [*getattr(exc, "__notes__", ()), f"  run: {name}"]
                self._fail(exc)
        self.step_count += 1
        self.calls, self.preempted = 0, False
        self._update_free()

    @rule()
    def drain(self) -> None:
        for _ in range(DRAIN_BOUND):
            if not any(e.has_unfinished() for e in self.engines.values()):
                return
            self.step()
        stuck = [f"{n}: unfinished {self.live[n].unfinished()}, stats {e.stats()}"
                 for n, e in self.engines.items() if e.has_unfinished()]
        self._fail(InvariantViolation(f"not idle after {DRAIN_BOUND} steps: {'; '.join(stuck)}"))

    @invariant()
    def idle_engines_hold_no_blocks(self) -> None:
        for name, engine in getattr(self, "engines", {}).items():
            stats = engine.stats()
            if not engine.has_unfinished() and stats.get("num_free_blocks") != stats.get(
                    "num_total_blocks"):
                self._fail(InvariantViolation(f"{name}: idle but KV blocks are held: {stats}"))

    def teardown(self) -> None:
        if not hasattr(self, "engines"):
            return
        try:
            if not self.failed:  # after a failed rule, the engines' state proves nothing more
                self._compare_all()
        except HypothesisException:
            raise
        except Exception as exc:
            self._fail(exc)
        finally:
            self._races.__exit__(None, None, None)

    def _compare_all(self) -> None:
        self.drain()
        workload, path = self.workload(), str(self.replay_path)
        exact = is_exact(self.spec, self.factory)
        records = {name: RunRecord(name, self.results[name]) for name in self.engines}
        reference = records[self.modes[0].name]
        for name, record in records.items():
            if name != self.modes[0].name:
                compare_runs(reference, record, workload, exact, path)
        compare_runs(run_solo(workload, self.factory, mode=self.modes[0]), reference, workload,
                     exact, path)
        self._record_states(workload)

    def _record_states(self, workload: Workload) -> None:
        """Tell hypothesis which hard states this program reached."""
        for state, reached in (("machine: preempted", self.preempts or any(
                e.stats().get("num_preemptions") for e in self.engines.values())),
                ("machine: reused an id", len({r.request_id for r in self.requests})
                 < len(self.requests)), ("machine: aborted", bool(self.aborts)),
                ("machine: re-added an id in the step that aborted it",
                 workload.readds_in_abort_step() > 0)):
            if reached:
                event(state)

    def _fail(self, exc: BaseException) -> None:
        """Save the history as a replay file and raise the failure with its path (a failure
        raised so already goes on as it is)."""
        if isinstance(exc, PropertyFailure):
            raise exc
        self.failed = True
        raise failure(exc, self.workload(), self.replay_path, self.factory) from exc

    # -- helpers ------------------------------------------------------------------------------

    def make_engine(self, mode: Mode) -> EngineUnderTest:
        """The engine for ``mode`` (the factory's; a subclass may wrap it)."""
        return self.factory(self.spec, mode)

    @property
    def caps(self) -> Capabilities:
        return self.factory.capabilities

    def workload(self) -> Workload:
        return Workload(self.spec, tuple(self.requests), tuple(self.aborts), tuple(self.preempts))

    def _next_order(self) -> int:
        self.calls += 1
        return self.calls - 1

    def _add(self, rid: str, data) -> None:
        request = RequestSpec(rid, data.draw(prompts(self.spec.block_size)),
                              narrow_params(data.draw(sampling_params()), self.caps),
                              self.step_count, self._next_order())
        index = len(self.requests)
        occurrence = sum(r.request_id == rid for r in self.requests)
        self.requests.append(request)
        self.free_everywhere.discard(rid)
        for name, engine in self.engines.items():
            engine.add(rid, list(request.prompt), request.params, index)
            self.live[name].add(rid, (rid, occurrence), OutputRules(
                request.params, engine.eos_token_ids, f"{name}: request {rid!r}#{occurrence}"))

    def _update_free(self) -> None:
        ids = {r.request_id for r in self.requests}
        self.free_everywhere = {rid for rid in ids
                                if not any(live.busy(rid) for live in self.live.values())}


TestEngineMachine = EngineMachine.TestCase


def machine_for(factory: EngineFactory, modes: tuple[Mode, ...]) -> type[EngineMachine]:
    """The stateful machine for ``factory``'s engine: ``modes[0]`` is the reference (sync), the
    others run beside it; its replay file and database key are the engine's own."""
    engine = factory.capabilities.engine
    name = f"{engine.title()}EngineMachine"
    return type(name, (EngineMachine,), {
        "modes": tuple(modes), "factory": staticmethod(factory),
        "__doc__": f"The stateful machine on {engine}: {', '.join(m.name for m in modes)}."})
