"""The collect variants: an eager collect (every step whose outputs already arrived, before
scheduling) and a polling wait with back-off must give the lazy, blocking collect's tokens; the
back-off poll is no hang on sim lazy, where a busy poll still is."""
from __future__ import annotations

import pytest
import torch

from lockstep.ci.targeted import TARGETED
from lockstep.ci.watchdog import CheckHang, watchdog
from lockstep.ci.zoo import INJECTIONS
from lockstep.engine.config import EngineConfig
from lockstep.engine.model_runner import ModelRunner
from lockstep.property_tests.differential import run_mode
from lockstep.property_tests.engine_under_test import SYNC, Mode
from lockstep.property_tests.properties import check_workload

torch.set_num_threads(1)


@pytest.mark.parametrize("field, value", [("collect", "early"), ("output_wait", "spin")])
def test_an_unknown_collect_option_is_refused_naming_it(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of .* got '{value}'"):
        EngineConfig(model="oracle", **{field: value})


def _gathered_rows(monkeypatch, mode: Mode) -> int:
    """Rows whose input id came from the device (the host did not know it yet)."""
    gathered = []
    real = ModelRunner._device_step

    def counting(self, inputs, result):
        gathered.append(inputs.num_gathered)
        return real(self, inputs, result)
    monkeypatch.setattr(ModelRunner, "_device_step", counting)
    run_mode(TARGETED["retiring"](), mode)
    return sum(gathered)


def test_the_eager_collect_knows_every_finished_step_before_scheduling(monkeypatch):
    # sim eager: every step's outputs arrive at once, so the eager collect always knows them
    assert _gathered_rows(monkeypatch, Mode(True, "sim", "eager")) > 0
    assert _gathered_rows(monkeypatch, Mode(True, "sim", "eager", collect="eager")) == 0
    # sim lazy: nothing arrives before the host waits, so it is the lazy collect
    assert _gathered_rows(monkeypatch, Mode(True, "sim", "lazy", collect="eager")) > 0


@pytest.mark.parametrize("mode", [Mode(True, "sim", "threaded", collect="eager"),
                                  Mode(True, "sim", "skewed", collect="eager"),
                                  Mode(True, "sim", "eager", collect="eager")])
def test_the_eager_collect_gives_the_lazy_collects_tokens(mode):
    for name in ("retiring", "stops_in_flight", "aborts", "tight_cache"):
        check_workload(TARGETED[name](), f"eager-collect-{name}", (mode,))


def test_a_back_off_poll_is_no_hang_on_sim_lazy():
    polling = Mode(True, "sim", "lazy", output_wait="poll")
    with watchdog("polling", stall_s=2.0):
        for name in ("retiring", "edge_lengths", "mixed_batch"):
            report = check_workload(TARGETED[name](), f"polling-{name}", (polling,))
            assert report.stat("overlapped_launches") > 0, name   # it polls, the lag stays


def test_a_busy_poll_is_still_a_hang_on_sim_lazy(monkeypatch):
    INJECTIONS["collect_polls_instead_of_waiting"].apply(monkeypatch)
    with pytest.raises(CheckHang, match="collect \\(waiting for its outputs\\)"), \
            watchdog("busy-poll", stall_s=1.0):
        run_mode(TARGETED["edge_lengths"](), Mode(True, "sim", "lazy"))


def test_sync_mode_ignores_the_eager_collect():
    workload = TARGETED["retiring"]()
    plain = run_mode(workload, SYNC)
    eager = run_mode(workload, Mode(False, "sim", "eager", collect="eager"))
    assert plain.results == eager.results and plain.stats["num_steps"] == \
        eager.stats["num_steps"]
