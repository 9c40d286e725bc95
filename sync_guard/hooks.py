"""What device layers other than CUDA (the engine's ``sim`` device) tell the guard.

A layer whose "device" is host memory calls these so the same rules apply to it as to CUDA:
``register_device_memory`` marks a tensor as device memory, ``device_work`` brackets work that
runs *as* the device (on the host thread in sim's eager and lazy policies, so it is not a host
sync), and the ``on_*`` calls report copies, events and host waits to the race checker and the
sync detector. Every call costs one context-variable read when the guard is off.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

import torch
from torch.utils import _python_dispatch

_in_device_work: ContextVar[bool] = ContextVar("sync_guard_device_work", default=False)
_device_memory: dict[int, weakref.ref] = {}  # storage data_ptr -> the allocation


@contextmanager
def device_work() -> Iterator[None]:
    """Work that runs *as* the device. Both checkers exempt it, so when only the guard's own
    dispatch modes are pushed, they are lifted for its duration: on ``sim`` every op of the
    model runs here, and a Python call per op would cost more than the work itself."""
    token = _in_device_work.set(True)
    try:
        stack = _python_dispatch._get_current_dispatch_mode_stack()
        if stack and all(getattr(m, "sync_guard_mode", False) for m in stack):
            with _python_dispatch._disable_current_modes():
                yield
        else:
            yield
    finally:
        _in_device_work.reset(token)


def in_device_work() -> bool:
    return _in_device_work.get()


def register_device_memory(tensor: torch.Tensor) -> None:
    """Mark ``tensor``'s storage as device memory (a host read of it is then a sync).

    A zero-size storage holds nothing to wait for, and every one of them has ``data_ptr`` 0:
    keying it would make every empty host tensor count as device memory.
    """
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return
    ptr = storage.data_ptr()
    held = _device_memory.get(ptr)
    if held is not None and held() is not None:
        return  # already known (a view of it, or its base): the first live owner keeps the key
    # No weakref callback: an exception raised inside one (a KeyboardInterrupt from a signal
    # handler) is printed and dropped. Dead entries are pruned when the map has doubled.
    _device_memory[ptr] = weakref.ref(tensor)
    if len(_device_memory) > _prune_at[0]:
        for key in [k for k, ref in _device_memory.items() if ref() is None]:
            del _device_memory[key]
        _prune_at[0] = max(1024, 2 * len(_device_memory))


_prune_at = [1024]


def has_sim_memory() -> bool:
    return bool(_device_memory)


def is_device_memory(tensor: torch.Tensor) -> bool:
    if tensor.is_cuda:
        return True
    if not _device_memory or tensor.device.type != "cpu":
        return False
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return False
    ref = _device_memory.get(storage.data_ptr())
    return ref is not None and ref() is not None


def on_host_wait(op: str, stream: Any = None, event: Any = None) -> None:
    """The host blocks on ``event``, on ``stream``, or (both None) on the whole device."""
    if _in_device_work.get():
        return
    from . import _scope, races
    _scope.check_sync(op)
    races.host_waited(stream=stream, event=event)


def on_event_query(event: Any, done: bool) -> None:
    if done and not _in_device_work.get():
        from . import races
        races.host_waited(event=event)


def on_copy(dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
    from . import races
    races.copy_enqueued(dst, src, stream)


def on_record(event: Any, stream: Any) -> None:
    from . import races
    races.event_recorded(event, stream)


def on_wait(stream: Any, event: Any) -> None:
    from . import races
    races.stream_waited(stream, event)
