"""The guard's one dispatch mode: the sync detector and the race checker share it.

A Python dispatch mode costs every op on its thread a Python call (about 15 µs on a CPU core),
so the two deep checkers do not push a mode each: one mode per thread is pushed while either
is armed there and runs the armed checkers' rules in that one call. Each checker is a module
with ``before_op(func, args, kwargs)`` (returns what ``after_op`` needs, or None) and
``after_op(state, func, args, out)``.
"""
from __future__ import annotations

import threading
from types import ModuleType

from torch.utils._python_dispatch import TorchDispatchMode

from . import hooks, native


class _GuardMode(TorchDispatchMode):
    sync_guard_mode = True  # lifted during device work (hooks.device_work)

    def __init__(self) -> None:
        super().__init__()
        self.checkers: dict[ModuleType, int] = {}  # armed checker -> how many scopes armed it
        self.order: tuple[ModuleType, ...] = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if hooks.in_device_work():  # the device's own work: no host sync, results stay inside
            return func(*args, **kwargs)
        states = [(c, c.before_op(func, args, kwargs)) for c in self.order]
        if native.judged():   # judged here already: not again from native code
            with native.quiet_judged():
                out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for checker, state in states:
            if state is not None:
                checker.after_op(state, func, args, out)
        return out


_local = threading.local()


def arm(checker: ModuleType) -> None:
    """``checker`` judges this thread's ops (pushing the mode if it is the first)."""
    mode = getattr(_local, "mode", None)
    if mode is None:
        mode = _local.mode = _GuardMode()
        mode.__enter__()
    mode.checkers[checker] = mode.checkers.get(checker, 0) + 1
    mode.order = tuple(mode.checkers)


def disarm(checker: ModuleType) -> None:
    mode = _local.mode
    mode.checkers[checker] -= 1
    if mode.checkers[checker] == 0:
        del mode.checkers[checker]
        mode.order = tuple(mode.checkers)
    if not mode.checkers:
        mode.__exit__(None, None, None)
        del _local.mode
