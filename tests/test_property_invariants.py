"""Each per-step invariant fires on a planted bug and stays quiet on the clean engine."""
from __future__ import annotations

import pytest
import torch

from lockstep.engine import SamplingParams
from lockstep.engine.core import EngineCore
from lockstep.engine.input_batch import InputBatch
from lockstep.engine.scheduler import Scheduler
from lockstep.property_tests.differential import run_mode
from lockstep.property_tests.engine_under_test import Mode
from lockstep.property_tests.invariants import InvariantViolation
from lockstep.property_tests.workload import AbortSpec, EngineSpec, RequestSpec, Workload

torch.set_num_threads(1)

LAZY = Mode(True, "sim", "lazy")
WORKLOAD = Workload(
    EngineSpec(block_size=2, num_kv_blocks=12, max_num_batched_tokens=8, max_num_seqs=3),
    tuple(RequestSpec(f"r{i}", tuple(range(3, 8 + 2 * i)),
                      SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), arrival=i)
          for i in range(3)),
    (AbortSpec(3, "r1"),))


def collect_before_launching(monkeypatch):
    """A fence too wide: the host waits for the previous step's outputs before every launch."""
    original = EngineCore._launch

    def launch(self):
        if self._in_flight:
            self._in_flight[-1][2]._copied.synchronize()
        return original(self)
    monkeypatch.setattr(EngineCore, "_launch", launch)


def keep_blocks_on_abort(monkeypatch):
    original = Scheduler.finish

    def finish(self, req, reason):
        if reason != "abort":
            return original(self, req, reason)
        blocks = self.kv.block_tables.pop(req.request_id, [])
        original(self, req, reason)
        self.kv.block_tables[req.request_id] = blocks  # the aborted request keeps its blocks
    monkeypatch.setattr(Scheduler, "finish", finish)


def never_release_slots(monkeypatch):
    monkeypatch.setattr(InputBatch, "release", lambda self, request_ids: None)


def keep_placeholders(monkeypatch):
    original = Scheduler.update_from_output

    def update(self, out, sampled, logprobs):
        changed = original(self, out, sampled, logprobs)
        for row in out.rows:
            if row.samples and not row.request.is_finished:
                row.request.num_placeholders += 1  # the placeholder is never retired
                break
        return changed
    monkeypatch.setattr(Scheduler, "update_from_output", update)


@pytest.mark.parametrize("mode", [Mode(False), LAZY, Mode(True, "sim", "threaded")])
def test_the_clean_engine_keeps_every_invariant(mode):
    record = run_mode(WORKLOAD, mode)
    assert record.results[("r1", 0)].finish_reason == "abort"
    if mode == LAZY:
        assert record.stats["overlapped_launches"] > 0


@pytest.mark.parametrize("plant, says", [
    (collect_before_launching, "no overlap: step 1's device work had completed when step 2's "
                              "launch returned"),
    (keep_blocks_on_abort, "finished requests ['r1'] hold KV blocks"),
    (never_release_slots, "keep their slots"),
    (keep_placeholders, "placeholders with"),
])
def test_a_planted_bug_breaks_its_invariant(monkeypatch, plant, says):
    plant(monkeypatch)
    with pytest.raises(InvariantViolation, match=says.replace("[", r"\[").replace("]", r"\]")):
        run_mode(WORKLOAD, LAZY, guard=False)


def test_an_admission_in_a_step_that_preempted_breaks_its_invariant(monkeypatch):
    from lockstep.ci.targeted import tight_cache
    from lockstep.ci.zoo import INJECTIONS
    run_mode(tight_cache(), LAZY, guard=False)  # clean: no violation
    INJECTIONS["admit_in_a_preempting_step"].apply(monkeypatch)
    with pytest.raises(InvariantViolation, match="admitted in a step that preempted"):
        run_mode(tight_cache(), LAZY, guard=False)
