"""The always-on mode: a guard cheap enough for production and benchmarks.

``with sync_guard.light():`` (level ``disallow`` by default) judges syncs in the calling thread
without the deep mode's per-op dispatch mode:

* on CUDA with the native hook (:mod:`sync_guard.native`, installed by default), every blocking
  CUDA call is judged at CUDA's API boundary, and staging buffers from
  :func:`sync_guard.staging_empty` are page-guarded (:mod:`sync_guard.pages`): what follows is
  the fallback where the hook is not installed;
* implicit syncs (``.item()``, ``nonzero``, blocking copies, ...) on CUDA come from torch's own
  C++ check, ``torch.cuda.set_sync_debug_mode("warn")``. That setting is process-wide, so its
  warnings are *routed per thread*: :func:`_route`, installed as ``warnings._showwarnmsg`` (the
  function the interpreter calls for every warning it shows; pytest's warning capture replaces
  what it calls, not it) with an ``always`` filter for torch's message, judges each warning by
  the issuing thread's scope and drops it for threads that opened none. Torch's mode is turned
  on by the first light scope and stays on (switching it per step cost 12 % of a sync-mode
  decode step on the H200); another thread's sync then costs one dropped warning;
* the syncs torch misses go through the same cheap wrappers as the deep mode (one context
  variable read each when unguarded): ``torch.cuda.synchronize``, ``Stream``/``Event``
  ``synchronize``, ``empty_cache``, host reads of simulated-device memory, and ``Tensor.copy_``
  for a non-blocking device-to-host copy into pageable or strided memory (a silent sync);
* staging-buffer reuse is checked at the point of reuse: the device layer calls
  :func:`buffer_reused` with the event of the buffer's last copy before rewriting it, and a
  copy not yet complete is a :class:`~sync_guard.BufferRace`.

Implicit syncs on the simulated device are not seen here (no dispatch mode): on CPU, use the
deep mode (``disallow()``).
"""
from __future__ import annotations

import re
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from . import _scope, hooks, native, pages

TORCH_SYNC_MESSAGE = "called a synchronizing CUDA operation"
_lock = threading.Lock()
_installed: list = []     # the original warnings._showwarnmsg, once routed
_scopes = threading.local()


def _route(msg: Any) -> None:
    if msg.category is UserWarning and TORCH_SYNC_MESSAGE in str(msg.message) \
            and not getattr(_scopes, "passthrough", False):
        if _scope.armed() and not native.installed():   # else judged at the CUDA call itself
            _scope.check_sync("a synchronizing CUDA operation (torch's sync check)")
        return  # judged for a guarded thread; another thread's legitimate sync is not ours
    _installed[0](msg)


def _silent_copy(original):
    """``copy_`` that judges the two silent syncs torch's check misses: a non-blocking D2H copy
    into pageable or strided host memory (it returns only after the copy)."""
    from .detector import _copy

    def copy_(self, src, non_blocking=False):
        if non_blocking and _scope.armed() and not hooks.in_device_work() and src.is_cuda \
                and self.device.type == "cpu":
            op = _copy((self, src, non_blocking), {})
            if op is not None:
                _scope.check_sync(op)
                with native.quiet():
                    return original(self, src, non_blocking)
        return original(self, src, non_blocking)
    copy_.__sync_guard_original__ = original
    return copy_


def _install() -> None:
    if _installed:
        return
    from .detector import _install_patches
    _install_patches()  # the explicit wrappers
    native.install_if_requested()
    torch.Tensor.copy_ = _silent_copy(torch.Tensor.copy_)
    _installed.append(warnings._showwarnmsg)
    warnings._showwarnmsg = _route
    if not native.installed():   # else the native hook sees every blocking CUDA call itself
        _set_torch_mode("warn")


_FILTER_MESSAGE = f".*{re.escape(TORCH_SYNC_MESSAGE)}.*"


def _ensure_filter() -> None:
    """Torch's warning must reach the router every time (``always``), at the front of the
    filters: pytest's warning capture restores the filter list after each test."""
    first = warnings.filters[0] if warnings.filters else None
    if first is None or first[0] != "always" or getattr(first[1], "pattern", None) != \
            _FILTER_MESSAGE:
        warnings.filterwarnings("always", message=_FILTER_MESSAGE, category=UserWarning)


def _set_torch_mode(mode: str) -> None:
    if not torch.cuda.is_available():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "prototype feature" notice
        torch.cuda.set_sync_debug_mode(mode)


class light:
    """The always-on guard for the calling thread (context manager)."""

    def __init__(self, level: str = "disallow") -> None:
        self.scope = _scope.Scope(level, deep=False)

    def __enter__(self) -> list:
        if not _installed:
            with _lock:
                _install()
        _ensure_filter()
        _scopes.depth = getattr(_scopes, "depth", 0) + 1
        records = self.scope.__enter__()
        pages.arm_races(+1)
        return records

    def __exit__(self, *exc) -> None:
        _scopes.depth -= 1
        pages.arm_races(-1)
        try:
            self.scope.__exit__(*exc)
        except BaseException as error:   # a deferred sync violation: the races are logged
            pages.raise_races(self.scope.level, type(error))
            raise
        pages.raise_races(self.scope.level, exc[0])


@contextmanager
def torch_warnings_shown() -> Iterator[None]:
    """Let torch's own sync warnings through unrouted in this thread (to measure torch's check
    itself, as the sync corpus does)."""
    _scopes.passthrough = True
    try:
        yield
    finally:
        _scopes.passthrough = False


def light_armed() -> bool:
    return getattr(_scopes, "depth", 0) > 0


def buffer_reused(event: Any, what: str) -> None:
    """The host is about to rewrite (or read) a staging buffer whose last copy is ``event``:
    inside ``light()``, a copy not yet complete is a :class:`~sync_guard.BufferRace`. The
    engine's staging buffers call it; so can one's own, at the point where they are reused::

        dev.copy_(staging, non_blocking=True); copied.record()
        ...
        sync_guard.buffer_reused(copied, "my staging buffer")   # the fence must be before this
        staging.fill_(next_batch)
    """
    if event is None or not light_armed() or hooks.in_device_work():
        return
    if not event.query():
        from .races import BufferRace
        race = BufferRace.at_reuse(
            f"host rewrite of {what} while its last copy (the event recorded after it) is not "
            f"complete: the input-prep fence is missing or waits on the wrong event")
        frame = _scope._current.get()
        if frame is not None and frame.level == "log":
            _scope.logger.warning("%s", race)
            return
        raise race
