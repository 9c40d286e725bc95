"""The containment contract judged on a run whose faults were armed mid-run, under any client
operations (the fault machine's and its replay's judge).

:func:`~lockstep.property_tests.faults.check_fault` judges one fault on a fixed workload. Here
faults fire among adds, aborts, id reuse and forced preemptions, so the contract is checked in
two places:

* :func:`check_reach`, in the ``step()`` call whose outputs carry a fault's errors: every error
  names a fault that fired and one step and phase; the requests it ended are exactly those the
  failing phase touched (the unfinished requests it held when it failed: for a failure
  contained at collect, the failing step's rows that were unfinished when the collect began,
  so a request aborted with the step in flight, and a new request under its id, are not).
* :func:`judge_run`, once the run drained: an ended request received a prefix of its stream
  alone (the solo run: the reference may have aborted it); every other request is exact
  against the fault-free reference; nothing is held; a fresh request then runs as it runs
  alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .comparator import compare_runs
from .driver import EngineHang, RunRecord, drive
from .engine_under_test import SYNC, LockstepEngine, Output
from .faults import ERROR_STEP, FaultContractError, Shot, check_nothing_held, fresh_request
from .workload import EngineSpec, Workload

if TYPE_CHECKING:
    from .armed_engine import ArmedEngine

# the engine phase that contains a failure of each injected phase (the error's "failed in")
CONTAINED_IN = {"schedule": "schedule", "launch": "launch", "prepare": "launch",
                "device": "collect", "fill": "collect", "wait": "collect", "update": "collect"}


def check_reach(errors: Sequence[Output], shots: Sequence[Shot], collected: dict[int, set[str]],
                fired_now: Sequence[Shot], where: str) -> None:
    """Judge the "error" outputs of one ``step()`` call (``errors``). ``collected``: for each
    step, the ids of its rows unfinished when its last collect began; ``fired_now``: the shots
    that fired in this call. A device fault's step and reach are known from its errors only:
    they are set on the shot here."""
    ended: dict[int, tuple[Shot, set[tuple[int, str]], set[str]]] = {}
    for out in errors:
        text = getattr(out, "error", None) or ""
        found = ERROR_STEP.search(text)
        shot = next((s for s in shots if s.fired and f"injected {s}" in text), None)
        if "InjectedFault" not in text or found is None or shot is None:
            raise FaultContractError(f"{where}: request {out.request_id!r} ended with an error "
                                     f"that names no injected fault that fired: {text!r}")
        _, steps, ids = ended.setdefault(id(shot), (shot, set(), set()))
        steps.add((int(found.group(1)), found.group(2)))
        ids.add(out.request_id)
    for shot, steps, ids in ended.values():
        if len(steps) > 1:
            raise FaultContractError(f"{where}: {shot} ended requests of several steps or "
                                     f"phases: {sorted(steps)}")
        (step, phase), = steps
        if phase != CONTAINED_IN[shot.phase] or shot.step not in (None, step):
            raise FaultContractError(f"{where}: {shot} ended requests as step {step} failed "
                                     f"in {phase}; expected step {shot.step} in "
                                     f"{CONTAINED_IN[shot.phase]}")
        if shot.phase in ("device", "fill"):
            shot.step, shot.touched = step, collected.get(step, set())
        if ids != shot.touched:
            raise FaultContractError(f"{where}: {shot} failed step {step} in {phase}, which "
                                     f"held unfinished {sorted(shot.touched)}; the requests "
                                     f"that ended with its error: {sorted(ids)}")
    for shot in fired_now:
        if shot.touched and id(shot) not in ended and shot.phase not in ("device", "fill"):
            raise FaultContractError(f"{where}: {shot} touched {sorted(shot.touched)} and no "
                                     f"request ended with an error")


def judge_run(engine: "ArmedEngine", record: RunRecord, reference: RunRecord, solo: RunRecord,
              workload: Workload, exact: bool, replay: str | None = None) -> int:
    """Judge ``engine``'s drained run ``record`` (the module docstring's second half); disarm
    it for the fresh request. Returns how many requests ended with "error"."""
    where = record.name
    errored = set()
    for key, result in record.results.items():
        if result.finish_reason != "error":
            continue
        errored.add(key)
        alone = solo.results[key].token_ids
        if result.token_ids != alone[:len(result.token_ids)]:
            raise FaultContractError(f"{where}: request {key[0]!r}#{key[1]} ended with an error "
                                     f"having received {result.token_ids}, not a prefix of "
                                     f"{alone} (its stream alone)")
    # an ended request was judged above: stand the reference's own result in for it
    others = RunRecord(record.name, {key: reference.results.get(key, result)
                                     if key in errored else result
                                     for key, result in record.results.items()})
    compare_runs(reference, others, workload, exact, replay)
    engine.disarm()
    check_nothing_held(engine.inner, where)
    check_fresh_request(engine.inner, workload.engine, where)
    return len(errored)


def check_fresh_request(engine: LockstepEngine, spec: EngineSpec, where: str) -> None:
    """After everything ended, a fresh request runs exactly as alone, and leaves nothing held."""
    fresh = Workload(spec, (fresh_request(spec),))
    alone = LockstepEngine(spec, SYNC)
    want = drive(fresh, alone, "fresh alone", alone.eos_token_ids).results[("fresh", 0)]
    try:
        got = drive(fresh, engine, f"{where}, then fresh",
                    engine.eos_token_ids).results[("fresh", 0)]
    except EngineHang as exc:
        raise FaultContractError(f"{where}: a fresh request afterwards never finished: "
                                 f"{exc}") from None
    if (got.token_ids, got.finish_reason) != (want.token_ids, want.finish_reason):
        raise FaultContractError(f"{where}: a fresh request afterwards gave {got.token_ids} "
                                 f"({got.finish_reason}), alone it gives {want.token_ids}")
    check_nothing_held(engine, f"{where}, after the fresh request")
