"""Host syncs made from native code, seen at CUDA's own API boundary through CUPTI callbacks.

A sync made from C++ or CUDA code (an attention planner, a custom op, a communication library,
a ctypes call) never passes torch's Python API, so the wrappers and the dispatch mode cannot see
it. CUPTI's callback API (``libcupti``, which torch's CUDA build ships for its profiler) calls back
on entry to chosen runtime and driver functions, in the calling thread, whoever called them.
:func:`install` subscribes to the functions that block the calling host thread and judges each
call by that thread's scope like any other sync (``disallow``, ``log``, ``allow(reason)``),
naming the CUDA function and the user's Python frames.

Why ``libcupti`` through ctypes rather than NVIDIA's ``cupti-python``: torch already loads the
``libcupti`` its CUDA build was made with, so no package must match the driver, and only three
entry points are needed (``cuptiSubscribe``, ``cuptiEnableCallback``, ``cuptiGetCallbackName``).
Callback ids are resolved by name from the installed CUPTI (``cuptiGetCallbackName``), not from
a copied header, so a CUPTI whose numbering differs cannot be misread.

The calls that block the host, from NVIDIA's CUDA Runtime and Driver API references ("API
synchronization behavior", and each function's notes) and the CUDA C++ Programming Guide
("Explicit synchronization", "Implicit synchronization"):

* explicit: device / context, stream and event synchronization;
* synchronous copies: ``cudaMemcpy`` and its 2D/3D, array and symbol variants and the driver's
  ``cuMemcpy*`` without ``Async`` return only when the copy is done, except device-to-device
  copies (no host synchronization; judged by the ``kind`` argument where the call has one);
  peer copies and synchronous memsets on device memory are asynchronous to the host and are
  not subscribed;
* implicit: freeing device or pinned memory and registering or unregistering host memory wait
  for the device (``cudaFree``, ``cudaFreeHost``, ``cudaFreeArray``, ``cudaHostRegister``,
  ``cudaHostUnregister`` and their driver forms).

A runtime call that reaches a blocking driver call is reported once (the runtime's name), and a
sync that a Python-level check of sync_guard already judged (``torch.cuda.synchronize``, ...) is
not judged again (:func:`quiet`). A callback cannot raise into the C code that called it: in a
``disallow`` scope the violation is recorded and raised when the scope exits.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from . import _scope

DRIVER, RUNTIME = 1, 2        # CUpti_CallbackDomain
API_ENTER, API_EXIT = 0, 1    # CUpti_ApiCallbackSite
MULTIPLE_SUBSCRIBERS = 39     # CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED
MAX_CALLBACK_ID = 2048

BLOCKING = {
    RUNTIME: frozenset({
        "cudaDeviceSynchronize", "cudaThreadSynchronize", "cudaStreamSynchronize",
        "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D", "cudaMemcpy3D",
        "cudaMemcpyToArray", "cudaMemcpyFromArray", "cudaMemcpy2DToArray",
        "cudaMemcpy2DFromArray", "cudaMemcpyArrayToArray", "cudaMemcpy2DArrayToArray",
        "cudaMemcpyToSymbol", "cudaMemcpyFromSymbol", "cudaFree", "cudaFreeHost",
        "cudaFreeArray", "cudaFreeMipmappedArray", "cudaHostRegister", "cudaHostUnregister"}),
    DRIVER: frozenset({
        "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize", "cuMemcpy",
        "cuMemcpyHtoD", "cuMemcpyDtoH", "cuMemcpyHtoA", "cuMemcpyAtoH", "cuMemcpyAtoD",
        "cuMemcpyDtoA", "cuMemcpyAtoA", "cuMemcpy2D", "cuMemcpy2DUnaligned", "cuMemcpy3D",
        "cuMemFree", "cuMemFreeHost", "cuArrayDestroy", "cuMemHostRegister",
        "cuMemHostUnregister"}),
}
# the byte offset of ``enum cudaMemcpyKind kind`` in the call's parameter struct (64-bit)
KIND_OFFSET = {"cudaMemcpy": 24, "cudaMemcpy2D": 48}
DEVICE_TO_DEVICE = 3
_SUFFIX = re.compile(r"(_v\d+)?(_ptds|_ptsz)?(_v\d+)?$")


class CallbackData(ctypes.Structure):
    """``CUpti_CallbackData``: what a runtime or driver API callback receives."""

    _fields_ = [("callbackSite", ctypes.c_int), ("functionName", ctypes.c_char_p),
                ("functionParams", ctypes.c_void_p), ("functionReturnValue", ctypes.c_void_p),
                ("symbolName", ctypes.c_char_p), ("context", ctypes.c_void_p),
                ("contextUid", ctypes.c_uint32), ("correlationData", ctypes.c_void_p),
                ("correlationId", ctypes.c_uint32)]


_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32,
                             ctypes.c_void_p)
_quiet: ContextVar[bool] = ContextVar("sync_guard_native_quiet", default=False)
_judged: ContextVar[bool] = ContextVar("sync_guard_native_judged", default=False)
_local = threading.local()   # .runtime: correlation ids of this thread's runtime calls in progress


class NativeHookUnavailable(RuntimeError):
    """CUPTI could not be loaded or subscribed to; the message says why and what to do."""


def base_name(name: str) -> str:
    """``cudaMemcpy_ptds_v7000`` -> ``cudaMemcpy``; ``cuMemcpyDtoH_v2`` -> ``cuMemcpyDtoH``."""
    return _SUFFIX.sub("", name)


def library_candidates() -> list[str]:
    """Where libcupti may be: the one torch loaded (by soname), then beside torch's CUDA."""
    names = ["libcupti.so.13", "libcupti.so.12", "libcupti.so"]
    try:
        import torch
        root = os.path.dirname(os.path.dirname(torch.__file__))
        names += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcupti.so*")))
        names += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                               "libcupti.so*")))
    except ImportError:
        pass
    names += sorted(glob.glob("/usr/local/cuda*/extras/CUPTI/lib64/libcupti.so*"))
    return names


def load_cupti() -> ctypes.CDLL:
    tried = []
    for name in library_candidates():
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            tried.append(f"{name}: {exc}")
    raise NativeHookUnavailable("no libcupti could be loaded (torch's CUDA build ships one): "
                                + "; ".join(tried[:4]))


class _Hook:
    def __init__(self) -> None:
        self.lib = load_cupti()
        self.callback = _CALLBACK(self._on_call)   # kept alive as long as the subscription
        self.handle = ctypes.c_void_p()
        self.names: dict[tuple[int, int], str] = {}
        result = self.lib.cuptiSubscribe(ctypes.byref(self.handle), self.callback, None)
        if result == MULTIPLE_SUBSCRIBERS:
            raise NativeHookUnavailable(
                "CUPTI allows one callback subscriber per process and another one holds it "
                "(torch.profiler / kineto, Nsight, or a second sync_guard): native syncs cannot "
                "be seen. Install sync_guard's native hook before profiling, or profile without "
                "it (sync_guard.native.uninstall()).")
        if result != 0:
            raise NativeHookUnavailable(f"cuptiSubscribe failed with CUPTI error {result}")
        self.enabled = 0
        for domain, wanted in BLOCKING.items():
            for cbid, name in self._callback_names(domain):
                if base_name(name) in wanted:
                    self.names[(domain, cbid)] = base_name(name)
                    if self.lib.cuptiEnableCallback(1, self.handle, domain, cbid) == 0:
                        self.enabled += 1

    def _callback_names(self, domain: int) -> Iterator[tuple[int, str]]:
        name = ctypes.c_char_p()
        get = self.lib.cuptiGetCallbackName
        for cbid in range(1, MAX_CALLBACK_ID):
            if get(domain, cbid, ctypes.byref(name)) == 0 and name.value:
                yield cbid, name.value.decode()

    def close(self) -> None:
        self.lib.cuptiUnsubscribe(self.handle)

    def _on_call(self, _userdata, domain, cbid, data) -> None:
        try:
            call = ctypes.cast(data, ctypes.POINTER(CallbackData)).contents
            running = getattr(_local, "runtime", None)
            if running is None:
                running = _local.runtime = set()
            if domain == RUNTIME:   # a set, not a count: an exit seen without its entry (the
                if call.callbackSite == API_ENTER:   # hook installed mid-call) is harmless
                    running.add(call.correlationId)
                else:
                    running.discard(call.correlationId)
            if call.callbackSite != API_ENTER or (domain == DRIVER and running) or _quiet.get():
                return
            name = self.names.get((domain, cbid)) or base_name(call.functionName.decode())
            if name in KIND_OFFSET and call.functionParams:
                kind = ctypes.c_int.from_address(call.functionParams + KIND_OFFSET[name]).value
                if kind == DEVICE_TO_DEVICE:
                    return
            if _scope.armed():
                _scope.check_sync(f"{name} (native)", deferred=True)
        except Exception:   # never into the C code that called: a guard bug must not crash it
            _scope.note_internal_error()


_hook: _Hook | None = None
_lock = threading.Lock()


def install() -> int:
    """Subscribe to the blocking CUDA calls (idempotent); returns how many are watched.
    :class:`NativeHookUnavailable` when CUPTI cannot be used, with the reason."""
    global _hook
    with _lock:
        if _hook is None:
            _hook = _Hook()
        return _hook.enabled


ENV_VAR = "SYNC_GUARD_NATIVE"
_requested: list[bool] = []


def install_if_requested() -> None:
    """With ``SYNC_GUARD_NATIVE=1`` and a CUDA device, install at the first guarded scope (once);
    a CUPTI that cannot be used is then an error naming why, never a silent miss."""
    if _requested:
        return
    _requested.append(os.environ.get(ENV_VAR, "0") not in ("", "0"))
    if _requested[0]:
        import torch
        if torch.cuda.is_available():
            install()


def installed() -> bool:
    return _hook is not None


def uninstall() -> None:
    global _hook
    with _lock:
        if _hook is not None:
            _hook.close()
            _hook = None


@contextmanager
def quiet() -> Iterator[None]:
    """A sync that a Python-level check already judged: the native hook does not judge it again."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def mark_judged() -> None:
    """The deep mode judged the op about to run as a sync (see :func:`quiet_judged`)."""
    if _hook is not None:
        _judged.set(True)


def judged() -> bool:
    """One context-variable read: whether the op about to run was judged a sync."""
    return _judged.get()


@contextmanager
def quiet_judged() -> Iterator[None]:
    """Around an op the deep mode judged a sync (:func:`judged`): the flag is spent, and the
    native hook does not judge the op again."""
    _judged.set(False)
    with quiet():
        yield
