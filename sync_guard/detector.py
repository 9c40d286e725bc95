"""The sync detector: which operations make the host wait for the device.

Three layers, all judged per calling context by :func:`_scope.check_sync`:
* implicit syncs, seen as aten ops by the guard's dispatch mode (:mod:`sync_guard._mode`),
  pushed only on threads with an active scope (a mode is thread-local, so unguarded threads pay
  nothing);
* explicit syncs: ``torch.cuda.synchronize``, ``Stream/Event.synchronize``, ``empty_cache``,
  wrapped once; a wrapper costs one context-variable read when no scope is active; the same
  wrappers catch printing a device tensor, which hides from dispatch modes;
* on the ``sim`` device, host reads of registered device memory (``tolist``/``numpy``/``cpu``,
  which never reach the dispatcher for CPU tensors) and the sim layer's own waits, through
  :mod:`sync_guard.hooks`.
Torch's own sync debug mode is not used: it is process-global, so arming it
in one thread would judge every other thread's legitimate waits too.
"""
from __future__ import annotations

import functools
import sys
import threading

import torch
from . import _mode, _scope, hooks, native

aten = torch.ops.aten
_BOOL_INDEX = (torch.bool, torch.uint8)


def _on_device(x) -> bool:
    return isinstance(x, torch.Tensor) and hooks.is_device_memory(x)


def _on_host(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cpu" and not hooks.is_device_memory(x)


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in _BOOL_INDEX and _on_device(i)
               for i in indices or ())


def _bool_index_put(args, kwargs) -> str | None:
    """``x[mask] = v`` syncs (it needs ``nonzero``) unless ``v`` is a host scalar, which torch
    turns into ``masked_fill_``."""
    if not _bool_index(args[1]):
        return None
    values = args[2]
    if len(args[1]) == 1 and values.numel() == 1 and _on_host(values):
        return None
    return "boolean-mask index assignment of a device value"


def _copy(args, kwargs) -> str | None:
    dst, src = args[0], args[1]
    non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
    if non_blocking and dst.numel() == 0:
        return None  # nothing moves (and an empty host tensor never reports pinned)
    if _on_device(src) and _on_host(dst):
        if not non_blocking or not src.is_cuda:
            return "blocking device-to-host copy (copy_)"
        if not dst.is_pinned():
            return "non-blocking device-to-host copy into pageable memory (silent sync)"
        if not dst.is_contiguous():
            return "non-blocking device-to-host copy into strided host memory (silent sync)"
    elif _on_host(src) and _on_device(dst) and not non_blocking:
        return "blocking host-to-device copy (copy_)"
    return None


def _to_copy(args, kwargs) -> str | None:
    src, device = args[0], kwargs.get("device")
    if device is None or kwargs.get("non_blocking", False):
        return None  # a non-blocking .to("cpu") lands in pinned memory: asynchronous
    device = torch.device(device)
    if _on_device(src) and device.type == "cpu":
        return "blocking device-to-host copy (.cpu() / .to('cpu') / .tolist() / print)"
    if _on_host(src) and device.type == "cuda":
        return "blocking host-to-device copy (.to('cuda') / torch.tensor(..., device='cuda'))"
    return None


def _any_device(name: str):
    return lambda args, kwargs: name if any(_on_device(a) for a in args) else None


_RULES = {
    aten._local_scalar_dense: _any_device("Tensor.item (item / bool / int / float)"),
    aten.nonzero: _any_device("nonzero (output size depends on data)"),
    aten.masked_select: _any_device("masked_select (output size depends on data)"),
    aten._unique2: _any_device("unique"),
    aten._unique: _any_device("unique"),
    aten.unique_dim: _any_device("unique(dim=...)"),
    aten.unique_consecutive: _any_device("unique_consecutive"),
    aten.equal: _any_device("torch.equal"),
    aten.is_nonzero: _any_device("Tensor.__bool__"),
    aten.bincount: _any_device("bincount (output size depends on data)"),
    aten.index: lambda a, k: ("boolean-mask indexing" if _bool_index(a[1]) else None),
    aten.index_put_: _bool_index_put,
    aten.index_put: _bool_index_put,
    aten.repeat_interleave: lambda a, k: (
        "repeat_interleave without output_size" if k.get("output_size") is None
        and any(_on_device(x) for x in a) else None),
    aten.copy_: _copy,
    aten._to_copy: _to_copy,
    # torch.tensor(host data, device="cuda") and x[[0, 2]] copy the data below the Python
    # dispatch key with a blocking copy; the mode sees only the lifted CUDA result
    aten.lift_fresh: lambda a, k: ("torch.tensor(host data, device='cuda') (blocking "
                                   "host-to-device copy)" if a[0].is_cuda else None),
}


def classify(func, args, kwargs) -> str | None:
    """The sync an aten op call makes on the host, or None."""
    rule = _RULES.get(func.overloadpacket)
    return None if rule is None else rule(args, kwargs)


def before_op(func, args, kwargs) -> bool:
    """Judge the op's sync (the shared dispatch mode calls this); True: look at its result."""
    op = classify(func, args, kwargs)
    if op is not None:
        _scope.check_sync(op)
        native.mark_judged()
    return True if hooks.has_sim_memory() and not func._schema.is_mutable else None


def after_op(state, func, args, out) -> None:
    _propagate_sim_memory(args, out)


def _propagate_sim_memory(args, out) -> None:
    """What an op computes from sim device memory is sim device memory too (as on a GPU)."""
    if not any(isinstance(a, torch.Tensor) and not a.is_cuda and hooks.is_device_memory(a)
               for a in args):
        return
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            hooks.register_device_memory(t)


def arm_thread() -> None:
    """Judge this thread's ops (the shared dispatch mode) while a scope is open on it."""
    _install_patches()
    native.install_if_requested()
    _mode.arm(sys.modules[__name__])


def disarm_thread() -> None:
    _mode.disarm(sys.modules[__name__])


def _explicit(name: str, original, one_native_call: bool = False):
    """``one_native_call``: the call is one blocking CUDA call the native hook judges itself
    (where it is installed), so the wrapper leaves it alone: judged once, at the cheaper place."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if one_native_call and native.installed():
            return original(*args, **kwargs)
        if _scope.armed() and not hooks.in_device_work():
            _scope.check_sync(name)
            with native.quiet():
                return original(*args, **kwargs)
        return original(*args, **kwargs)
    wrapper.__sync_guard_original__ = original
    return wrapper


def _host_read(name: str, original):
    """Sim device memory is a CPU tensor: these reads never reach the dispatcher."""
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        if (_scope.armed() and not self.is_cuda and hooks.is_device_memory(self)
                and not hooks.in_device_work()):
            _scope.check_sync(f"Tensor.{name} of sim device memory")
        return original(self, *args, **kwargs)
    wrapper.__sync_guard_original__ = original
    return wrapper


def _printing(original):
    """Printing copies a device tensor to the host; torch's printer hides from dispatch modes."""
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        if (_scope.armed() and isinstance(self, torch.Tensor) and hooks.is_device_memory(self)
                and not hooks.in_device_work()):
            _scope.check_sync("printing a device tensor (repr / str / format)")
        return original(self, *args, **kwargs)
    wrapper.__sync_guard_original__ = original
    return wrapper


_patched = False
_patch_lock = threading.Lock()


def _install_patches() -> None:
    global _patched
    if _patched:
        return
    with _patch_lock:
        if _patched:
            return
        torch.cuda.synchronize = _explicit("torch.cuda.synchronize", torch.cuda.synchronize,
                                           one_native_call=True)
        torch.cuda.empty_cache = _explicit("torch.cuda.empty_cache", torch.cuda.empty_cache)
        for cls, method in ((torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize")):
            setattr(cls, method, _explicit(f"{cls.__name__}.{method}", getattr(cls, method),
                                           one_native_call=True))
        for method in ("tolist", "numpy", "cpu"):
            setattr(torch.Tensor, method, _host_read(method, getattr(torch.Tensor, method)))
        for method in ("__repr__", "__format__"):
            setattr(torch.Tensor, method, _printing(getattr(torch.Tensor, method)))
        _patched = True
