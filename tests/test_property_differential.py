"""The differential properties under the chosen hypothesis profile (``ci`` in CI: derandomized)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
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


test_async_on_cuda_matches_sync_and_solo_on_the_oracle = pytest.mark.gpu(
    async_matches_sync_property("oracle", modes=(Mode(True, "cuda"),)))


@given(workloads())
def test_a_workload_survives_the_json_round_trip_exactly(workload):
    assert Workload.from_json(workload.to_json()) == workload


@given(workloads())
def test_a_workload_file_round_trips_and_names_its_format(workload):
    with tempfile.TemporaryDirectory() as folder:
        path = workload.save(Path(folder) / "sub" / "w.json")
        assert Workload.load(path) == workload
    data = workload.to_dict()
    with pytest.raises(ValueError, match="version=99"):
        Workload.from_dict({**data, "version": 99})
    with pytest.raises(ValueError, match="format="):
        Workload.from_dict({**data, "format": "something-else"})


def test_a_failure_is_kept_in_the_example_database_and_replayed_from_it_first(
        tmp_path, monkeypatch):
    from hypothesis import Phase, settings
    from hypothesis.database import DirectoryBasedExampleDatabase

    from lockstep.engine.scheduler import Scheduler
    from lockstep.property_tests.properties import PropertyFailure

    def tokens_to_schedule(self, req):  # one step past max_tokens
        if len(req.output_token_ids) + req.num_placeholders > req.sampling_params.max_tokens:
            return 0
        return req.num_tokens_with_placeholders - req.num_computed_tokens
    monkeypatch.setattr(Scheduler, "_tokens_to_schedule", tokens_to_schedule)
    monkeypatch.setenv("LOCKSTEP_REPLAY_DIR", str(tmp_path / "replays"))
    db = DirectoryBasedExampleDatabase(str(tmp_path / "db"))
    def prop():
        return async_matches_sync_property("oracle", modes=(Mode(True, "sim", "lazy"),))
    with pytest.raises(PropertyFailure):
        settings(database=db, derandomize=False, max_examples=30)(prop())()
    assert list((tmp_path / "db").rglob("*")), "the failure was not saved"
    # only the reuse phase: nothing is generated, the saved example alone must fail again
    with pytest.raises(PropertyFailure, match="past prompt \\+ max_tokens - 1"):
        settings(database=db, derandomize=False, phases=[Phase.reuse])(prop())()
