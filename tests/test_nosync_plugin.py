"""The ``nosync`` pytest plugin: marked tests fail on a host sync or a buffer race in a step."""
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
    result.stderr.fnmatch_lines(["*--widen-races=-1.0*"])
