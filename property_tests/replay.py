"""``lockstep replay FILE``: re-run a saved workload through the differential and report.

Exit status 0 when every run agrees, 1 with the comparator's message when the failure
reproduces, 2 when the file or the options are bad: a file that is not a workload, or a
workload the engine would refuse (checked before any run, naming the field).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from lockstep.engine import SamplingParams

from .adapters import EngineSpecError, engine_modes, engine_name, resolve_engine
from .capabilities import unsupported
from .engine_under_test import ASYNC_MODES, SYNC, Mode, lockstep_engine
from .properties import PropertyFailure, check_workload
from .workload import Workload

_PARAMS = {f.name for f in dataclasses.fields(SamplingParams)}


def modes_for(device: str, policy: str | None) -> tuple[Mode, ...]:
    if device == "cuda":
        return (Mode(True, "cuda"),)
    if policy is None:
        return ASYNC_MODES
    return (Mode(True, "sim", policy),)


def check_runnable(workload: Workload, device: str = "sim") -> None:
    """Raise ValueError, naming the field and value, when the engine would refuse ``workload``:
    its engine spec (as ``EngineConfig`` and the engine's construction check it) or a request
    (as ``EngineCore.check_request`` checks it). A refusal is a bad file, not a reproduction."""
    reference = SYNC if device == "sim" else Mode(False, device)  # the differential's
    try:
        core = lockstep_engine(workload.engine, reference).core
    except ValueError as exc:  # the engine's messages begin with the field's name
        raise ValueError(f"engine.{exc}") from None
    for i, request in enumerate(workload.requests):
        try:
            core.check_request(list(request.prompt), request.params)
        except ValueError as exc:
            raise ValueError(_in_request(i, str(exc))) from None


def _in_request(index: int, message: str) -> str:
    """The engine's message about a request, with the field named as the workload names it."""
    if message.startswith("prompt_token_ids"):
        return f"requests[{index}].prompt{message.removeprefix('prompt_token_ids')}"
    if message.split()[0].split("=")[0] in _PARAMS:
        return f"requests[{index}].params.{message}"
    return f"requests[{index}]: {message}"


def _usage_error(message: str) -> int:
    print(f"lockstep replay: {message}", file=sys.stderr)
    return 2


def replay(path: str, device: str = "sim", policy: str | None = None,
           engine: str | None = None) -> int:
    """Re-run the workload in ``path`` on ``engine`` (by default the one the file records)."""
    file = Path(path)
    try:
        workload = Workload.load(file)
        engine = engine or workload.engine_under_test
        factory = resolve_engine(engine)
        caps = factory.capabilities
        if caps.engine == "lockstep":
            check_runnable(workload, device)
            reference, modes = None, modes_for(device, policy)
        else:
            reference, modes = engine_modes(factory, "cpu" if device == "sim" else device)
        missing = unsupported(workload, caps)
        if missing:
            raise ValueError(missing)
    except EngineSpecError as exc:
        return _usage_error(str(exc))
    except FileNotFoundError:
        return _usage_error(f"FILE={path!r} does not exist")
    except OSError as exc:
        return _usage_error(f"FILE={path!r} cannot be read: {exc.strerror or exc}")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return _usage_error(f"FILE={path!r} is not a workload file: {exc}")
    except ValueError as exc:
        return _usage_error(f"FILE={path!r}: {exc}")
    print(f"lockstep replay {file}: {len(workload.requests)} requests, "
          f"{len(workload.aborts)} aborts; on {caps.engine} (adapter {caps.adapter_version}): "
          f"sync vs {', '.join(m.name for m in modes) or 'nothing async'} and solo")
    if workload.adapter_version and workload.adapter_version != caps.adapter_version \
            and workload.engine_under_test == engine_name(factory):
        print(f"  note: the file was written by adapter {workload.adapter_version}")
    try:
        report = check_workload(workload, modes=modes, replay_to=file, factory=factory,
                                reference=reference)
    except PropertyFailure as failure:
        print(f"FAIL  {failure}")
        return 1
    for name, comparison in report.comparisons.items():
        ties = f", {len(comparison.near_ties)} near-ties accepted" if comparison.near_ties else ""
        print(f"  ok  {name}: {comparison.compared} requests equal{ties}")
    print("replay: passed")
    return 0
