"""A step whose device work never completes ("parked"), with its request aborted meanwhile: the
watchdog reports the hang and names the engine step the host is stuck on and its phase."""
from __future__ import annotations

import threading

import pytest
import torch

from lockstep.ci.watchdog import CheckHang, watchdog
from lockstep.engine import SamplingParams
from lockstep.engine.model_runner import ModelRunner
from lockstep.property_tests.engine_under_test import LockstepEngine, Mode
from lockstep.property_tests.workload import EngineSpec

torch.set_num_threads(1)
PARKED_STEP = 3


@pytest.fixture
def parked_device_step(monkeypatch):
    """The device work of engine step ``PARKED_STEP`` blocks until the test releases it."""
    release, calls = threading.Event(), []
    real = ModelRunner._device_step

    def device_step(self, inputs, result):
        calls.append(None)
        if len(calls) == PARKED_STEP:
            release.wait()
        return real(self, inputs, result)
    monkeypatch.setattr(ModelRunner, "_device_step", device_step)
    yield
    release.set()   # let the device thread finish (it is a daemon thread; never left blocked)


@pytest.mark.parametrize("policy", ["threaded", "lazy"])
def test_an_abort_while_a_step_is_parked_is_reported_naming_the_step(parked_device_step,
                                                                      policy):
    engine = LockstepEngine(EngineSpec(model="oracle"), Mode(True, "sim", policy))
    engine.add("parked", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=20), 0)
    with pytest.raises(CheckHang) as hang, watchdog("parked", stall_s=1.0):
        while engine.core.num_steps < PARKED_STEP:
            engine.step()
        assert engine.abort("parked")   # the request of the parked step goes; the step stays
        for _ in range(4):              # a bounded loop: the watchdog, not the bound, must end it
            engine.step()
    message = str(hang.value)
    assert "check 'parked' hung: no engine step began or ended for 1 s" in message
    assert f"engine step {PARKED_STEP}, collect (waiting for its outputs)" in message, message
    assert "steps in flight []" in message, message


def test_a_step_that_finishes_is_not_reported():
    engine = LockstepEngine(EngineSpec(model="oracle"), Mode(True, "sim", "lazy"))
    engine.add("quick", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6), 0)
    with watchdog("quick", stall_s=1.0):
        while engine.has_unfinished():
            engine.step()
    assert engine.core.activity() == "between steps; steps in flight []"
