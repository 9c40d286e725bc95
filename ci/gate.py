"""``lockstep gate``: the detectors the zoo shows are needed, each under a watchdog.

Checks, in order (cheapest and most targeted first; ``--quick`` keeps the ones marked quick):

* ``targeted`` (oracle): hand-written workloads aimed at one hard state each
  (:mod:`lockstep.ci.targeted`) through the full differential: sync vs async on sim eager,
  lazy, threaded and skewed vs each request alone, with the invariants (KV blocks, slots,
  placeholders, budgets, admission, overlap on sim lazy), the output rules, and the whole run
  under sync_guard (syncs and races);
* ``generate``: ``LLM.generate`` on ``--model``, async on sim lazy, threaded and skewed, each
  whole call under sync_guard (syncs and races) and equal to sync;
* ``property`` (oracle): the hypothesis differential under the derandomized ``ci`` profile;
* ``machine`` (oracle): the stateful machine under the ``ci`` profile;
* ``faults`` (oracle): injected faults judged by the containment contract
  (:mod:`lockstep.property_tests.faults`): a sweep of every call of every step phase on a
  workload of staggered retirements, in every sim mode, and a random property;
* ``property-model``: the hypothesis differential on ``--model`` (near-ties accepted);
* with ``--device cuda``, ``targeted-cuda`` and ``property-cuda`` first (the same on the GPU,
  oracle), ``graphs-cuda`` (poisoned CUDA-graph static buffers: :mod:`lockstep.ci.graph_poison`) and ``perf`` last (:mod:`lockstep.ci.perf`).

A check the watchdog stops (a hang) fails, and the checks after it are reported "skipped",
not run: the hung engine's threads may still be spinning (a busy poll in a device thread), and
every later check would be slowed by them without end.

A check that fails prints the detector that caught it, the first lines of the message and the
replay command; ``--json`` and ``--junit-xml`` write the same for CI systems. Exit status: 0
passed, 1 a check failed, 2 a usage or environment error (reported before any check runs).
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lockstep.property_tests import profiles

from .gate_checks import (check_faults, check_generate, check_graphs_cuda, check_machine,
                          check_perf,
                          check_property, check_property_cuda, check_property_model,
                          check_targeted, check_targeted_cuda)
from .report import CheckResult, GateResult, classify
from .watchdog import CheckHang, watchdog

MESSAGE_LINES = 8
SHRINK_CAP_S = 60   # hypothesis shrinks a failure for at most this long (its default: 300 s)


@contextmanager
def capped_shrinking(seconds: float) -> Iterator[None]:
    """Bound the time hypothesis spends shrinking one failure, so that a failing gate reports
    within its budget (hypothesis reads this module constant when it starts to shrink; it has
    no public setting for it)."""
    from hypothesis.internal.conjecture import engine
    previous = engine.MAX_SHRINKING_SECONDS
    engine.MAX_SHRINKING_SECONDS = seconds
    try:
        yield
    finally:
        engine.MAX_SHRINKING_SECONDS = previous


class UsageError(Exception):
    """A bad option or a missing device: exit status 2, before any check runs."""


@dataclass
class GateOptions:
    model: str | None = None
    device: str = "cpu"
    quick: bool = False
    json_path: str | None = None
    junit_path: str | None = None
    stall_s: float = 15.0
    only: tuple[str, ...] = ()    # check names (the zoo stops at the first failure anyway)
    stop_at_first_failure: bool = False
    engine: str = "lockstep"      # --engine NAME|module:factory
    vocab: int | None = field(default=None, init=False)
    factory: Any = field(default=None, init=False)   # the engine's, once validated

    @property
    def foreign(self) -> bool:
        """An engine other than Lockstep's: the checks of Lockstep's own engine do not apply."""
        return self.factory is not None and self.factory.capabilities.engine != "lockstep"


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[GateOptions], str]
    uses_model: bool
    quick: bool
    devices: tuple[str, ...] = ("cpu", "cuda")
    deadline_s: float = 600.0
    any_engine: bool = False   # runs through the adapter on any engine (else Lockstep's only)


def validate(options: GateOptions) -> None:
    """Raise UsageError, naming the option, before any check runs."""
    if options.device not in ("cpu", "cuda"):
        raise UsageError(f"--device={options.device!r}: choose cpu or cuda")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA device is available on this machine")
    from lockstep.property_tests.adapters import EngineSpecError, engine_modes, resolve_engine
    try:
        options.factory = resolve_engine(options.engine)
        engine_modes(options.factory, options.device)
    except EngineSpecError as exc:
        raise UsageError(str(exc)) from None
    if options.foreign and options.model is not None:
        raise UsageError(f"--model={options.model!r} applies to Lockstep's engine; the "
                         f"{options.engine} adapter builds its own model")
    model = options.model
    if model not in (None, "oracle"):
        path = Path(model)
        if not path.is_dir():
            raise UsageError(f"--model={model!r}: no such directory (give a Hugging Face "
                             f"checkpoint directory, 'oracle', or nothing for the default)")
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise UsageError(f"--model={model!r}: needs config.json and *.safetensors")
        from lockstep.engine.models.config import ModelConfig
        try:
            options.vocab = ModelConfig.from_dir(path).vocab_size
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--model={model!r}: config.json is not usable: {exc}") from None
    unknown = set(options.only) - {c.name for c in CHECKS}
    if unknown:
        raise UsageError(f"--only={','.join(sorted(unknown))}: unknown checks; choose from "
                         f"{', '.join(c.name for c in CHECKS)}")


def selected(options: GateOptions) -> list[Check]:
    checks = [c for c in CHECKS if options.device in c.devices]
    if options.quick:
        checks = [c for c in checks if c.quick]
    if options.only:
        checks = [c for c in checks if c.name in options.only]
    return checks


def run_gate(options: GateOptions) -> int:
    try:
        validate(options)
    except UsageError as exc:
        print(f"lockstep gate: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("lockstep.engine").setLevel(logging.CRITICAL)  # failures are reported
    profiles.load("ci")
    checks = selected(options)
    result = GateResult(model=options.model or "default", device=options.device,
                        quick=options.quick)
    print(f"lockstep gate: model={result.model} device={options.device}"
          f"{' (quick)' if options.quick else ''}, {len(checks)} checks; a failing example is "
          f"shrunk for at most {SHRINK_CAP_S} s")
    if options.foreign:
        from lockstep.property_tests.adapters import describe
        for line in describe(options.factory, options.device):
            print(f"  {line}")
    else:
        on_model = [c.name for c in checks if c.uses_model]
        perf = "" if options.device == "cpu" else ", perf its own model"
        print(f"  on the model: {', '.join(on_model) or 'none'}; the others always use the "
              f"oracle (exact comparisons){perf}")
    hung = None
    for check in checks:
        if hung is not None:   # its engine threads may still spin: later checks prove nothing
            outcome = CheckResult(check.name, "skipped", 0.0, f"not run: check {hung!r} hung, "
                                  f"and its engine's threads may still be running")
        elif check.any_engine or not options.foreign:
            with capped_shrinking(SHRINK_CAP_S):
                outcome = run_check(check, options)
        else:
            outcome = CheckResult(check.name, "n/a", 0.0,
                                  f"checks Lockstep's own engine, not {options.engine}")
        result.checks.append(outcome)
        hung = hung or (outcome.name if outcome.hung else None)
        print(outcome.line())
        for line in outcome.report_lines(MESSAGE_LINES):
            print(f"        {line}")
        if outcome.status == "fail" and options.stop_at_first_failure:
            break
    passed = sum(c.status == "pass" for c in result.checks)
    ran = sum(c.status not in ("n/a", "skipped") for c in result.checks)
    print(f"gate: {'passed' if result.passed else 'FAILED'} ({passed}/{ran}) "
          f"in {result.seconds:.0f} s")
    if options.json_path:
        result.write_json(options.json_path)
    if options.junit_path:
        result.write_junit(options.junit_path)
    return 0 if result.passed else 1


def run_check(check: Check, options: GateOptions) -> CheckResult:
    start = time.perf_counter()
    try:
        with watchdog(check.name, stall_s=options.stall_s, deadline_s=check.deadline_s):
            detail = check.run(options)
        return CheckResult(check.name, "pass", time.perf_counter() - start, detail)
    except (Exception, CheckHang) as exc:  # every failure is this check's, not the gate's
        return CheckResult(check.name, "fail", time.perf_counter() - start, *classify(exc),
                           hung=isinstance(exc, CheckHang))


# in running order: on cuda the GPU's own checks first, the CPU's after, perf last
CHECKS: list[Check] = [
    Check("targeted-cuda", check_targeted_cuda, False, True, ("cuda",)),
    Check("property-cuda", check_property_cuda, False, False, ("cuda",)),
    Check("graphs-cuda", check_graphs_cuda, True, True, ("cuda",)),
    Check("targeted", check_targeted, False, True, any_engine=True),
    Check("generate", check_generate, True, True),
    Check("property", check_property, False, True, any_engine=True),
    Check("machine", check_machine, False, False, any_engine=True),
    Check("faults", check_faults, False, True),
    Check("property-model", check_property_model, True, False),
    Check("perf", check_perf, False, False, ("cuda",), deadline_s=300.0),
]
