"""In sync mode too, the input-prep fence (not the collect's wait) protects the staging buffers.

A step whose rows are all partial prefills samples nothing, so its collect has nothing to read;
an engine may return it without a device wait (vLLM #48214, #53057 had such steps). Then the
fence is the only thing between that step's pending staging copies and the next step's
preparation. These tests apply the zoo entry's two edits one at a time and together.
"""
from __future__ import annotations

import torch

from lockstep.ci.targeted import targeted_workloads
from lockstep.ci.zoo import Patcher
from lockstep.ci.zoo.buffers import (collect_tokenless_steps_without_a_wait, samples_nothing,
                                     skip_the_fence_in_sync_mode)
from lockstep.ci.zoo.witness import departures, run_bare
from lockstep.engine.model_runner import PendingOutput
from lockstep.property_tests.engine_under_test import Mode

torch.set_num_threads(1)

SYNC_LAZY = Mode(False, "sim", "lazy")


def _run(*edits) -> tuple:
    workload = targeted_workloads()["tight_cache"]
    patch = Patcher()
    try:
        for edit in edits:
            edit(patch)
        return run_bare(workload, SYNC_LAZY)
    finally:
        patch.undo()


def test_the_workload_has_prefill_only_steps():
    seen = []
    real = PendingOutput.get_output

    def counting(self):
        seen.append(samples_nothing(self))
        return real(self)
    _run(lambda patch: patch.setattr(PendingOutput, "get_output", counting))
    assert sum(seen) >= 2, seen


def test_a_collect_without_a_wait_is_safe_while_the_fence_stays():
    clean = _run()
    assert clean.error is None and clean.outputs
    found = departures(clean, _run(collect_tokenless_steps_without_a_wait))
    # no race, same outputs; only the timeline shows that a collect returned before its step's
    # device work ended (the attribution rule sees every collect that does not wait)
    assert set(found) == {"timeline"}, found
    assert "collect span of step" in found["timeline"] and "before step" in found["timeline"]


def test_skipping_the_fence_in_sync_mode_is_harmless_while_every_collect_waits():
    assert departures(_run(), _run(skip_the_fence_in_sync_mode)) == {}


def test_with_both_a_prefill_only_step_races_the_next_preparation():
    found = departures(_run(), _run(collect_tokenless_steps_without_a_wait,
                                    skip_the_fence_in_sync_mode))
    assert "race" in found, found
    assert "host-to-device copy from it was pending" in found["race"], found
