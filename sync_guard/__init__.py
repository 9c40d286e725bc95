"""sync_guard: find host<->device syncs and host-buffer races in torch code.

* ``disallow()`` / ``log()`` / ``allow(reason, first_only=False)``: scopes (context managers and
  decorators) for the calling thread or asyncio task; a host sync inside ``disallow`` raises
  :class:`SyncViolation`, inside ``log`` it is logged and recorded; ``allow`` names a sync that
  is expected. The level outside any scope comes from the ``SYNC_GUARD`` environment variable.
* ``light()``: the always-on mode (torch's own C++ check routed per thread, cheap wrappers,
  staging-buffer reuse checked at the reuse: ``buffer_reused(event, what)``, which the engine's
  staging buffers call and one's own can); ``sampled(step, every=16)``: the deep mode on one
  step in N.
* ``race_check()``: a host write to a buffer that a pending device copy still reads, or a host
  read of a copy's destination before it is known complete, raises :class:`BufferRace`.
* The ``nosync`` pytest plugin (``sync_guard.pytest_plugin``) arms both around a test's body
  (or the function it names).

Every report names the operation, the thread and the user's frames.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from ._scope import GuardError, Scope, SyncReport, SyncViolation, default_level
    from ._light import buffer_reused, light
    from ._sampled import sampled
    from .pages import staging_empty
    from .races import BufferRace, race_check

__all__ = ["disallow", "log", "allow", "light", "sampled", "buffer_reused", "race_check", "armed",
           "as_device", "staging_empty",
           "Scope", "SyncViolation", "BufferRace", "GuardError", "SyncReport", "default_level",
           "LEVELS"]

# Torch is imported on first use of the guard, not by ``import sync_guard``: the pytest plugin
# lives in this package and must cost nothing in a test run that never guards anything.
_LAZY = {"Scope": "_scope", "SyncViolation": "_scope", "GuardError": "_scope",
         "SyncReport": "_scope", "default_level": "_scope", "BufferRace": "races",
         "race_check": "races", "light": "_light", "buffer_reused": "_light", "sampled": "_sampled",
         "staging_empty": "pages"}


# torch-free: allow, log, disallow (aliases off, warn, error)
from .levels import LEVELS  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value   # found once: later reads are plain module attributes
        return value
    raise AttributeError(f"module 'sync_guard' has no attribute {name!r}")


def _scope_class() -> type:
    scope = globals().get("Scope")
    return scope if scope is not None else __getattr__("Scope")


def disallow() -> Scope:
    """Any host sync inside raises :class:`SyncViolation`."""
    return _scope_class()("disallow")


def log() -> Scope:
    """Host syncs inside are logged (logger ``sync_guard``) and recorded, not raised."""
    return _scope_class()("log")


def allow(reason: str, first_only: bool = False) -> Scope:
    """Syncs inside are expected (``reason`` says why); with ``first_only``, only the first is."""
    return _scope_class()("allow", reason, first_only)


def as_device(tensor: Any) -> Any:
    """Treat a CPU tensor as (simulated) device memory; returns it.

    On a machine without CUDA nothing syncs, so the guard has nothing to see. Marked tensors,
    and everything computed from them inside a guarded scope, behave like GPU memory: a host
    read (``.item()``, ``.tolist()``, printing, a data-dependent shape) is reported as the sync
    it would be on a GPU::

        x = sync_guard.as_device(torch.randn(4, 8))
        with sync_guard.disallow():
            step(x)            # x.argmax(-1).max().item() -> SyncViolation: Tensor.item
    """
    import torch
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"as_device(tensor) needs a torch.Tensor, got {type(tensor).__name__} "
                        f"{tensor!r:.80}")
    from . import hooks
    hooks.register_device_memory(tensor)
    return tensor


@contextmanager
def armed(level: str = "disallow", widen_ms: float | None = None) -> Iterator[list[SyncReport]]:
    """The sync detector at ``level`` plus the race checker: what ``nosync`` tests run under."""
    from ._scope import Scope
    from .races import race_check
    with Scope(level) as reports, race_check(widen_ms=widen_ms, level=level):
        yield reports


def _arm_process_default() -> None:
    """With ``SYNC_GUARD`` set to ``log`` or ``disallow``, the explicit-sync wrappers must be in
    place before the first ``torch.cuda.synchronize()``, scope or not (this imports torch; a
    bad value is reported at the guard's first use instead)."""
    import os
    from .levels import ENV_VAR, normalize_level
    raw = os.environ.get(ENV_VAR, "").strip()
    try:
        armed_by_default = bool(raw) and normalize_level(raw, ENV_VAR) != "allow"
    except ValueError:
        return
    if armed_by_default:
        from .detector import _install_patches
        _install_patches()


_arm_process_default()
