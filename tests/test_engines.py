"""Other engines through --engine: the registry, the capability declaration and its narrowing,
and the gate, fuzz and replay pointed at an engine Lockstep did not write."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from hypothesis import given, settings

from lockstep.ci.cli import main
from lockstep.ci.gate import GateOptions, run_gate
from lockstep.engine import SamplingParams
from lockstep.property_tests import Capabilities, narrowing, workloads
from lockstep.property_tests.adapters import (EngineSpecError, engine_modes, engine_name,
                                              resolve_engine)
from lockstep.property_tests.capabilities import narrow_workload, unsupported
from lockstep.property_tests.engine_under_test import LockstepEngine, Mode
from lockstep.property_tests.workload import AbortSpec, EngineSpec, RequestSpec, Workload

torch.set_num_threads(1)

# an engine that declares less than Lockstep's: no seeds, penalties, aborts, reuse or preemption
LIMITED = Capabilities(engine="limited", adapter_version="7",
                       sampling=frozenset({"stop_token_ids", "ignore_eos"}), max_logprobs=None,
                       abort=False, reuse_ids=False, force_preempt=False)
ADAPTER = '''
from lockstep.property_tests.capabilities import Capabilities
from lockstep.property_tests.engine_under_test import LockstepEngine
CALLS = []

def limited(spec, mode):
    CALLS.append(mode.name)
    return LockstepEngine(spec, mode)

limited.capabilities = Capabilities(
    engine="limited", adapter_version="7", sampling=frozenset({"stop_token_ids", "ignore_eos"}),
    max_logprobs=None, abort=False, reuse_ids=False, force_preempt=False)
'''


@pytest.fixture
def user_adapter(tmp_path, monkeypatch):
    """A user's adapter module on the import path: ``limited_adapter:limited``."""
    (tmp_path / "limited_adapter.py").write_text(ADAPTER)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "limited_adapter:limited"
    sys.modules.pop("limited_adapter", None)


def test_a_user_adapter_is_one_import_path_away(user_adapter):
    factory = resolve_engine(user_adapter)
    assert factory.capabilities.engine == "limited"
    assert engine_name(factory) == user_adapter   # what its replay files record
    assert engine_name(resolve_engine("lockstep")) == "lockstep"
    assert engine_modes(factory, "cpu")[0] == Mode(False, "sim")


@pytest.mark.parametrize("name, says", [
    ("nope", "not one of"), ("os:path", "has no callable"),
    ("no_such_module_xyz:f", "cannot import"), ("json:dumps", "has no `capabilities`")])
def test_an_engine_that_cannot_be_used_is_refused_naming_it(name, says):
    with pytest.raises(EngineSpecError, match=says):
        resolve_engine(name)


def test_every_narrowing_is_said_in_words():
    lines = "\n".join(narrowing(LIMITED))
    for said in ("no per-request seed: every request is greedy", "no min_tokens",
                 "presence_penalty", "no logprobs", "no abort", "no request-id reuse",
                 "no forced preemption"):
        assert said in lines
    assert narrowing(resolve_engine("lockstep").capabilities) == []


@settings(max_examples=40, deadline=None)
@given(workloads(factory=type("F", (), {"capabilities": LIMITED,
                                        "__call__": staticmethod(LockstepEngine)})()))
def test_strategies_generate_only_what_the_engine_declares(workload):
    assert unsupported(workload, LIMITED) is None
    assert not workload.aborts and not workload.preempt_steps
    assert len({r.request_id for r in workload.requests}) == len(workload.requests)
    assert all(r.params.greedy and not r.params.has_penalties and r.params.logprobs is None
               for r in workload.requests)


def test_narrowing_a_workload_keeps_only_what_is_declared():
    sampled = SamplingParams(temperature=0.7, seed=3, presence_penalty=0.5, logprobs=2,
                             stop_token_ids=[5], max_tokens=4)
    workload = Workload(EngineSpec(), (RequestSpec("a", (1, 2), sampled),
                                       RequestSpec("a", (3,), sampled, arrival=2)),
                        (AbortSpec(1, "a"),), (3,))
    assert unsupported(workload, LIMITED).startswith("requests[0].params.temperature=0.7")
    narrowed = narrow_workload(workload, LIMITED)
    assert unsupported(narrowed, LIMITED) is None
    assert [r.request_id for r in narrowed.requests] == ["a", "a~1"]
    assert narrowed.requests[0].params == dataclasses.replace(
        sampled, temperature=0.0, seed=None, presence_penalty=0.0, logprobs=None)
    assert not narrowed.aborts and not narrowed.preempt_steps


def test_the_gate_runs_what_applies_on_a_user_engine_and_names_the_rest(user_adapter, tmp_path,
                                                                        capsys):
    path = tmp_path / "gate.json"
    code = run_gate(GateOptions(engine=user_adapter, quick=True, json_path=str(path),
                                only=("targeted", "generate", "property")))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "engine limited (adapter 7): sync sim/eager vs async sim/eager" in out
    assert "narrowed: no abort: no workload aborts a request" in out
    assert "N/A   generate" in out and "checks Lockstep's own engine, not" in out
    assert "gate: passed (2/2)" in out
    statuses = {c["name"]: c["status"] for c in json.loads(path.read_text())["checks"]}
    assert statuses == {"targeted": "pass", "generate": "n/a", "property": "pass"}
    assert sys.modules["limited_adapter"].CALLS, "the gate never built the user's engine"


def test_the_gate_refuses_a_model_for_another_engine(user_adapter, capsys):
    assert run_gate(GateOptions(engine=user_adapter, model="oracle")) == 2
    assert "applies to Lockstep's engine" in capsys.readouterr().err


def test_replay_refuses_what_the_engine_does_not_declare_naming_the_field(user_adapter,
                                                                         tmp_path, capsys):
    workload = Workload(EngineSpec(), (RequestSpec(
        "a", (1, 2), SamplingParams(temperature=0.7, seed=1, max_tokens=3)),))
    path = workload.save(tmp_path / "w.json")
    assert main(["replay", str(path), "--engine", user_adapter]) == 2
    err = capsys.readouterr().err
    assert "requests[0].params.temperature=0.7: limited does not support it" in err


def test_a_replay_runs_on_the_engine_its_file_records(user_adapter, tmp_path, capsys):
    workload = Workload(EngineSpec(), (RequestSpec("a", (1, 2), SamplingParams(
        temperature=0.0, max_tokens=3)),), engine_under_test=user_adapter, adapter_version="6")
    path = workload.save(tmp_path / "w.json")
    assert main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert "on limited (adapter 7)" in out and "written by adapter 6" in out
    assert sys.modules["limited_adapter"].CALLS
