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
import logging
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator

from . import _scope, pages

DRIVER, RUNTIME = 1, 2        # CUpti_CallbackDomain
API_ENTER, API_EXIT = 0, 1    # CUpti_ApiCallbackSite
MULTIPLE_SUBSCRIBERS = 39     # CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED
MAX_CALLBACK_ID = 4096        # _native.c's table size

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


# What each watched call means to the happens-before model of copies (``_native.c``): the copies
# that may read or write a guarded staging buffer, the events and waits that order them, and the
# host waits that end them. Every other blocking call is taken as a wait on the whole device.
K_NONE, K_COPY_RT, K_COPY_DRV, K_EVENT_RECORD, K_STREAM_WAIT, K_EVENT_SYNC, K_EVENT_QUERY, \
    K_STREAM_SYNC, K_STREAM_QUERY, K_DEVICE_SYNC, K_EVENT_DESTROY, K_OTHER_SYNC = range(12)
MODEL = {
    RUNTIME: {"cudaMemcpyAsync": K_COPY_RT, "cudaEventRecord": K_EVENT_RECORD,
              "cudaEventRecordWithFlags": K_EVENT_RECORD, "cudaStreamWaitEvent": K_STREAM_WAIT,
              "cudaEventSynchronize": K_EVENT_SYNC, "cudaEventQuery": K_EVENT_QUERY,
              "cudaStreamSynchronize": K_STREAM_SYNC, "cudaStreamQuery": K_STREAM_QUERY,
              "cudaDeviceSynchronize": K_DEVICE_SYNC, "cudaThreadSynchronize": K_DEVICE_SYNC,
              "cudaEventDestroy": K_EVENT_DESTROY},
    DRIVER: {"cuMemcpyAsync": K_COPY_DRV, "cuMemcpyHtoDAsync": K_COPY_DRV,
             "cuMemcpyDtoHAsync": K_COPY_DRV, "cuEventRecord": K_EVENT_RECORD,
             "cuEventRecordWithFlags": K_EVENT_RECORD, "cuStreamWaitEvent": K_STREAM_WAIT,
             "cuEventSynchronize": K_EVENT_SYNC, "cuEventQuery": K_EVENT_QUERY,
             "cuStreamSynchronize": K_STREAM_SYNC, "cuStreamQuery": K_STREAM_QUERY,
             "cuCtxSynchronize": K_DEVICE_SYNC, "cuEventDestroy": K_EVENT_DESTROY},
}

_JUDGE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int)
_judged: ContextVar[bool] = ContextVar("sync_guard_native_judged", default=False)


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


def callback_table(names: dict[int, Iterable[tuple[int, str]]]
                   ) -> tuple[list[tuple], list[str]]:
    """(domain, cbid, model kind, index of the sync's name or -1, kind offset or -1) for every
    callback worth enabling, from the names CUPTI reports per domain; and the sync names."""
    rows, sync_names = [], []
    for domain, pairs in names.items():
        for cbid, name in pairs:
            base = base_name(name)
            blocking = base in BLOCKING.get(domain, ())
            kind = MODEL.get(domain, {}).get(base, K_OTHER_SYNC if blocking else K_NONE)
            if kind == K_NONE and not blocking:
                continue
            sync = -1
            if blocking:
                sync = len(sync_names)
                sync_names.append(base)
            rows.append((domain, cbid, kind, sync, KIND_OFFSET.get(base, -1)))
    return rows, sync_names


class _Hook:
    def __init__(self) -> None:
        self.lib = load_cupti()
        self.native = pages.library()   # the callback itself is C (_native.c): no GIL, no Python
        self.judge = _JUDGE(self._on_sync)   # kept alive as long as the subscription
        self.handle = ctypes.c_void_p()
        result = self.lib.cuptiSubscribe(ctypes.byref(self.handle),
                                         ctypes.cast(self.native.sg_callback, ctypes.c_void_p),
                                         None)
        if result == MULTIPLE_SUBSCRIBERS:
            raise NativeHookUnavailable(
                "CUPTI allows one callback subscriber per process and another one holds it "
                "(torch.profiler / kineto, Nsight, or a second sync_guard): native syncs cannot "
                "be seen. Install sync_guard's native hook before profiling, or profile without "
                "it (SYNC_GUARD_NATIVE=0).")
        if result != 0:
            raise NativeHookUnavailable(f"cuptiSubscribe failed with CUPTI error {result}")
        rows, pages.sync_names[:] = callback_table(
            {domain: list(self._callback_names(domain)) for domain in (RUNTIME, DRIVER)})
        self.native.sg_set_judge(ctypes.cast(self.judge, ctypes.c_void_p))
        self.enabled = 0
        for domain, cbid, kind, sync, offset in rows:
            self.native.sg_set_callback(domain, cbid, kind, sync, offset)
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
        self.native.sg_set_judge(None)

    def _on_sync(self, index: int, _domain: int) -> None:
        """A blocking call in a thread with an open scope, not quiet, not under a plain allow
        (the C callback filtered the rest)."""
        try:
            if _scope.armed():
                _scope.check_sync(f"{pages.sync_names[index]} (native)", deferred=True)
        except Exception:   # never into the C code that called: a guard bug must not crash it
            _scope.note_internal_error()


_hook: _Hook | None = None
_lock = threading.Lock()


def install() -> int:
    """Subscribe to the blocking CUDA calls and the copies, events and waits of the page guard's
    model (idempotent); returns how many callbacks are watched. :class:`NativeHookUnavailable`
    (or :class:`~sync_guard._native_build.NativeBuildError`) when it cannot, with the reason."""
    global _hook
    with _lock:
        if _hook is None:
            _hook = _Hook()
            _refuse_cuda_profiling()
    pages.refresh()   # the scope being entered now is judged natively too
    return _hook.enabled


PROFILER_CONFLICT = (
    "torch.profiler cannot record CUDA activities while sync_guard's native hook holds CUPTI's "
    "one callback subscription (kineto would only log 'CUPTI initialization failed' and record "
    "no kernel). Profile without the hook: call sync_guard.native.uninstall() first (it cannot "
    "come back in this process: kineto keeps CUPTI), or run with SYNC_GUARD_NATIVE=0; or "
    "profile CPU activities only.")


def _refuse_cuda_profiling() -> None:
    """Starting torch's profiler with CUDA activities while the hook is installed fails with
    :data:`PROFILER_CONFLICT` instead of silently losing every CUDA activity."""
    from torch.autograd import profiler
    if getattr(profiler.profile._prepare_trace, "__sync_guard_original__", None):
        return
    for name in ("_prepare_trace", "_start_trace"):
        original = getattr(profiler.profile, name)

        def checked(self, *args, __original=original, **kwargs):
            from torch.profiler import ProfilerActivity
            if _hook is not None and ProfilerActivity.CUDA in getattr(
                    self, "kineto_activities", ()):
                raise NativeHookUnavailable(PROFILER_CONFLICT)
            return __original(self, *args, **kwargs)
        checked.__sync_guard_original__ = original
        setattr(profiler.profile, name, checked)


ENV_VAR = "SYNC_GUARD_NATIVE"
CHOICES = {"auto": "auto", "1": "on", "on": "on", "0": "off", "off": "off"}
_requested: list[str] = []
logger = logging.getLogger("sync_guard")


def requested_mode() -> str:
    """``SYNC_GUARD_NATIVE``: ``auto`` (the default: on where CUDA is, falling back with a
    warning), ``1``/``on`` (an error if it cannot be installed), ``0``/``off``."""
    raw = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if raw not in CHOICES:
        raise ValueError(f"{ENV_VAR}={raw!r}: expected one of {', '.join(CHOICES)}")
    return CHOICES[raw]


def install_if_requested() -> None:
    """At the first guarded scope, on a CUDA machine: install the hook unless
    ``SYNC_GUARD_NATIVE=0``. Under ``auto`` a hook that cannot be installed is a warning naming
    why (the Python-level checks stay); under ``1`` it is an error. Never a silent miss."""
    if _requested:
        return
    _requested.append(requested_mode())
    if _requested[0] == "off":
        return
    import torch
    if not torch.cuda.is_available():
        return
    from ._native_build import NativeBuildError
    try:
        install()
    except (NativeHookUnavailable, NativeBuildError) as exc:
        if _requested[0] == "on":
            raise
        logger.warning("sync_guard: the native sync hook is off (%s); syncs from native code "
                       "are not seen, the Python-level checks go on", exc)


def installed() -> bool:
    return _hook is not None


def uninstall() -> None:
    """Unsubscribe (the profiler may then take CUPTI); every guarded page is opened again."""
    global _hook
    with _lock:
        if _hook is not None:
            _hook.close()
            _hook = None
            pages.release_all()


@contextmanager
def quiet() -> Iterator[None]:
    """A sync that a Python-level check already judged: the native hook does not judge it again
    (a per-thread counter in C; nothing to do before the native library is loaded)."""
    state = pages.thread_state()
    if state is None:
        yield
        return
    state.quiet += 1
    try:
        yield
    finally:
        state.quiet -= 1


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
