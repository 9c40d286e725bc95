"""Faults inside a step are contained: the step's requests end with "error", never with its
tokens, everything they held comes back, and the engine goes on serving the rest exactly.

A fault is one raised exception, injected at the k-th call of one phase of a step:
``schedule`` (Scheduler.schedule), ``prepare`` (InputBatch.prepare), ``device`` (the model
runner's device work, which runs later on a stream queue on sim lazy and threaded), ``fill``
(the end of the device work, after the model ran), ``collect`` (PendingOutput.get_output) and
``update`` (Scheduler.update_from_output). The reference is the same workload without the
fault: the oracle model and seeded sampling make every request's tokens independent of the
batch, so each request that did not fail must match it exactly, and one that failed must have
received a prefix of it.
"""
from __future__ import annotations

import random

import pytest
import torch

from lockstep.engine import SamplingParams
from lockstep.engine.config import EngineConfig
from lockstep.engine.core import EngineCore
from lockstep.engine.input_batch import InputBatch
from lockstep.engine.model_runner import DeviceResult, ModelRunner, PendingOutput
from lockstep.engine.scheduler import Scheduler

from conftest import drain

PHASES = {"schedule": (Scheduler, "schedule"), "prepare": (InputBatch, "prepare"),
          "device": (ModelRunner, "_device_step"), "fill": (DeviceResult, "fill"),
          "collect": (PendingOutput, "get_output"), "update": (Scheduler, "update_from_output")}
TARGETS = [(False, "eager"), (True, "eager"), (False, "lazy"), (True, "lazy"),
           (False, "threaded"), (True, "threaded"), (True, "skewed")]
if torch.cuda.is_available():
    TARGETS += [(False, "cuda"), (True, "cuda")]


class InjectedFault(RuntimeError):
    pass


def make_engine(async_scheduling: bool, where: str, num_kv_blocks: int = 24) -> EngineCore:
    device = "cuda" if where == "cuda" else "sim"
    return EngineCore(EngineConfig(
        model="oracle", device=device, sim_policy=None if device == "cuda" else where,
        async_scheduling=async_scheduling, block_size=4, num_kv_blocks=num_kv_blocks,
        max_num_seqs=4, max_num_batched_tokens=24, max_model_len=64, enforce_eager=True))


def reference_on(where: str) -> str:
    """Sync on the same device: CUDA's float logprobs differ from the CPU's in the last bits."""
    return "cuda" if where == "cuda" else "eager"


def workload(seed: int) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(6):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(2, 14))]
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1000),
            max_tokens=rng.randint(1, 10), ignore_eos=rng.random() < 0.5,
            presence_penalty=rng.choice([0.0, 0.5]), logprobs=rng.choice([None, 0, 2]))
        out.append((f"r{i}", prompt, params))
    return out


def run(engine: EngineCore, requests) -> dict:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    return drain(engine, max_steps=500)


def assert_nothing_held(engine: EngineCore) -> None:
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert not engine.scheduler.requests and not engine._in_flight
    held = set(engine.runner.input_batch.slot_of) - set(engine.scheduler._freed)
    assert not held, f"slots still held by {held}"


def inject(monkeypatch, phase: str, at_call: int) -> dict:
    """Raise InjectedFault at the ``at_call``-th call of ``phase``; returns the call counter."""
    owner, name = PHASES[phase]
    real = getattr(owner, name)
    calls = {"n": 0, "fired": False}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            calls["fired"] = True
            raise InjectedFault(f"injected {phase} fault at call {at_call}")
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, faulty)
    return calls


def check_contained(reference: dict, faulty: dict) -> list[str]:
    """Every request ended; a failed one got a prefix of its reference tokens, the others all
    of them. Returns the failed ones."""
    assert set(faulty) == set(reference)
    failed = []
    for rid, ref in reference.items():
        out = faulty[rid]
        if out.finish_reason == "error":
            assert "InjectedFault" in out.error, out.error
            assert out.token_ids == ref.token_ids[:len(out.token_ids)], (rid, out, ref)
            failed.append(rid)
        else:
            assert (out.token_ids, out.finish_reason, out.logprobs) == (
                ref.token_ids, ref.finish_reason, ref.logprobs), rid
    return failed


@pytest.mark.parametrize("async_scheduling,where", TARGETS, ids=lambda v: str(v))
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_fault_in_any_phase_is_contained(monkeypatch, async_scheduling, where, phase):
    requests = workload(7)
    reference = run(make_engine(False, reference_on(where)), requests)
    engine = make_engine(async_scheduling, where)
    calls = inject(monkeypatch, phase, at_call=3)
    faulty = run(engine, requests)
    assert calls["fired"]
    assert check_contained(reference, faulty), "the fault ended no request"
    assert_nothing_held(engine)
    monkeypatch.undo()
    again = run(engine, [(f"again-{rid}", p, sp) for rid, p, sp in requests])
    assert {rid[6:]: o.token_ids for rid, o in again.items()} == {
        rid: o.token_ids for rid, o in reference.items()}
    assert_nothing_held(engine)


@pytest.mark.parametrize("async_scheduling,policy", [(True, "threaded"), (True, "lazy")])
def test_a_device_fault_is_reported_for_its_own_step_with_its_cause(monkeypatch,
                                                                     async_scheduling, policy):
    """The failing step's requests get the error, naming the step and the cause; the step
    before and after it deliver their tokens (the old engine let step N+1's fence take the
    error and step N return uninitialised memory as tokens)."""
    engine = make_engine(async_scheduling, policy)
    steps: list[tuple[int, set[str]]] = []
    real_execute = ModelRunner.execute_model

    def execute(self, sched, tables, step):
        steps.append((step, {row.request.request_id for row in sched.rows}))
        return real_execute(self, sched, tables, step)
    monkeypatch.setattr(ModelRunner, "execute_model", execute)
    inject(monkeypatch, "device", at_call=4)
    requests = workload(3)
    final = run(engine, requests)
    failing_step, failing_rows = steps[3]
    errors = {rid: o.error for rid, o in final.items() if o.finish_reason == "error"}
    assert errors and set(errors) <= failing_rows, (errors, failing_rows)
    for error in errors.values():
        assert f"device work of step {failing_step}" in error
        assert "InjectedFault: injected device fault" in error
    reference = run(make_engine(False, reference_on(policy)), requests)
    check_contained(reference, final)


@pytest.mark.parametrize("async_scheduling,where", TARGETS, ids=lambda v: str(v))
def test_randomized_faults_leave_no_leak_and_no_foreign_token(monkeypatch, async_scheduling,
                                                               where):
    """A fault at a random step in a random phase, over many workloads, with tight KV caches
    (preemption): after draining nothing is held, no request received a token its reference
    does not have, and every request the fault did not touch is exact."""
    rng = random.Random(f"{async_scheduling}{where}")
    fired = 0
    for trial in range(12):
        requests = workload(100 + trial)
        blocks = rng.choice([8, 12, 24])
        reference = run(make_engine(False, reference_on(where), blocks), requests)
        engine = make_engine(async_scheduling, where, blocks)
        with monkeypatch.context() as patch:
            calls = inject(patch, rng.choice(list(PHASES)), at_call=rng.randint(1, 12))
            faulty = run(engine, requests)
        fired += calls["fired"]
        failed = check_contained(reference, faulty)
        assert calls["fired"] or not failed
        assert_nothing_held(engine)
    assert fired >= 6, f"only {fired} of 12 faults fired"
