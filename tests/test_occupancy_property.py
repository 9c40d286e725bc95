"""The occupancy rule on random workloads whose requests all end by length (no stops, aborts,
forced preemptions or reused ids; a KV cache for every request): async on every sim policy runs
the very steps sync runs."""
from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings

from lockstep.property_tests import profiles
from lockstep.property_tests.differential import run_differential
from lockstep.property_tests.engine_under_test import ASYNC_MODES
from lockstep.property_tests.strategies import workloads
from lockstep.property_tests.workload import Workload

torch.set_num_threads(1)
profiles.load()


def length_only(workload: Workload) -> Workload:
    requests = tuple(dataclasses.replace(r, request_id=f"q{i}", params=dataclasses.replace(
        r.params, ignore_eos=True, stop_token_ids=[])) for i, r in enumerate(workload.requests))
    return dataclasses.replace(workload, requests=requests, aborts=(), preempt_steps=(),
                               engine=dataclasses.replace(workload.engine, num_kv_blocks=None))


@settings(max_examples=50)
@given(workloads(model="oracle"))
def test_async_never_runs_smaller_steps_than_sync(workload):
    report = run_differential(length_only(workload), ASYNC_MODES, solo=False)
    sync = report.runs["sync sim/eager"].stats["rows_per_step"]
    for mode in ASYNC_MODES:
        rows = report.runs[mode.name].stats["rows_per_step"]
        assert rows[:len(sync)] == sync, (mode.name, sync, rows)   # with ample KV: the same
