"""The deep mode on one step in N: its per-op cost paid on a sample of the steps only."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from ._scope import Scope
from .races import race_check

DEFAULT_EVERY = 16


def sampled(fn: Callable, every: int = DEFAULT_EVERY, level: str = "disallow") -> Callable:
    """``fn`` (a step function) under the deep mode on calls k and k + 1 of every ``every``.

    On those two calls the dispatch-level detector judges every op, and one race checker spans
    both, so a copy enqueued in the first call and raced with in the second is seen; the other
    calls run plain. ``every=2`` guards every call (in pairs); for a race checker over a whole
    run use ``race_check()`` with ``disallow()`` instead.
    """
    if not isinstance(every, int) or every < 2:
        raise ValueError(f"every={every!r}: must be an int >= 2 (1 is disallow() + race_check())")
    state = {"calls": 0, "races": None}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        phase = state["calls"] % every
        state["calls"] += 1
        if phase > 1:
            return fn(*args, **kwargs)
        if phase == 0:
            state["races"] = race_check(level=level)
            state["races"].__enter__()
        races, failed = state["races"], True
        try:
            with Scope(level):
                result = fn(*args, **kwargs)
            failed = False
            return result
        finally:
            if races is not None and (phase == 1 or failed):  # a failure ends the pair too
                state["races"] = None
                races.__exit__(*(sys.exc_info() if failed else (None, None, None)))
    return wrapper
