"""A client's calls in any order within one step: the workload format, the driver's order, the
protocol's rule for an aborted id added again, and the search reaching it."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, find, settings

from lockstep.ci import targeted
from lockstep.engine import SamplingParams
from lockstep.property_tests import (AbortSpec, EngineSpec, InvariantViolation, Mode, RequestSpec,
                                     Workload)
from lockstep.property_tests.differential import run_differential
from lockstep.property_tests.driver import drive
from lockstep.property_tests.engine_under_test import ASYNC_MODES, SYNC, lockstep_engine
from lockstep.property_tests.strategies import workloads
from lockstep.property_tests.workload import ClientCalls

P = SamplingParams(temperature=0.0, max_tokens=6)
LAZY = Mode(True, "sim", "lazy")


def calls(workload: Workload, steps: int, busy=lambda rid: False) -> list:
    client = ClientCalls(workload)
    return [(step, call) for step in range(steps) for call in client.calls(step, busy)]


def test_orders_round_trip_and_a_version_1_file_loads_with_every_call_at_order_0():
    w = Workload(EngineSpec(), (RequestSpec("x", (1, 2), P, 1, 3),), (AbortSpec(1, "x", 0, 2),))
    assert Workload.from_json(w.to_json()) == w
    old = json.loads(w.to_json())
    old["version"] = 1
    del old["requests"][0]["order"], old["aborts"][0]["order"]
    loaded = Workload.from_dict(old)
    assert (loaded.requests[0].order, loaded.aborts[0].order) == (0, 0)


@pytest.mark.parametrize("field, workload", [
    ("requests[0].order", Workload(requests=(RequestSpec("x", (1,), P, 0, -1),))),
    ("aborts[0].order", Workload(requests=(RequestSpec("x", (1,), P),),
                                 aborts=(AbortSpec(0, "x", 0, -2),))),
])
def test_a_negative_order_is_refused_naming_the_field(field, workload):
    with pytest.raises(ValueError, match=rf"{field.replace('[', '.').replace(']', '.')}=-"):
        workload.validate()


def test_a_steps_calls_come_in_their_order_and_an_abort_frees_its_id_for_the_next_add():
    w = Workload(EngineSpec(), (RequestSpec("x", (1,), P), RequestSpec("x", (2,), P, 0, 2),
                                RequestSpec("y", (3,), P, 0, 2)),
                 (AbortSpec(0, "x", 0, 1), AbortSpec(0, "y", 0, 0)))
    live: set[str] = set()
    seen = []
    client = ClientCalls(w)
    for call in client.calls(0, live.__contains__):
        seen.append(call)
        if call[0] == "add":
            live.add(w.requests[call[1]].request_id)
        elif call[1] in live:
            live.discard(call[1])
    # y's abort (order 0) comes before y is added (order 2): it finds nothing to end
    assert seen == [("add", 0), ("abort", "y", 0), ("abort", "x", 0), ("add", 1), ("add", 2)]


def test_a_reused_id_waits_while_its_request_is_live_and_later_requests_wait_behind_it():
    w = Workload(EngineSpec(), (RequestSpec("x", (1,), P), RequestSpec("x", (2,), P),
                                RequestSpec("z", (3,), P)))
    assert calls(w, 1, busy=lambda rid: rid == "x") == []
    assert calls(w, 1) == [(0, ("add", 0)), (0, ("add", 1)), (0, ("add", 2))]


class Reordered:
    """Lockstep's engine with a planted bug in what it reports: after an abort, it holds the
    aborted request's "abort" output back behind the step's other outputs, or adds a token."""

    def __init__(self, late_token: bool) -> None:
        self.engine = lockstep_engine(EngineSpec(block_size=4), SYNC)
        self.late_token, self.aborted = late_token, set()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def abort(self, request_id):
        ok = self.engine.abort(request_id)
        if ok:
            self.aborted.add(request_id)
        return ok

    def step(self):
        outputs = list(self.engine.step())
        finals = [o for o in outputs if o.request_id in self.aborted and o.finish_reason == "abort"]
        self.aborted -= {o.request_id for o in finals}
        if self.late_token:   # a token reported after the abort, then the abort output
            return [Out(o.request_id, [*o.token_ids, 1], None) if o in finals else o
                    for o in outputs] + finals
        return [o for o in outputs if o not in finals] + finals


class Out:
    def __init__(self, request_id, token_ids, finish_reason):
        self.request_id, self.token_ids, self.finish_reason = request_id, token_ids, finish_reason
        self.logprobs = None


ABORT_AND_READD = Workload(EngineSpec(block_size=4), (
    RequestSpec("x", (5, 6, 7), P), RequestSpec("x", (8, 9), P, 2, 1)),
    (AbortSpec(2, "x", 0, 0),))


def test_the_new_requests_output_before_the_aborted_ones_final_output_is_a_violation():
    engine = Reordered(late_token=False)
    with pytest.raises(InvariantViolation, match=r"'x'#0 after its abort was accepted"):
        drive(ABORT_AND_READD, engine, "reordered", guard=False)


def test_a_token_of_an_aborted_request_before_its_abort_output_is_a_violation():
    engine = Reordered(late_token=True)
    with pytest.raises(InvariantViolation, match=r"after its abort was accepted: \[.*\] None"):
        drive(ABORT_AND_READD, engine, "late token", guard=False)


def test_lockstep_runs_abort_then_readd_in_one_step_exactly_in_every_mode():
    w = targeted.client_orders()
    report = run_differential(w, ASYNC_MODES)
    for name in ("sync sim/eager", *(m.name for m in ASYNC_MODES)):
        run = report.runs[name]
        assert {("c0", 0), ("w0", 0)} <= run.aborted and ("e0", 0) not in run.aborted, name
        assert w.readds_in_abort_step(run.aborted) == 2, name
        assert run.results[("e0", 0)].finish_reason == "length"
    solo = report.runs["solo"].results
    for key in (("c0", 1), ("w0", 1), ("c1", 0)):
        assert report.runs["async sim/lazy"].results[key].token_ids == solo[key].token_ids, key


def test_the_strategy_generates_an_abort_then_readd_within_one_step():
    found = find(workloads(), lambda w: w.readds_in_abort_step() > 0,
                 settings=settings(database=None, max_examples=2000,
                                   suppress_health_check=list(HealthCheck)))
    assert any(r.request_id == a.request_id and r.arrival == a.step and r.order > a.order
               for a in found.aborts for r in found.requests)


def test_narrowing_to_an_engine_without_id_reuse_keeps_each_abort_on_its_request():
    from lockstep.property_tests.capabilities import Capabilities, narrow_workload
    caps = Capabilities(engine="fresh-ids", adapter_version="1", reuse_ids=False,
                        force_preempt=False, modes=frozenset({(False, "cpu")}))
    w = Workload(EngineSpec(), (RequestSpec("x", (1,), P), RequestSpec("x", (2,), P, 1, 1)),
                 (AbortSpec(1, "x", 0, 0), AbortSpec(2, "x", 1, 0)))
    narrowed = narrow_workload(w, caps)
    narrowed.validate()
    assert [r.request_id for r in narrowed.requests] == ["x", "x~1"]
    assert [(a.request_id, a.occurrence) for a in narrowed.aborts] == [("x", 0), ("x~1", 0)]
