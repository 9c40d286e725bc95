"""A watchdog per gate check: a hang becomes a failure that names the check and the step.

A thread watches the harness's :data:`~lockstep.property_tests.engine_under_test.heartbeat`
(every engine step the harness takes, in any thread, beats it). When no step begins or ends for
``stall_s`` seconds, or the check runs past ``deadline_s``, the thread records where the main
thread is stuck and interrupts it with a signal whose handler raises :class:`CheckHang`.
``CheckHang`` is a ``BaseException``: hypothesis does not catch it, so a hung example is not
shrunk (each shrink step would hang again), and the gate reports it at once.

The engine's own worker threads may stay blocked after a hang; they are daemon threads, and the
gate moves on to the next check.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lockstep.property_tests.engine_under_test import heartbeat

SIGNAL = signal.SIGUSR1
POLL_S = 0.2


class CheckHang(BaseException):
    """A gate check stopped making progress (the message names the check and the step)."""


def _stuck_at(thread_id: int, depth: int = 3) -> str:
    """The innermost Lockstep frames of a thread, innermost first: where it waits."""
    frame, found = sys._current_frames().get(thread_id), []
    while frame is not None and len(found) < depth:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if any(f"/{d}/" in path for d in ("lockstep", "engine", "property_tests", "ci")):
            found.append(f"{'/'.join(path.split('/')[-2:])}:{frame.f_lineno} "
                         f"in {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(found) or "outside Lockstep's code"


@contextmanager
def watchdog(check: str, stall_s: float = 20.0, deadline_s: float = 900.0) -> Iterator[None]:
    """Run the body under the watchdog (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("watchdog() must run in the main thread (it interrupts it by signal)")
    main, stop, fired = threading.main_thread().ident, threading.Event(), []
    start = time.monotonic()
    heartbeat.reset()

    def watch() -> None:
        while not stop.wait(POLL_S):
            now = time.monotonic()
            if now - heartbeat.time > stall_s:
                why = f"no engine step began or ended for {stall_s:.0f} s"
            elif now - start > deadline_s:
                why = f"still running after its {deadline_s:.0f} s deadline"
            else:
                continue
            fired.append(f"watchdog: check {check!r} hung: {why}; last seen "
                         f"{heartbeat.describe()}; main thread at {_stuck_at(main)}")
            signal.pthread_kill(main, SIGNAL)
            return

    def interrupt(signum, frame) -> None:
        if fired:
            raise CheckHang(fired[0])

    previous = signal.signal(SIGNAL, interrupt)
    thread = threading.Thread(target=watch, name=f"watchdog-{check}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        signal.signal(SIGNAL, previous)
