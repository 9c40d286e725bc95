"""``lockstep replay FILE``: re-run a saved workload through the differential and report.

Exit status 0 when every run agrees, 1 with the comparator's message when the failure
reproduces, 2 when the file or the options are bad.
"""
from __future__ import annotations

import json
from pathlib import Path

from .engine_under_test import ASYNC_MODES, Mode
from .properties import PropertyFailure, check_workload
from .workload import Workload


def modes_for(device: str, policy: str | None) -> tuple[Mode, ...]:
    if device == "cuda":
        return (Mode(True, "cuda"),)
    if policy is None:
        return ASYNC_MODES
    return (Mode(True, "sim", policy),)


def replay(path: str, device: str = "sim", policy: str | None = None) -> int:
    file = Path(path)
    try:
        workload = Workload.load(file)
    except FileNotFoundError:
        print(f"lockstep replay: FILE={path!r} does not exist")
        return 2
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        print(f"lockstep replay: FILE={path!r} is not a workload file: {exc}")
        return 2
    modes = modes_for(device, policy)
    print(f"lockstep replay {file}: {len(workload.requests)} requests, "
          f"{len(workload.aborts)} aborts; sync vs {', '.join(m.name for m in modes)} and solo")
    try:
        report = check_workload(workload, modes=modes, replay_to=file)
    except PropertyFailure as failure:
        print(f"FAIL  {failure}")
        return 1
    for name, comparison in report.comparisons.items():
        ties = f", {len(comparison.near_ties)} near-ties accepted" if comparison.near_ties else ""
        print(f"  ok  {name}: {comparison.compared} requests equal{ties}")
    print("replay: passed")
    return 0
