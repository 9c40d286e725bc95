"""The differential properties, usable from pytest, ``lockstep fuzz`` and ``lockstep replay``.

:func:`check_workload` is one differential run that, on any failure (a divergence, an invariant,
a hang, a host sync, a buffer race, or the engine crashing), writes the workload as a replay file and raises
:class:`PropertyFailure` whose message ends with the replay command. Hypothesis runs the shrunk
example last, so the file left behind holds the shrunk workload. ``async_matches_sync`` is the
hypothesis test itself, with ``event()`` counts of the hard states reached.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from hypothesis import event, given, target
from hypothesis.errors import HypothesisException

from .differential import DifferentialReport, reference_mode, run_differential
from .engine_under_test import ASYNC_MODES, EngineFactory, Mode, lockstep_engine
from .strategies import workloads
from .workload import Workload

REPLAY_DIR_ENV = "LOCKSTEP_REPLAY_DIR"


class PropertyFailure(AssertionError):
    """A workload failed; ``replay`` is the saved workload file."""

    def __init__(self, message: str, replay: Path) -> None:
        super().__init__(message)
        self.replay = replay


def replay_dir() -> Path:
    return Path(os.environ.get(REPLAY_DIR_ENV, "lockstep-replays"))


def check_workload(workload: Workload, name: str = "async_matches_sync",
                   modes: tuple[Mode, ...] = ASYNC_MODES, solo: bool = True,
                   replay_to: Path | None = None, factory: EngineFactory = lockstep_engine,
                   reference: Mode | None = None) -> DifferentialReport:
    """Run the differential on ``workload``; on failure save it and raise PropertyFailure."""
    path = replay_to or replay_dir() / f"{name}.json"
    try:
        return run_differential(workload, modes, factory, solo=solo, replay=str(path),
                                reference=reference)
    except HypothesisException:
        raise
    except Exception as exc:  # an engine crash is a failure too, and gets its replay file
        raise failure(exc, workload, path, factory) from exc


def failure(exc: BaseException, workload: Workload, path: Path,
            factory: EngineFactory = lockstep_engine) -> PropertyFailure:
    """Save ``workload`` (with the engine it ran on) at ``path``; the failure's message: kind,
    text, which run, replay."""
    from .adapters import engine_name
    workload = dataclasses.replace(workload, engine_under_test=engine_name(factory),
                                   adapter_version=factory.capabilities.adapter_version)
    workload.save(path)
    message = "\n".join([str(exc), *getattr(exc, "__notes__", ())])
    if "replay:" not in message:
        message += f"\n  replay: lockstep replay {path}"
    return PropertyFailure(f"{type(exc).__name__}: {message}", path)


def record_states(workload: Workload, report: DifferentialReport) -> None:
    """Tell hypothesis which hard states this example reached (``event``) and steer (``target``)."""
    engine = workload.engine
    params = [r.params for r in workload.requests]
    ids = [r.request_id for r in workload.requests]
    states = {
        "preempted": report.stat("num_preemptions") > 0,
        "forced preemption": bool(workload.preempt_steps),
        "chunked prefill": any(len(r.prompt) > engine.max_num_batched_tokens
                               for r in workload.requests),
        "aborted a live request": any(r.aborted for r in report.runs.values()),
        "reused an id": len(set(ids)) < len(ids),
        "re-added an id in the step that aborted it": any(
            workload.readds_in_abort_step(r.aborted) for r in report.runs.values()),
        "max_tokens 1": any(p.max_tokens == 1 for p in params),
        "min_tokens == max_tokens": any(p.min_tokens == p.max_tokens > 0 for p in params),
        "finished on a stop id": any(res.finish_reason == "stop" for run in report.runs.values()
                                     for res in run.results.values()),
        "penalties and none": any(p.has_penalties for p in params)
        and not all(p.has_penalties for p in params),
        "logprobs": any(p.logprobs is not None for p in params),
        "seeded and unseeded": len({p.seed is None for p in params if not p.greedy}) == 2,
        "async overlap": report.stat("overlapped_launches") > 0,
        "near-tie accepted": report.near_ties > 0,
    }
    for state, reached in states.items():
        if reached:
            event(state)
    target(float(report.stat("num_preemptions")), label="preemptions")


def async_matches_sync_property(model: str | None = "oracle",
                                modes: tuple[Mode, ...] = ASYNC_MODES, vocab: int | None = None,
                                factory: EngineFactory = lockstep_engine,
                                reference: Mode | None = None):
    """The hypothesis test: async on every mode equals sync, and sync equals each request
    alone; on ``factory``'s engine (Lockstep's by default), generating only what it declares."""
    reference = reference_mode(modes, reference)
    engine = factory.capabilities.engine
    devices = sorted({m.device for m in (*modes, reference)} - {"sim"})
    label = "default" if model is None else Path(model).name  # a checkpoint: its folder's name
    prefix = ["async_matches_sync"] + ([] if engine == "lockstep" else [engine])
    name = "-".join([*prefix, label, *devices])

    def async_matches_sync(workload: Workload) -> None:
        report = check_workload(workload, name, modes, factory=factory, reference=reference)
        record_states(workload, report)
    # the name is part of hypothesis' database key: each model's failures replay in its own test
    async_matches_sync.__name__ = async_matches_sync.__qualname__ = name.replace("-", "_")
    strategy = workloads(model=model, vocab=vocab, factory=factory, reference=reference)
    return given(strategy)(async_matches_sync)
