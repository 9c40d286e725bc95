"""The overlap invariant judges what the device did before a launch, not the order of calls."""
from __future__ import annotations

import pytest
import torch

from lockstep.ci.targeted import targeted_workloads
from lockstep.ci.zoo import INJECTIONS, Patcher
from lockstep.property_tests.engine_under_test import Mode
from lockstep.property_tests.properties import PropertyFailure, check_workload

torch.set_num_threads(1)
LAZY = (Mode(True, "sim", "lazy"),)


def test_the_clean_engine_overlaps_every_launch_on_sim_lazy(tmp_path):
    report = check_workload(targeted_workloads()["mixed_batch"], "clean", LAZY, solo=False,
                            replay_to=tmp_path / "clean.json")
    assert report.stat("overlapped_launches") >= 8


@pytest.mark.parametrize("name", ["fence_waits_for_the_compute_stream", "fence_too_wide"])
def test_a_fence_that_waits_for_the_previous_forward_pass_fails(tmp_path, name):
    patch = Patcher()
    INJECTIONS[name].apply(patch)
    try:
        with pytest.raises(PropertyFailure, match="no overlap: step 1's device work had "
                                                  "completed when step 2's launch returned"):
            check_workload(targeted_workloads()["mixed_batch"], name, LAZY, solo=False,
                           replay_to=tmp_path / "w.json")
    finally:
        patch.undo()
