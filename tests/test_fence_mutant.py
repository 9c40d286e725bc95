"""The engine without its input-prep fence is flagged in every run; the real engine in none."""
from __future__ import annotations

import pytest

import sync_guard
from lockstep.engine import LLM, SamplingParams
from lockstep.engine.device import HostBuffer

RUNS = 100
TARGETS = [("sim", "eager"), ("sim", "lazy"), ("sim", "threaded"),
           pytest.param(("cuda", "eager"), marks=pytest.mark.gpu)]


def run_once(target, seed: int) -> bool:
    """One short async generation under the race checker; True when a race was reported."""
    device, policy = target
    llm = LLM(model="oracle", device=device, sim_policy=policy if device == "sim" else None,
              async_scheduling=True,
              seed=seed, enforce_eager=True)
    prompts = [[(seed + 7 * i + j) % 400 + 3 for j in range(3 + i)] for i in range(3)]
    try:
        with sync_guard.race_check():
            llm.generate(prompts, SamplingParams(temperature=0.8, seed=seed, max_tokens=4))
    except sync_guard.BufferRace:
        return True  # the engine is dropped with its (corrupted) work still queued
    return False


@pytest.mark.parametrize("target", TARGETS)
def test_removing_the_input_prep_fence_is_flagged_in_every_run(target, monkeypatch):
    monkeypatch.setattr(HostBuffer, "fence", lambda self: None)
    flagged = sum(run_once(target, seed) for seed in range(RUNS))
    assert flagged == RUNS


@pytest.mark.parametrize("target", TARGETS)
def test_the_engine_with_its_fence_is_clean_in_every_run(target):
    flagged = sum(run_once(target, seed) for seed in range(RUNS))
    assert flagged == 0
