"""Per-step timeline attribution: the rules fire on spans booked to the wrong step and stay
quiet on the engine's own timelines, in every mode."""
from __future__ import annotations

import pytest
import torch

from lockstep.ci.targeted import TARGETED
from lockstep.ci.zoo import INJECTIONS
from lockstep.engine.timeline import HostSpan
from lockstep.property_tests.attribution import attribution_errors
from lockstep.property_tests.differential import run_mode
from lockstep.property_tests.engine_under_test import SYNC, Mode
from lockstep.property_tests.invariants import InvariantViolation

torch.set_num_threads(1)


def _overlapped() -> tuple[list[HostSpan], list[tuple[int, int, int]]]:
    """Two async steps: step 2 launched before step 1 is collected (times in µs)."""
    host = [HostSpan("launch", 1, 0, 10), HostSpan("launch", 2, 20, 30),
            HostSpan("collect", 1, 31, 60), HostSpan("collect", 2, 61, 90)]
    device = [(1, 11, 50), (2, 51, 80)]
    return host, device


def test_overlapped_steps_booked_to_their_own_step_pass():
    assert attribution_errors(*_overlapped()) == []


def test_a_collect_booked_to_the_step_launched_last_is_found():
    host, device = _overlapped()
    host[2] = HostSpan("collect", 2, 31, 60)   # collecting step 1, booked to step 2
    problems = attribution_errors(host, device)
    assert "step 1 has 0 collect spans, not 1" in problems
    assert "step 2 has 2 collect spans, not 1" in problems


@pytest.mark.parametrize("edit, expected", [
    (lambda h, d: h.__setitem__(0, HostSpan("launch", 1, 12, 15)),
     "step 1's device span began 0.0 µs before the host launched step 1"),
    (lambda h, d: h.__setitem__(3, HostSpan("collect", 2, 61, 70)),
     "the collect span of step 2 ended 0.0 µs before step 2's device span did"),
    (lambda h, d: d.__setitem__(1, (2, 40, 80)), "step 2's device span began 0.0 µs before step "
                                                 "1's ended"),
    (lambda h, d: h.append(HostSpan("collect", 3, 91, 95)),
     "a collect span for step 3, which was never launched"),
])
def test_each_rule_fires(edit, expected):
    host, device = _overlapped()
    edit(host, device)
    assert any(expected in p for p in attribution_errors(host, device)), \
        attribution_errors(host, device)


def test_a_failed_collect_may_end_before_the_device_work():
    host, device = _overlapped()
    host[3] = HostSpan("collect", 2, 61, 70, failed=True)   # it raised before any wait
    assert attribution_errors(host, device) == []


def test_the_tolerance_covers_only_the_anchor_error():
    host, device = _overlapped()
    host[3] = HostSpan("collect", 2, 61, 79)   # 1 ns short of the device span's end
    assert attribution_errors(host, device, tolerance_ns=1) == []
    assert attribution_errors(host, device, tolerance_ns=0) != []


@pytest.mark.parametrize("mode", [SYNC, Mode(True, "sim", "lazy"), Mode(True, "sim", "threaded"),
                                  Mode(True, "sim", "skewed", collect="eager")])
def test_the_engines_timelines_attribute_every_step(mode):
    record = run_mode(TARGETED["retiring"](), mode)
    assert record.stats["attributed_steps"] == record.stats["num_steps"] > 0


def test_the_zoo_misattribution_is_caught_in_async_only(monkeypatch):
    INJECTIONS["collect_span_names_the_newest_step"].apply(monkeypatch)
    run_mode(TARGETED["retiring"](), SYNC)   # in sync mode the newest step is the collected one
    with pytest.raises(InvariantViolation, match="timeline: .*collect span"):
        run_mode(TARGETED["retiring"](), Mode(True, "sim", "lazy"))
