"""The stateful machine with injected faults: the clean engine keeps the containment contract
under random client operations, and each containment bug of the zoo breaks it.

Under the ``ci`` profile (derandomized, 30 programs of 40 rules) with an empty pool of
literals: hypothesis 6.155 also draws from the literals of whichever local modules are
imported, so derandomized examples would otherwise depend on the tests that ran before
(``tests/test_property_faults.py`` met it). Run with ``-s`` to see the summary, the program
and seconds at which each bug was found, and the failure.
"""
from __future__ import annotations

import re
import shlex
import time
from collections import OrderedDict

import pytest
import torch
from hypothesis import Phase, settings
from hypothesis.internal.conjecture import providers

from lockstep.ci.zoo import INJECTIONS
from lockstep.property_tests import differential, fault_machine, profiles, properties
from lockstep.property_tests.fault_machine import FaultMachine, run_fault_machine
from lockstep.property_tests.properties import PropertyFailure

torch.set_num_threads(1)

STEPS = 40   # rules per program
# what a broken contract reads like: a hang, something held, a lost or wrong request, an
# error outside a fault's reach, or an engine invariant broken after the fault
BROKEN = ("not idle after", "did not drain", "held", "has no result", "diverges from",
          "touched", "names no injected fault", "placeholders", "timeline:")


@pytest.fixture(autouse=True)
def ci_profile(monkeypatch):
    """The ``ci`` profile for this module's tests only, drawing no literals from modules."""
    previous = settings.get_current_profile_name()
    assert profiles.load("ci") == "ci" and settings().derandomize
    if hasattr(providers, "_get_local_constants"):   # hypothesis 6.155 here
        from hypothesis.internal.constants_ast import Constants
        monkeypatch.setattr(providers, "_get_local_constants", Constants)
        providers.CONSTANTS_CACHE.cache.clear()
    yield
    if hasattr(providers, "_get_local_constants"):
        providers.CONSTANTS_CACHE.cache.clear()
    settings.load_profile(previous)


@pytest.fixture(autouse=True)
def replay_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(properties.REPLAY_DIR_ENV, str(tmp_path))
    # solo runs are cached process-wide: a faulty engine's must not outlive its test
    monkeypatch.setattr(differential, "_solo_cache", OrderedDict())
    return tmp_path


def machine_settings(shrink: bool = True) -> settings:
    phases = [p for p in settings().phases if shrink or p is not Phase.shrink]
    return settings(stateful_step_count=STEPS, phases=phases)


def test_the_clean_engine_contains_every_fault_under_random_operations(replay_dir):
    start = time.perf_counter()
    summary = run_fault_machine(machine_settings())
    print(f"\nclean: {summary} ({time.perf_counter() - start:.1f} s)")
    assert re.search(r"[1-9]\d* of \d+ armed faults fired", summary), summary
    assert not list(replay_dir.iterdir())


@pytest.mark.parametrize("bug", ["launch_failure_drops_steps_in_flight",
                                 "collect_pops_in_flight_entry_after_update"])
def test_a_containment_bug_of_the_zoo_breaks_the_contract(monkeypatch, replay_dir, bug):
    INJECTIONS[bug].apply(monkeypatch)
    first: list[tuple[int, float]] = []   # (programs, seconds) at the first failure
    fail, start = FaultMachine._fail, time.perf_counter()

    def timed_fail(machine, exc):
        if not first:
            first.append((fault_machine._tally.programs, time.perf_counter() - start))
        fail(machine, exc)
    monkeypatch.setattr(FaultMachine, "_fail", timed_fail)
    # what is pinned is the search and the failure's report: the shrink (of 40-rule programs,
    # each a run of three engines) takes 30 to 70 s here and is left to the gate and fuzzing
    with pytest.raises(PropertyFailure) as info:
        run_fault_machine(machine_settings(shrink=False))
    message = str(info.value)
    print(f"\n=== {bug}: first failure at program {first[0][0]} of the ci profile's "
          f"{settings().max_examples}, {first[0][1]:.1f} s\n{message}")
    assert "fired in driver step" in message, message
    assert any(text in message.splitlines()[0] for text in BROKEN), message
    assert info.value.replay.parent == replay_dir and info.value.replay.exists()
    # the saved history with the faults it names fails again, through the driver
    replays = re.findall(r"replay: python -m lockstep\.property_tests\.fault_machine (.*)",
                         message)
    assert replays, message
    assert 1 in [fault_machine.main(shlex.split(args)) for args in replays], replays


def test_the_replay_command_replays_faults_on_a_saved_workload(tmp_path, capsys):
    from lockstep.property_tests.faults import retiring_workload
    path = tmp_path / "retiring.json"
    retiring_workload().save(path)
    # the zoo's witness state: the second launch fails with a request's last token in flight
    assert fault_machine.main([str(path), "--mode", "async/lazy", "--fault", "0:launch:2",
                               "--fault", "9:device:1"]) == 0
    out = capsys.readouterr().out
    assert "launch fault at call 2 (armed at step 0): fired" in out and "contained" in out


@pytest.mark.parametrize("args, named", [
    (["--fault", "0:nowhere:1"], "phase='nowhere'"), (["--fault", "0:launch"], "STEP:PHASE:CALL"),
    (["--mode", "async/threaded"], "--mode"), ([], "missing.json")])
def test_the_replay_command_exits_2_naming_bad_input(tmp_path, capsys, args, named):
    assert fault_machine.main([str(tmp_path / "missing.json"), *args]) == 2
    assert named in capsys.readouterr().err
