"""The differential properties under the chosen hypothesis profile (``ci`` in CI: derandomized)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

from lockstep.property_tests import profiles
from lockstep.property_tests.engine_under_test import Mode
from lockstep.property_tests.properties import async_matches_sync_property
from lockstep.property_tests.strategies import workloads
from lockstep.property_tests.workload import Workload

profiles.load()

test_async_matches_sync_and_solo_on_the_oracle = async_matches_sync_property("oracle")
test_async_matches_sync_and_solo_on_the_default_model_up_to_near_ties = \
    async_matches_sync_property(None)


@pytest.mark.gpu
def test_async_on_cuda_matches_sync_and_solo_on_the_oracle():
    async_matches_sync_property("oracle", modes=(Mode(True, "cuda"),))()


@given(workloads())
def test_a_workload_survives_the_json_round_trip_exactly(workload):
    assert Workload.from_json(workload.to_json()) == workload


def test_a_workload_file_round_trips_and_names_its_format(tmp_path):
    workload = workloads().example()
    path = workload.save(tmp_path / "sub" / "w.json")
    assert Workload.load(path) == workload
    data = workload.to_dict()
    with pytest.raises(ValueError, match="version=99"):
        Workload.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="format="):
        Workload.from_dict({**data, "format": "something-else"})
