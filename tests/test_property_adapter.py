"""The adapter in docs/property_tests.md is complete: the harness drives an engine through it."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from hypothesis import given, settings

from lockstep.property_tests import profiles, run_differential, workloads

torch.set_num_threads(1)
profiles.load()
DOC = Path(__file__).resolve().parent.parent / "docs" / "property_tests.md"


def documented_adapter() -> dict:
    section = DOC.read_text().split("## Checking your own engine", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


@settings(max_examples=15)
@given(workloads())
def test_the_differential_runs_through_the_documented_adapter(workload):
    report = run_differential(workload, factory=documented_adapter()["my_engine"])
    assert set(report.comparisons) == {"async sim/eager", "async sim/lazy", "async sim/threaded",
                                       "solo"}
    assert all(c.compared == len(workload.requests) for c in report.comparisons.values())
