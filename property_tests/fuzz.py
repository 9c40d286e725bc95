"""``lockstep fuzz``: a long fuzzing session on K worker processes sharing one example database.

Each worker (a spawned process) re-runs the differential property, the hypothesis test of
:func:`~lockstep.property_tests.properties.async_matches_sync_property`, under the ``fuzz``
profile with seeds of its own for ``--minutes`` (counted from when it is ready). A run ends at
``max_examples``, on a failure or at the deadline; after a failure the worker starts a fresh run
without the reuse phase, so that it looks for new failures instead of re-shrinking the one it
knows. When ``machine.py`` exposes ``TestEngineMachine``, workers alternate turns between the
differential and that machine. All workers share one example database, a folder or Redis
(``redis://HOST:PORT``, to share across machines); since they run the very tests the suite runs,
``pytest`` with that database replays what a session found. Workers count examples and hard
states by wrapping ``check_workload`` and ``event`` in their own process, and report through a
queue. Exit status: 0 when nothing failed, 1 (with the replay files) when something did, 2 for
a bad option.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import multiprocessing
import os
import random
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any, TextIO
from urllib.parse import urlsplit

from hypothesis import Phase, seed, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

from . import profiles

MACHINE_MODULE = "lockstep.property_tests.machine"
TURN_S = 120.0    # with the machine, workers alternate turns of at most this long
GRACE_S = 180.0   # for start-up and the last example: a worker still running is stopped then
CLEAR = "\r\x1b[K"  # back to the start of the progress line, and clear it


class FuzzArgumentError(ValueError):
    """A bad ``lockstep fuzz`` option; the message starts with the option's name."""


@dataclass(frozen=True)
class FuzzConfig:
    """One session: ``minutes`` of ``workers`` processes sharing the example database ``db``."""

    minutes: float
    workers: int
    db: str
    out: Path
    profile: str = "fuzz"
    model: str = "oracle"   # or "default", the embedded default model (Lockstep's engine)
    engine: str = "lockstep"   # --engine NAME|module:factory
    device: str = "cpu"        # cpu (the simulated device where the engine has one) or cuda


def open_database(spec: str) -> ExampleDatabase:
    """The example database ``spec`` names: a folder, or ``redis://HOST:PORT`` (``rediss://``)."""
    if "://" not in spec:
        return DirectoryBasedExampleDatabase(spec)
    scheme = spec.split("://", 1)[0].lower()
    if scheme not in ("redis", "rediss"):
        raise FuzzArgumentError(f"--db: unsupported scheme {scheme}:// in {spec!r}; give a "
                                "folder or redis://HOST:PORT")
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
        client = redis.Redis.from_url(spec, socket_connect_timeout=5, socket_timeout=30)
    except ImportError:
        raise FuzzArgumentError("--db redis://...: needs the redis client: "
                                "pip install 'lockstep[redis]'") from None
    except ValueError as exc:
        raise FuzzArgumentError(f"--db: bad Redis URL {spec!r}: {exc}") from None
    return RedisExampleDatabase(client)


def validate(config: FuzzConfig) -> None:
    """Check every option before any work: create ``--out`` (and a folder ``--db``), ping a Redis
    ``--db``; raise :class:`FuzzArgumentError`."""
    for ok, message in [
            (math.isfinite(config.minutes) and config.minutes > 0, f"--minutes must be a number "
             f"> 0, got {config.minutes}"),
            (config.workers >= 1, f"--workers must be at least 1, got {config.workers}"),
            (config.profile in profiles.PROFILES, f"--profile must be one of {profiles.PROFILES}"),
            (config.model in ("oracle", "default"), "--model must be oracle or default"),
            (config.device in ("cpu", "cuda"), f"--device must be cpu or cuda, got "
             f"{config.device!r}")]:
        if not ok:
            raise FuzzArgumentError(message)
    from .adapters import EngineSpecError, engine_modes, resolve_engine
    try:
        engine_modes(resolve_engine(config.engine), config.device)
    except EngineSpecError as exc:
        raise FuzzArgumentError(str(exc)) from None
    if config.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise FuzzArgumentError("--device cuda but no CUDA device is available")
    database = open_database(config.db)
    folders = [("--out", Path(config.out))]
    if isinstance(database, DirectoryBasedExampleDatabase):
        folders.append(("--db", Path(config.db)))
    else:
        import redis
        try:
            database.redis.ping()  # type: ignore[attr-defined]
        except redis.RedisError as exc:
            where = urlsplit(config.db)
            raise FuzzArgumentError(f"--db: cannot reach Redis at {where.hostname}:"
                                    f"{where.port or 6379}: {exc}") from None
    for option, path in folders:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FuzzArgumentError(f"{option}: cannot create the folder {str(path)!r}: "
                                    f"{exc.strerror or exc}") from None
        if not os.access(path, os.W_OK):
            raise FuzzArgumentError(f"{option}: the folder {str(path)!r} is not writable")


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
        init = cls.__init__  # type: ignore[misc]

        def observed_init(machine: Any, *args: Any, **kwargs: Any) -> None:
            self._example("machine")
            init(machine, *args, **kwargs)

        cls.__init__ = observed_init  # type: ignore[misc]
        if hasattr(module, "event"):
            setattr(module, "event", self._event)
        self.machine_settings = case.settings
        return cls

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
        targets = ["differential"] + (["machine"] if self.machine else [])
        seconds = self.config.minutes * 60
        turn_s = min(TURN_S, max(10.0, seconds / 4)) if self.machine else math.inf
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
        parent = self.machine_settings if target == "machine" else self.profile
        # applied after seed(), which would otherwise turn the shared database off
        chosen = settings(parent, database=self.database, derandomize=False, phases=phases,
                          max_examples=self.profile.max_examples)
        run_seed = random.Random(f"{self.seed}:{run}").getrandbits(64)
        self.failure, self.failed_at, first = None, None, self.examples[target]
        error: BaseException | None = None
        try:
            if target == "machine" and self.machine:
                from hypothesis.stateful import run_state_machine_as_test
                run_state_machine_as_test(seed(run_seed)(self.machine), settings=chosen)
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


def _worker_main(index: int, config: FuzzConfig, seed: str, queue: Any,
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


@dataclass
class _Tally:
    examples: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    states: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    done: bool = False
    restart: bool = False   # its process lost its CUDA context: start a fresh one
    earlier: tuple = ({}, {}, {})   # the counts of this worker's earlier processes

    def take(self, message: tuple, stream: TextIO, tty: bool) -> None:
        """Apply one message of this worker's; print failures and notes as they come."""
        kind, index, body = message
        if kind in ("progress", "done", "restart") and body is not None:
            self.examples, self.seconds, self.states = (
                dict(Counter(old) + Counter(new)) for old, new in zip(self.earlier, body))
        if kind == "restart":
            self.earlier, self.restart = (self.examples, self.seconds, self.states), True
            print(f"{CLEAR if tty else ''}worker {index}: its CUDA context is lost (a sticky "
                  f"device error); it goes on in a fresh process", file=stream, flush=True)
        self.done = self.done or kind == "done"
        self.errors += [body] if kind == "error" else []
        if kind == "failure":
            self.failures.append(body)
            where = (f"first failed at example {body['example']} of the run"
                     if body["example"] else f"after {body['examples']} examples")
            body = (f"FAIL {body['target']} run {body['run']}, {where}: {body['message']}\n"
                    f"  replay: {body['replay'] or body['log']}")
        if kind in ("failure", "note"):
            print(f"{CLEAR if tty else ''}worker {index}: {body}", file=stream, flush=True)


def _count(tallies: list[_Tally], what: str, target: str = "") -> Any:
    if what == "states":
        return sum((Counter(t.states) for t in tallies), Counter())
    return sum(getattr(t, what).get(target, 0) for t in tallies)


def _progress(tallies: list[_Tally], elapsed: float) -> str:
    n, m = _count(tallies, "examples", "differential"), _count(tallies, "examples", "machine")
    top = _count(tallies, "states").most_common(3)
    return (f"[{elapsed:6.1f}s] {n:.0f} examples{f' + {m:.0f} machine' if m else ''} "
            f"({n / elapsed:.2f}/s), {sum(len(t.failures) for t in tallies)} failures | "
            + (", ".join(f"{s} {c}" for s, c in top) or "-"))


def summary(tallies: list[_Tally], elapsed: float, modes: int) -> str:
    """The end-of-session table: examples and failures per worker and in all, throughput (over
    the worker time each target had), and how many examples reached each hard state."""
    rows = [("worker", "differential", "machine", "failures")] + [
        (str(i), str(t.examples.get("differential", 0)), str(t.examples.get("machine", 0)),
         str(len(t.failures))) for i, t in enumerate(tallies)]
    d, m, f = (sum(int(r[c]) for r in rows[1:]) for c in (1, 2, 3))
    rows.append(("total", str(d), str(m), str(f)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    for target in ("differential", "machine"):
        n, busy = _count(tallies, "examples", target), _count(tallies, "seconds", target)
        rate = n / max(busy, 1e-9) * len(tallies)   # as if every worker ran it all the time
        if n or target == "differential":
            lines.append(f"{target} examples per second: {rate:.2f} ({n:.0f} examples in {busy:.1f}"
                         f" worker-seconds, {len(tallies)} worker(s); {elapsed:.1f} s wall)")
        if target == "differential":
            lines.append(f"sync+async example pairs per second: {rate * modes:.2f} "
                         f"({modes} async modes)")
    states = _count(tallies, "states")
    width = max((len(s) for s in states), default=0)
    lines.append("hard states (examples reaching each):")
    lines += [f"  {s.ljust(width)}  {c}" for s, c in states.most_common()] or ["  (none)"]
    return "\n".join(lines)


def run_fuzz(config: FuzzConfig, stream: TextIO = sys.stdout) -> int:
    """Run one session (see the module docstring); returns the exit status."""
    try:
        validate(config)
    except FuzzArgumentError as exc:
        print(f"lockstep fuzz: {exc}", file=sys.stderr)
        return 2
    from .adapters import describe, engine_modes, resolve_engine
    factory = resolve_engine(config.engine)
    modes = engine_modes(factory, config.device)[1]
    start, session = time.time(), f"{random.SystemRandom().getrandbits(64):x}"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    def spawn(i: int, cfg: FuzzConfig, incarnation: int = 0):
        return ctx.Process(target=_worker_main, args=(i, cfg, f"{session}:{i}:{incarnation}",
                                                      queue, incarnation), daemon=True,
                           name=f"lockstep-fuzz-{i}")
    procs = [spawn(i, config) for i in range(config.workers)]
    restarts = [0] * config.workers
    tallies, tty = [_Tally() for _ in procs], stream.isatty()
    machine = "on" if importlib.util.find_spec(MACHINE_MODULE) else "absent"
    print(f"lockstep fuzz: {config.minutes:g} min, {config.workers} worker(s), db {config.db}, "
          f"out {config.out}, profile {config.profile}, "
          f"{'model ' + config.model if config.engine == 'lockstep' else 'engine ' + config.engine}"
          f" on {config.device}, stateful machine "
          f"{machine}", file=stream, flush=True)
    for line in describe(factory, config.device):
        print(f"  {line}", file=stream, flush=True)
    for proc in procs:
        proc.start()
    last, interrupted, end = start, False, start + config.minutes * 60 + GRACE_S

    def take(timeout: float) -> None:
        message = queue.get(timeout=timeout)
        tallies[message[1]].take(message, stream, tty)

    try:
        while not all(t.done for t in tallies):
            with contextlib.suppress(Empty):
                take(0.25)
            now = time.time()
            for i, tally in enumerate(tallies):
                if tally.restart:
                    tally.restart = False
                    procs[i].join(timeout=5)
                    left = start + config.minutes * 60 - now
                    if left < 10:
                        tally.done = True
                        continue
                    restarts[i] += 1
                    procs[i] = spawn(i, dataclasses.replace(config, minutes=left / 60),
                                     restarts[i])
                    procs[i].start()
            for tally, proc in zip(tallies, procs):
                if not tally.done and not proc.is_alive():
                    with contextlib.suppress(Empty):  # its last messages may still be in the pipe
                        while not tally.done and not tally.restart:
                            take(1.0)
                    if not tally.done and not tally.restart:
                        tally.errors.append(f"exited with status {proc.exitcode}")
                        tally.done = True
                elif not tally.done and now > end:
                    proc.terminate()
                    tally.errors.append(f"still running {GRACE_S:.0f} s after the session's end")
                    tally.done = True
            if now - last >= (1.0 if tty else 10.0):
                last, line = now, _progress(tallies, now - start)
                print(f"\r{line}\x1b[K" if tty else line, end="" if tty else "\n", file=stream,
                      flush=True)
    except KeyboardInterrupt:   # ^C reaches the workers too: they stop and report
        interrupted, stop = True, time.time() + 5
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        while not all(t.done for t in tallies) and time.time() < stop:
            with contextlib.suppress(Empty):
                take(0.25)
        signal.signal(signal.SIGINT, previous)
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
    elapsed = time.time() - start
    print(f"{chr(10) if tty else ''}lockstep fuzz: {'interrupted' if interrupted else 'done'} "
          f"after {elapsed:.1f} s\n{summary(tallies, elapsed, len(modes))}", file=stream)
    lines = [f"ERROR worker {i}: {error}" for i, t in enumerate(tallies) for error in t.errors]
    failures = [f["replay"] or f"(no replay file; see {f['log']})"
                for t in tallies for f in t.failures]
    if failures:
        lines += [f"FAILED: {len(failures)} failing run(s); replay files:"]
        lines += [f"  {f}" for f in failures]
    print("\n".join(lines), file=stream, flush=True)
    return 1 if failures or any(t.errors for t in tallies) else (130 if interrupted else 0)
