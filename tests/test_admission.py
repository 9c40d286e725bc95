"""Admission at request turnover: a retiring request (its last token in flight) holds its slot
but no place among ``max_num_seqs``, so async admits as sync does; the occupancy rule that
checks it; and the admission branch for a request preempted with a step in flight."""
from __future__ import annotations

import pytest
import torch

from lockstep.ci.targeted import TARGETED
from lockstep.ci.zoo import INJECTIONS
from lockstep.engine import LLM, SamplingParams
from lockstep.engine.config import EngineConfig
from lockstep.engine.scheduler import Scheduler
from lockstep.property_tests.differential import run_differential, run_mode, run_solo
from lockstep.property_tests.engine_under_test import LockstepEngine, Mode
from lockstep.property_tests.invariants import InvariantViolation
from lockstep.property_tests.occupancy import occupancy_errors
from lockstep.property_tests.workload import EngineSpec, RequestSpec, Workload

torch.set_num_threads(1)
LAZY = Mode(True, "sim", "lazy")


def _after_each_schedule(monkeypatch, what) -> list:
    """``what(scheduler, output)`` after every ``Scheduler.schedule`` call, in a list."""
    seen: list = []
    real = Scheduler.schedule

    def recorded(self):
        out = real(self)
        seen.append(what(self, out))
        return out
    monkeypatch.setattr(Scheduler, "schedule", recorded)
    return seen


def _rows_per_schedule(monkeypatch, async_scheduling: bool, max_tokens: list[int]) -> list[int]:
    """Rows of every schedule call (empty ones too) for 3-token prompts, max_num_seqs 4."""
    rows = _after_each_schedule(monkeypatch, lambda scheduler, out: len(out.rows))
    llm = LLM(model="oracle", device="sim", sim_policy="lazy", async_scheduling=async_scheduling,
              max_num_seqs=4, block_size=4)
    llm.generate([[3 + i, 5, 7] for i in range(len(max_tokens))],
                 [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
                  for m in max_tokens])
    return [r for r in rows if r] + [0] * (rows[-1:] == [0] and async_scheduling)


@pytest.mark.parametrize("max_tokens, sync_rows", [
    ([1] * 16, [4, 4, 4, 4]),
    ([1 + i % 2 for i in range(16)], [4, 4, 4, 4, 4, 3, 1]),
    ([40] + [1] * 15, [4, 4, 4, 4, 4] + [1] * 35),
])
def test_async_admits_at_turnover_as_sync_does(monkeypatch, max_tokens, sync_rows):
    assert [r for r in _rows_per_schedule(monkeypatch, False, max_tokens) if r] == sync_rows
    # no empty schedule between steps, the same rows in each (one empty call at the very end)
    assert _rows_per_schedule(monkeypatch, True, max_tokens) == sync_rows + [0]


def test_retiring_requests_hold_more_slots_than_max_num_seqs(monkeypatch):
    assert EngineConfig(model="oracle", max_num_seqs=4).num_slots == 4
    assert EngineConfig(model="oracle", max_num_seqs=4, async_scheduling=True).num_slots == 8
    held = _after_each_schedule(monkeypatch, lambda scheduler, out: len(scheduler.running))
    report = run_differential(TARGETED["turnover"](), (LAZY,))   # = sync = solo, penalties too
    assert max(held) > 4, held
    assert report.runs[LAZY.name].stats["rows_per_step"] == \
        report.runs["sync sim/eager"].stats["rows_per_step"]


def test_the_old_admission_check_breaks_the_occupancy_rule(monkeypatch):
    INJECTIONS["admission_counts_retiring_requests"].apply(monkeypatch)
    run_mode(TARGETED["turnover"](), Mode(False, "sim", "lazy"))   # sync: unchanged
    with pytest.raises(InvariantViolation, match="occupancy: async ran 17 device steps, sync 12"):
        run_differential(TARGETED["turnover"](), (LAZY,), solo=False)


def test_the_occupancy_rule():
    assert occupancy_errors([4, 4, 2], [4, 4, 2]) == []
    assert occupancy_errors([4, 4, 2], [4, 4, 2, 1]) == []        # one more call to collect
    assert "async ran 5 device steps, sync 3" in occupancy_errors([4, 4, 2], [4, 4, 1, 1, 1])[0]
    assert "async step 2 ran 2 rows where sync ran 4" in occupancy_errors([4, 4], [4, 2, 2])[0]


def test_a_request_preempted_with_a_step_in_flight_waits_for_its_token(monkeypatch):
    """The admission loop's "wait for its token" branch: unreachable through the engine's own
    preemption (a preempting schedule admits nobody, and the step in flight is collected
    before the next schedule), reached by a preemption made between steps while the
    request's step is in flight (the stateful machine's forced preemption)."""
    spec = EngineSpec(model="oracle", block_size=4)
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=6, frequency_penalty=0.5)
    engine = LockstepEngine(spec, LAZY)
    engine.add("a", [5, 6, 7], params, 0)
    outputs = engine.step() + engine.step()
    request = engine.core.scheduler.requests["a"]
    assert engine.core._in_flight and request.num_placeholders == 1   # its token in flight
    assert engine.preempt_newest()
    assert engine.core.scheduler.waiting[0] is request and request.num_placeholders == 1
    seen = []   # (waiting with a token in flight, admitted) at each schedule
    scheduler = engine.core.scheduler
    real = scheduler.schedule   # the invariants' checked schedule

    def recorded():
        pending = bool(scheduler.waiting) and scheduler.waiting[0].num_placeholders > 0
        out = real()
        seen.append((pending, any(row.request is request for row in out.rows)))
        return out
    monkeypatch.setattr(scheduler, "schedule", recorded)
    while engine.has_unfinished():
        outputs += engine.step()
        engine.check_invariants()
    assert seen[0] == (True, False)   # the branch: not admitted while its token is in flight
    assert seen[1][1]                 # admitted at the next schedule, once it was collected
    alone = run_solo(Workload(spec, (RequestSpec("a", (5, 6, 7), params),)))
    final = [o for o in outputs if o.finished]
    assert list(final[0].token_ids) == list(alone.results[("a", 0)].token_ids)
