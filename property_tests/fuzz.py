"""``lockstep fuzz``: a long fuzzing session on K worker processes sharing one example database.

Each worker (a spawned process) re-runs the differential property, the hypothesis test of
:func:`~lockstep.property_tests.properties.async_matches_sync_property`, under the ``fuzz``
profile with seeds of its own for ``--minutes`` (counted from when it is ready). A run ends at
``max_examples``, on a failure or at the deadline; after a failure the worker starts a fresh run
without the reuse phase, so that it looks for new failures instead of re-shrinking the one it
knows. When ``machine.py`` exposes ``TestEngineMachine``, workers alternate turns between the
differential and that machine; on Lockstep's own engine, also the random-fault property
("faults") and the stateful machine with faults ("fault_machine",
:mod:`~lockstep.property_tests.fault_machine`). All workers share one example database, a
folder or Redis (``redis://HOST:PORT``, to share across machines); since they run the very
tests the suite runs, ``pytest`` with that database replays what a session found. Workers count
examples and hard states by wrapping ``check_workload`` and ``event`` in their own process, and
report through a queue. Exit status: 0 when nothing failed, 1 (with the replay files) when
something did, 2 for a bad option.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import multiprocessing
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from queue import Empty
from typing import Any, TextIO

from .fuzz_config import (GRACE_S, MACHINE_MODULE, FuzzArgumentError, FuzzConfig,
                          open_database, validate)
from .fuzz_worker import worker_main

__all__ = ["FuzzArgumentError", "FuzzConfig", "open_database", "run_fuzz", "summary", "validate"]

CLEAR = "\r\x1b[K"  # back to the start of the progress line, and clear it


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
    f = _count(tallies, "examples", "faults")
    fm = _count(tallies, "examples", "fault_machine")
    top = _count(tallies, "states").most_common(3)
    return (f"[{elapsed:6.1f}s] {n:.0f} examples{f' + {m:.0f} machine' if m else ''}"
            f"{f' + {f:.0f} faults' if f else ''}{f' + {fm:.0f} fault machine' if fm else ''} "
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
    for target in ("differential", "machine", "faults", "fault_machine"):
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
        return ctx.Process(target=worker_main, args=(i, cfg, f"{session}:{i}:{incarnation}",
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
