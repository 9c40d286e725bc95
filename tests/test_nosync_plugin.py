"""The ``nosync`` pytest plugin: marked tests fail on a host sync or a buffer race.

The engine tests guard the whole body (the default) or the engine's steps; the user-project
tests build a project outside the repository, as a new user would write one.
"""
from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

HEADER = '''
import pytest
import torch
from lockstep.engine import LLM, SamplingParams
from lockstep.engine.device import HostBuffer
from lockstep.engine.model_runner import ModelRunner

def generate(policy="lazy", async_scheduling=True):
    llm = LLM(model="oracle", device="sim", sim_policy=policy, async_scheduling=async_scheduling)
    return llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=0, max_tokens=5))

def plant_sync(monkeypatch):
    """A step that reads a device tensor on the host: the classic accidental .tolist()."""
    original = ModelRunner.execute_model
    def execute_model(self, *args):
        pending = original(self, *args)
        self.last_sampled.tolist()
        return pending
    monkeypatch.setattr(ModelRunner, "execute_model", execute_model)
'''


@pytest.fixture
def run(pytester):
    """Run a test file (HEADER + body) in a fresh pytest process (the installed plugin loads)."""

    def run_file(body: str, *args: str):
        pytester.makepyfile(test_case=HEADER + body)
        return pytester.runpytest_subprocess("-q", *args)
    return run_file


def test_a_marked_test_whose_step_syncs_fails(run):
    result = run('''
@pytest.mark.nosync
def test_step(monkeypatch):
    plant_sync(monkeypatch)
    generate()
''')
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*SyncViolation*Tensor.tolist of sim device memory*"])


def test_the_same_test_unmarked_passes(run):
    result = run('''
def test_step(monkeypatch):
    plant_sync(monkeypatch)
    generate()
''')
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("level,outcome", [("log", "passed"), ("off", "passed"),
                                           ("error", "failed")])
def test_the_sync_guard_option_sets_what_a_sync_does(run, level, outcome):
    result = run('''
@pytest.mark.nosync
def test_step(monkeypatch):
    plant_sync(monkeypatch)
    generate()
''', f"--sync-guard={level}")
    result.assert_outcomes(**{outcome: 1})


def test_a_marked_test_without_the_input_prep_fence_fails_with_a_buffer_race(run):
    result = run('''
@pytest.mark.nosync
def test_step(monkeypatch):
    monkeypatch.setattr(HostBuffer, "fence", lambda self: None)
    generate("threaded")
''')
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*BufferRace*"])


def test_the_real_engine_passes_in_sync_and_async_modes_on_every_policy(run):
    result = run('''
@pytest.mark.nosync
@pytest.mark.parametrize("policy", ["eager", "lazy", "threaded"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step(policy, async_scheduling):
    generate(policy, async_scheduling)
''')
    result.assert_outcomes(passed=6)


def test_target_none_guards_the_whole_test_body(run):
    result = run('''
@pytest.mark.nosync(target=None)
def test_body():
    from lockstep.engine.sim import SimDevice
    SimDevice("eager").zeros(2, dtype=torch.float32).tolist()
''')
    result.assert_outcomes(failed=1)


def test_the_no_sync_fixture_arms_the_configured_guard(run):
    result = run('''
import sync_guard
def test_fixture(no_sync, sync_guard_options):
    from lockstep.engine.sim import SimDevice
    x = SimDevice("eager").zeros(2, dtype=torch.float32)
    assert sync_guard_options.level == "log"
    with no_sync() as reports:
        x.tolist()
    assert len(reports) == 1
''', "--sync-guard=log")
    result.assert_outcomes(passed=1)


def test_a_negative_widening_is_a_usage_error(run):
    result = run('''
@pytest.mark.nosync
def test_step():
    generate()
''', "--widen-races=-1")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--widen-races='-1': must be >= 0 milliseconds*"])


USER_OPS = """
import torch

def step(x):
    n = x.argmax(-1)
    return n.max().item()
"""

USER_TESTS = """
import pytest, torch, sync_guard
import mk.ops
from mk.ops import step

def x():  # real device memory on a GPU; on CPU, a tensor the guard treats as device memory
    if torch.cuda.is_available():
        return torch.randn(4, 8, device="cuda")
    return sync_guard.as_device(torch.randn(4, 8))

@pytest.mark.nosync
def test_whole_body():
    mk.ops.step(x())

@pytest.mark.nosync("mk.ops:step")
def test_positional_target():
    mk.ops.step(x())

@pytest.mark.nosync(target="mk.ops:step")
def test_keyword_target():
    mk.ops.step(x())

@pytest.mark.nosync(target="mk.ops:step")
def test_keyword_target_reached_by_a_from_import():
    step(x())

@pytest.mark.nosync(target="mk.opz:step")
def test_a_target_that_does_not_resolve():
    step(x())

@pytest.mark.nosync(target="mk.ops:step")
def test_a_target_never_called():
    x().sum()

def test_a_disallow_scope_in_the_body():
    with sync_guard.disallow():
        step(x())
"""


@pytest.fixture
def user_project(pytester):
    """A project of the user's own: a package with a step function, and its tests."""
    pytester.mkpydir("mk").joinpath("ops.py").write_text(USER_OPS)
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def test_every_way_of_writing_a_nosync_test_fails_on_the_users_sync(user_project):
    result = user_project.runpytest_subprocess("-q", "--tb=short")
    result.assert_outcomes(failed=7)
    out = result.stdout.str()
    for name in ("whole_body", "positional_target", "keyword_target",
                 "keyword_target_reached_by_a_from_import", "a_disallow_scope_in_the_body"):
        section = out[out.index(f"_ test_{name} _"):]
        section = section[:section.index("\n_") if "\n_" in section else None]
        assert "E   sync_guard.SyncViolation: host sync: Tensor.item" in section, (name, section)
    assert ("test_user.py::test_a_target_that_does_not_resolve: @pytest.mark.nosync usage "
            "error: target='mk.opz:step': cannot import module 'mk.opz'") in out
    assert ("test_user.py::test_a_target_never_called: @pytest.mark.nosync usage error: "
            "target='mk.ops:step' was never called by the test") in out


def test_reports_show_the_users_frames_only(user_project):
    result = user_project.runpytest_subprocess("-q", "-k", "from_import", "--tb=long")
    out = result.stdout.str()
    assert "E       sync_guard.SyncViolation: host sync: Tensor.item" in out, out
    assert "mk/ops.py" in out and "return n.max().item()" in out
    failure = out[out.index("___ test_keyword_target_reached_by_a_from_import ___"):]
    failure = failure.split("warnings summary")[0].split("short test summary")[0]
    for hidden in ("/_pytest/", "/pluggy/", "/torch/", "/sync_guard/"):
        assert hidden not in failure, (hidden, failure)


def test_the_header_says_what_is_checked_on_this_machine(user_project):
    import torch
    result = user_project.runpytest_subprocess("-q", "-k", "whole_body", "--sync-guard=warn")
    out = result.stdout.str()
    assert "sync_guard: level=log, no race widening, nosync tests: 1" in out
    if torch.cuda.is_available():
        assert "checks CUDA syncs and pinned-buffer races on" in out
    else:
        assert "no CUDA device: only simulated-device memory is checked" in out
        assert out.count("only simulated-device memory is checked") == 2, "header + one warning"


def test_the_mode_is_chosen_and_shown_and_a_bad_one_is_a_usage_error(user_project):
    import torch
    out = user_project.runpytest_subprocess("-q", "-k", "whole_body",
                                            "--sync-guard-mode=auto").stdout.str()
    auto = "light" if torch.cuda.is_available() else "deep"   # light needs the native hook
    assert f"nosync tests: 1, mode={auto}" in out
    result = user_project.runpytest_subprocess("-q", "-k", "whole_body",
                                               "--sync-guard-mode=light")
    assert "nosync tests: 1, mode=light" in result.stdout.str()
    bad = user_project.runpytest_subprocess("--sync-guard-mode=fast")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid choice: 'fast'" in bad.stderr.str()


def test_log_lists_the_syncs_found_in_the_terminal_summary(user_project):
    result = user_project.runpytest_subprocess("-q", "-k", "target and not never and not resolve",
                                               "--sync-guard=log")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines([
        "*sync_guard: syncs and races logged*",
        "test_user.py::test_positional_target: sync: Tensor.item* at *mk/ops.py:6 in step",
        "test_user.py::test_keyword_target_reached_by_a_from_import: sync: Tensor.item*"])


@pytest.mark.parametrize("args, ini, says", [
    (("--sync-guard=strict",), None, "--sync-guard='strict' is not a sync_guard level; choose "
                                     "one of allow, log, disallow"),
    ((), "sync_guard = sometimes", "sync_guard (ini)='sometimes' is not a sync_guard level"),
    ((), "sync_guard_widen_races = soon", "sync_guard_widen_races (ini)='soon': not a number"),
])
def test_bad_settings_are_usage_errors_that_list_the_valid_ones(pytester, args, ini, says):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret != 0
    assert says in result.stderr.str(), result.stderr.str()


def test_ini_settings_apply_and_the_command_line_wins(user_project):
    user_project.makeini("[pytest]\nsync_guard = log\n")
    logged = user_project.runpytest_subprocess("-q", "-k", "whole_body")
    logged.assert_outcomes(passed=1)
    refused = user_project.runpytest_subprocess("-q", "-k", "whole_body", "--sync-guard=error")
    refused.assert_outcomes(failed=1)


def test_the_marker_help_is_listed_whole(pytester):
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.nosync(target=None): run the test body (or only "
                                 "the calls of target, 'module:function' or 'module:Class.method')"
                                 " under sync_guard's host-sync detector and host-buffer race "
                                 "checker"])
