"""The gate's faults check: the sweep and the contract catch fault-path bugs, and pass the clean
engine."""
from __future__ import annotations

import logging

import pytest
import torch

from lockstep.ci.zoo import INJECTIONS, Patcher
from lockstep.engine.core import EngineCore
from lockstep.property_tests import faults
from lockstep.property_tests.engine_under_test import Mode

torch.set_num_threads(1)
LAZY, SYNC = Mode(True, "sim", "lazy"), Mode(False, "sim", "eager")


@pytest.fixture(autouse=True)
def quiet_engine_log():
    logger = logging.getLogger("lockstep.engine")
    level = logger.level
    logger.setLevel(logging.CRITICAL)   # every contained fault logs a warning
    yield
    logger.setLevel(level)


@pytest.fixture
def patch():
    patcher = Patcher()
    yield patcher
    patcher.undo()


def test_the_clean_engine_contains_every_swept_fault_and_the_sweep_reaches_bystanders():
    both = faults.fault_sweep(modes=(SYNC, LAZY))
    sync_only = faults.fault_sweep(modes=(SYNC,))
    assert set(both.by_phase) == set(faults.PHASES)
    assert both.faults > sync_only.faults > 0
    # async: launches with a request's last token in flight outside the failing step
    assert both.bystander_faults >= 10
    assert sync_only.bystander_faults == 0   # sync has nothing in flight at a launch


@pytest.mark.parametrize("name", ["launch_failure_drops_steps_in_flight",
                                  "collect_pops_in_flight_entry_after_update"])
def test_each_fault_path_bug_of_the_zoo_breaks_the_contract(patch, name):
    INJECTIONS[name].apply(patch)
    with pytest.raises(faults.FaultContractError) as caught:
        faults.fault_sweep(modes=(LAZY,))
    message = str(caught.value)
    assert "async sim/lazy" in message
    assert "did not drain" in message or "steps in flight" in message, message


def test_an_error_given_to_a_request_the_fault_did_not_touch_is_named(patch):
    real = EngineCore._contain

    def contain_everything(self, exc, phase, step, requests):   # planted: too wide
        real(self, exc, phase, step, list(self.scheduler.running) + list(requests))
    patch.setattr(EngineCore, "_contain", contain_everything)
    with pytest.raises(faults.FaultContractError, match="the fault touched only"):
        faults.fault_sweep(modes=(LAZY,), phases=("launch",))


def test_a_fault_that_becomes_a_token_is_named(patch):
    from lockstep.engine.scheduler import Scheduler
    real = Scheduler.finish

    def finish_as_length(self, req, reason):   # planted: an error reported as a normal end
        real(self, req, "length" if reason == "error" else reason)
    patch.setattr(Scheduler, "finish", finish_as_length)
    with pytest.raises(faults.FaultContractError):
        faults.fault_sweep(modes=(LAZY,), phases=("update",))


def test_the_replay_command_judges_one_fault(tmp_path, patch, capsys):
    path = tmp_path / "retiring.json"
    faults.retiring_workload().save(path)
    args = [str(path), "--mode", "async/lazy", "--phase", "launch", "--call", "2"]
    assert faults.main(args) == 0
    assert "contained" in capsys.readouterr().out
    INJECTIONS["launch_failure_drops_steps_in_flight"].apply(patch)
    assert faults.main(args) == 1
    assert "not contained" in capsys.readouterr().out
    assert faults.main([str(path), "--mode", "async/warp", "--phase", "launch",
                        "--call", "2"]) == 2
    assert "--mode='async/warp'" in capsys.readouterr().err
    assert faults.main([str(tmp_path / "missing.json"), "--phase", "wait", "--call", "1"]) == 2


def test_the_gate_caps_shrinking_and_puts_hypothesis_back():
    from hypothesis.internal.conjecture import engine

    from lockstep.ci.gate import SHRINK_CAP_S, capped_shrinking
    before = engine.MAX_SHRINKING_SECONDS
    with capped_shrinking(SHRINK_CAP_S):
        assert engine.MAX_SHRINKING_SECONDS == SHRINK_CAP_S < before
    assert engine.MAX_SHRINKING_SECONDS == before
