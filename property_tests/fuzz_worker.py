"""One ``lockstep fuzz`` worker process: turns of hypothesis runs (the differential, the
stateful machine when there is one, and on Lockstep's engine the random-fault property and the
machine with faults), each failure reported with its replay file; a worker whose CUDA context
is lost ends so that the session starts a fresh process in its place."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import random
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import Phase, seed, settings

from . import profiles
from .fuzz_config import MACHINE_MODULE, TURN_S, FuzzConfig, open_database


class _TimeUp(KeyboardInterrupt):
    """Ends a hypothesis run at the deadline (a KeyboardInterrupt: hypothesis saves nothing)."""


class _Worker:
    """One worker process: turns of hypothesis runs, reported through ``queue``."""

    def __init__(self, index: int, config: FuzzConfig, seed: str, queue: Any, out: Path) -> None:
        self.run_prefix = ""   # "<incarnation>." in a worker restarted after a lost context
        from . import properties
        self.index, self.config, self.seed, self.queue, self.out = index, config, seed, queue, out
        self.props = properties
        self.examples, self.states = Counter[str](), Counter[str]()
        self.seconds: dict[str, float] = {}
        self.failed: set[str] = set()   # targets that failed: their later runs skip the reuse phase
        self.failure: Any = None        # this run's latest PropertyFailure (its smallest workload)
        self.failed_at: int | None = None   # the example at which this run first failed
        self.turn_end, self.last_sent, self.current = math.inf, 0.0, ("", 0.0)
        self.profile = settings.get_profile(config.profile)
        self.database = open_database(config.db)
        check, self.real_event = properties.check_workload, properties.event

        def observed_check(*args: Any, **kwargs: Any) -> Any:
            self._example("differential")
            try:
                return check(*args, **kwargs)
            except properties.PropertyFailure as exc:
                self.failed_at, self.failure = self.failed_at or self.examples["differential"], exc
                raise

        properties.check_workload, properties.event = observed_check, self._event
        from .adapters import engine_modes, resolve_engine
        self.factory = resolve_engine(config.engine)
        self.reference, self.modes = engine_modes(self.factory, config.device)
        self.default = config.engine == "lockstep" and config.device == "cpu"
        self.machine = self._load_machine()
        self.fault_machine: type | None = None
        if self.default:   # Lockstep's own engine: its step phases take injected faults too
            from . import fault_machine, faults
            check_fault = faults.check_fault

            def observed_fault(*args: Any, **kwargs: Any) -> Any:
                self._example("faults")
                return check_fault(*args, **kwargs)
            faults.check_fault = observed_fault
            # and the stateful machine with injected faults, a target of its own
            self.fault_machine = fault_machine.FaultMachine
            self._count_programs(self.fault_machine, "fault_machine")
            fault_machine.event = self._event

    def _event(self, value: str, payload: Any = "") -> None:
        self.states[str(value)] += 1
        self.real_event(value, payload)

    def _load_machine(self) -> type | None:
        if importlib.util.find_spec(MACHINE_MODULE) is None:
            return None
        try:
            module = importlib.import_module(MACHINE_MODULE)
            case = getattr(module, "TestEngineMachine", None)
            name = case.__qualname__.removesuffix(".TestCase") if case else ""
            cls = getattr(module, name, None)
            if not self.default and cls is not None:   # the same machine on this engine
                cls = module.machine_for(self.factory, (self.reference, *self.modes))
                case = cls.TestCase
        except Exception as exc:  # a machine being written must not stop the differential
            self.queue.put(("note", self.index, f"stateful machine not run: {exc!r}"))
            return None
        if case is None or not isinstance(cls, type):
            return None
        self._count_programs(cls, "machine")
        if hasattr(module, "event"):
            setattr(module, "event", self._event)
        return cls

    def _count_programs(self, cls: type, target: str) -> None:
        """Count each program of machine ``cls`` (not of its subclasses) as a ``target``
        example."""
        init = cls.__init__  # type: ignore[misc]

        def observed_init(machine: Any, *args: Any, **kwargs: Any) -> None:
            if type(machine) is cls:
                self._example(target)
            init(machine, *args, **kwargs)

        cls.__init__ = observed_init  # type: ignore[misc]

    def _example(self, target: str) -> None:
        if time.time() >= self.turn_end:
            raise _TimeUp
        self.examples[target] += 1
        if time.monotonic() - self.last_sent >= 0.5:
            self.send("progress")

    def counts(self) -> tuple[dict, dict, dict]:
        """Examples and worker-seconds by target, and examples by hard state, so far."""
        (target, began), seconds = self.current, dict(self.seconds)
        if target:
            seconds[target] = seconds.get(target, 0.0) + time.time() - began
        return dict(self.examples), seconds, dict(self.states)

    def send(self, kind: str) -> None:
        """Report the counts so far (``progress`` or ``done``)."""
        self.last_sent = time.monotonic()
        self.queue.put((kind, self.index, self.counts()))

    def run(self) -> None:
        """Turns of hypothesis runs (differential, machine, ...) for ``--minutes`` from now."""
        targets = ["differential"] + (["machine"] if self.machine else []) + \
            (["faults", "fault_machine"] if self.default else [])
        seconds = self.config.minutes * 60
        turn_s = min(TURN_S, max(10.0, seconds / 4)) if len(targets) > 1 else math.inf
        deadline, run = time.time() + seconds, 0
        while time.time() < deadline:
            target, began = targets[run % len(targets)], time.time()
            self.turn_end, self.current = min(deadline, began + turn_s), (target, began)
            self._run(target, run)
            self.seconds[target] = self.seconds.get(target, 0.0) + time.time() - began
            self.current, run = ("", 0.0), run + 1

    def _run(self, target: str, run: int) -> None:
        run_dir = self.out / f"run-{self.run_prefix}{run}"   # written only on a failure
        os.environ[self.props.REPLAY_DIR_ENV] = str(run_dir)
        skip = Phase.reuse if target in self.failed else None
        phases = [p for p in self.profile.phases if p is not skip]
        machine = {"machine": self.machine, "fault_machine": self.fault_machine}.get(target)
        parent = self.profile if machine is None else machine.TestCase.settings
        # applied after seed(), which would otherwise turn the shared database off
        chosen = settings(parent, database=self.database, derandomize=False, phases=phases,
                          max_examples=self.profile.max_examples)
        run_seed = random.Random(f"{self.seed}:{run}").getrandbits(64)
        self.failure, self.failed_at, first = None, None, self.examples[target]
        error: BaseException | None = None
        try:
            if machine is not None:
                from hypothesis.stateful import run_state_machine_as_test
                run_state_machine_as_test(seed(run_seed)(machine), settings=chosen)
            elif target == "faults":
                from .faults import random_faults_property
                chosen(seed(run_seed)(random_faults_property()))()
            elif self.default:
                model = None if self.config.model == "default" else self.config.model
                chosen(seed(run_seed)(self.props.async_matches_sync_property(model)))()
            else:
                model = self.config.model if self.config.engine == "lockstep" else None
                prop = self.props.async_matches_sync_property(
                    None if model == "default" else model, self.modes, factory=self.factory,
                    reference=self.reference)
                chosen(seed(run_seed)(prop))()
        except _TimeUp:
            error = self.failure   # a failure found, but the deadline ended its shrinking
        except Exception as exc:
            error = exc
        replays = sorted(run_dir.glob("*.json"))
        if error is None and not replays:
            return
        if not replays and self.examples[target] == first:
            raise error or RuntimeError("no example ran")   # the harness (e.g. the database) broke
        self.failed.add(target)
        if isinstance(error, self.props.PropertyFailure):
            message = str(error)
        else:
            message = f"{type(error).__name__}: {error}" if error else \
                "a failure (see its replay file); the turn ended while hypothesis shrank it"
        self.queue.put(("failure", self.index, {
            "target": target, "run": run, "message": message.splitlines()[0],
            "example": self.failed_at and self.failed_at - first,
            "examples": self.examples[target] - first, "log": str(self.out / "log.txt"),
            "replay": str(replays[0]) if replays else None}))
        if self.config.device == "cuda" and _cuda_context_lost():
            if error is not None:   # the sticky error itself, for the log (hypothesis' replay of
                print("".join(traceback.format_exception(error)))   # it fails differently)
            raise _DeviceLost(message.splitlines()[0])


class _DeviceLost(Exception):
    """A CUDA error is sticky (a device-side assert, an illegal address): every later CUDA call
    in this process fails, so the worker must go on in a fresh process."""


def _cuda_context_lost() -> bool:
    import torch
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).cpu()
        return False
    except Exception:
        return True


def worker_main(index: int, config: FuzzConfig, seed: str, queue: Any,
                 incarnation: int = 0) -> None:
    """The body of a worker process (spawned); its output goes to ``OUT/worker-i/log.txt``.
    A worker restarted after a lost CUDA context is a new ``incarnation``: its runs' folders are
    ``run-<incarnation>.<run>``."""
    import torch
    torch.set_num_threads(1)
    profiles.load(config.profile)
    out = Path(config.out) / f"worker-{index}"
    out.mkdir(parents=True, exist_ok=True)
    worker, ending = None, "done"
    with open(out / "log.txt", "a", buffering=1) as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            worker = _Worker(index, config, seed, queue, out)
            worker.run_prefix = f"{incarnation}." if incarnation else ""
            worker.run()
        except KeyboardInterrupt:
            pass
        except _DeviceLost as exc:
            print(f"the CUDA context is lost after: {exc}")
            ending = "restart"
        except BaseException:
            print(traceback.format_exc())
            last = traceback.format_exc().strip().splitlines()[-1]
            queue.put(("error", index, f"{last} (see {out / 'log.txt'})"))
        finally:
            queue.put((ending, index, worker and worker.counts()))
