"""Page-protected staging buffers: a host access to a buffer with a pending copy, from anywhere.

A staging buffer from :func:`staging_empty` owns whole pages (a pinned allocation one page
larger than asked, used from its first page boundary), so protecting them touches nothing else.
While an asynchronous copy that reads them (host to device) is pending, the pages it touches
are read-only; while one that writes them (device to host) is pending, they allow no access.
The native hook (:mod:`sync_guard.native`) sees each copy at CUDA's API boundary and the host
waits that end it, so protection follows the happens-before model without anyone declaring a
reuse point. A host access then faults, whoever made it (a torch op, numpy, C code): the fault
handler (``_native.c``) records the address, the thread and that thread's Python stack (written
by CPython's own async-signal-safe dumper), opens the pages again and lets the access complete.
The guarded scope reports it as a :class:`~sync_guard.BufferRace` when it exits (the light mode
and ``race_check`` drain the records). The process never crashes because of the guard: a fault
outside every guarded range goes to the handler that was installed before (faulthandler's, or
the default), and the pages are opened again when the copy is known complete, when the buffer
is freed, when a guarded scope exits by an exception, and at exit.

Only the copies a guarded thread enqueues (inside ``light()`` or ``race_check()``) protect
pages: unguarded code pays nothing but the model's bookkeeping.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import re
import tempfile
import threading
import traceback
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

logger = logging.getLogger("sync_guard")


class FaultRecord(ctypes.Structure):
    """``fault_t`` in ``_native.c``."""

    _fields_ = [("ready", ctypes.c_int), ("range", ctypes.c_int), ("write", ctypes.c_int),
                ("tid", ctypes.c_int), ("addr", ctypes.c_size_t), ("serial", ctypes.c_uint64),
                ("scope", ctypes.c_uint64), ("copy_tid", ctypes.c_int),
                ("to_host", ctypes.c_int), ("dump_offset", ctypes.c_long),
                ("dump_length", ctypes.c_long)]


PAGES_ENV = "SYNC_GUARD_PAGES"   # 1 (default): every guarded copy protects; N: one in N; 0: none
_lock = threading.Lock()
_state: dict[str, Any] = {}       # "lib", "dump" (the traceback file), "error"
_ranges: dict[int, tuple[str, int, int]] = {}   # slot -> (name, start, end)
_thread = threading.local()       # .state: the C side's ThreadState; .races: depth
_names: dict[int, tuple[str, int, int]] = {}    # slot -> its last buffer (named after a free)
_reported: set[int] = set()       # copy serials already reported (one report per pending copy)
_lost = ctypes.c_uint64(0)


def library():
    """The native library, configured once (the fault handler's traceback file and CPython's
    dumper); raises :class:`~sync_guard._native_build.NativeBuildError` when it cannot be built."""
    lib = _state.get("lib")
    if lib is not None:
        return lib
    with _lock:
        if "lib" not in _state:
            from ._native_build import load
            lib = load()
            if lib.sg_fault_record_size() != ctypes.sizeof(FaultRecord):
                raise RuntimeError("sync_guard: _native.c and pages.FaultRecord disagree")
            dump = tempfile.TemporaryFile(prefix="sync_guard-faults-")
            api = ctypes.pythonapi
            dumper = getattr(api, "_Py_DumpTraceback", None)
            lib.sg_configure(ctypes.cast(dumper, ctypes.c_void_p) if dumper else None,
                             ctypes.cast(api.PyGILState_GetThisThreadState, ctypes.c_void_p),
                             dump.fileno())
            _state["dump"] = dump
            # read without a call: whether the fault handler wrote records since the last look
            _state["fault_write"] = ctypes.c_uint64.in_dll(lib, "fault_write")
            _state["dropped"] = ctypes.c_uint64.in_dll(lib, "dropped")
            _state["protect_every"] = ctypes.c_int.in_dll(lib, "protect_every")
            _state["protect_every"].value = protect_every_from_env()
            _state["lib"] = lib
            atexit.register(_at_exit)
    return _state["lib"]


def protect_every_from_env() -> int:
    """``SYNC_GUARD_PAGES``: ``1`` (the default) protects the pages of every guarded copy, ``N``
    one copy in N per thread (a race that recurs every step is still caught within N steps, at
    1/N of the cost: sampling as GWP-ASan does), ``0`` none (copies are still modelled)."""
    raw = os.environ.get(PAGES_ENV, "").strip() or "1"
    if not raw.isdigit():
        raise ValueError(f"{PAGES_ENV}={raw!r}: expected 0 (off), 1 (every copy) or N (one "
                         f"copy in N)")
    return int(raw)


def set_protect_every(every: int) -> int:
    """Protect one guarded copy in ``every`` (0: none); returns the previous setting."""
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"every={every!r}: must be an int >= 0")
    library()
    previous = _state["protect_every"].value
    _state["protect_every"].value = every
    return previous


def loaded() -> bool:
    return "lib" in _state


def available() -> bool:
    """Whether the page guard can be used here (the library builds); the reason is logged once."""
    try:
        library()
        return True
    except Exception as exc:  # noqa: BLE001 - no compiler, a read-only cache: fall back
        if "error" not in _state:
            _state["error"] = str(exc)
            logger.warning("sync_guard: page-protected staging buffers unavailable (%s); "
                           "staging buffers are plain pinned memory", exc)
        return False


def page_size() -> int:
    return os.sysconf("SC_PAGESIZE")


def staging_empty(shape: tuple[int, ...] | int, dtype: Any = None, name: str = "a staging buffer",
                  pin_memory: bool | None = None):
    """An uninitialised host tensor that owns whole pages, pinned where CUDA is available, and
    guarded: while a copy a guarded thread enqueued is pending, a host access to the pages it
    touches is a :class:`~sync_guard.BufferRace` (see the module). ``name`` names it in
    reports. The guard lasts as long as the returned tensor object (keep it, not only views)."""
    import torch
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = dtype or torch.float32
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    page = page_size()
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    rounded = max(page, -(-nbytes // page) * page)
    raw = torch.empty(rounded + page, dtype=torch.uint8, pin_memory=pin_memory)
    skip = -raw.data_ptr() % page
    owned = raw[skip:skip + rounded]
    tensor = owned[:nbytes].view(dtype).view(shape)
    if available():
        start = owned.data_ptr()
        slot = library().sg_add_range(start, start + rounded)
        if slot < 0:
            logger.warning("sync_guard: no room to guard %s (%d guarded buffers)", name,
                           len(_ranges))
        else:
            _ranges[slot] = _names[slot] = (name, start, start + rounded)
            weakref.finalize(tensor, _remove, slot)
    return tensor


def _remove(slot: int) -> None:
    lib = _state.get("lib")
    if lib is not None and _ranges.pop(slot, None) is not None:
        lib.sg_remove_range(slot)


def guarded(tensor: Any) -> bool:
    """Whether ``tensor``'s first byte lies in a guarded staging buffer."""
    ptr = tensor.data_ptr()
    return any(start <= ptr < end for _, start, end in _ranges.values())


class ThreadState(ctypes.Structure):
    """The C side's per-thread scope state (thread_state_t in _native.c), written in place."""

    _fields_ = [("armed", ctypes.c_int32), ("races_armed", ctypes.c_int32),
                ("allow_fast", ctypes.c_int32), ("quiet", ctypes.c_int32),
                ("scope_serial", ctypes.c_uint64), ("allowed_count", ctypes.c_int32),
                ("allowed_names", ctypes.c_int32 * 32)]


def thread_state() -> ThreadState | None:
    """This thread's C state block (None before the library is loaded). Its address is asked
    for once per thread; after that a scope change is a few field writes, not a call."""
    state = _thread.__dict__.get("state")
    if state is None and "lib" in _state:
        lib = _state["lib"]
        if lib.sg_thread_state_size() != ctypes.sizeof(ThreadState):
            raise RuntimeError("sync_guard: _native.c and pages.ThreadState disagree")
        state = _thread.state = ThreadState.from_address(lib.sg_thread_state())
    return state


def arm_races(delta: int) -> None:
    """A race-checking scope (``light`` or ``race_check``) opened (+1) or closed (-1) here."""
    races = _thread.races = _thread.__dict__.get("races", 0) + delta
    state = thread_state()
    if state is not None:
        state.races_armed = races


def races_armed() -> bool:
    return _thread.__dict__.get("races", 0) > 0


_scope_module: list = []   # sync_guard._scope, imported once (refresh runs at every scope change)
sync_names: list[str] = []  # the C side's sync-name table (its indices), set by the native hook


def _scope_mod():
    """sync_guard._scope (which imports this module), without the import machinery per call."""
    if not _scope_module:
        from . import _scope
        _scope_module.append(_scope)
    return _scope_module[0]


def refresh() -> None:
    """Tell the native side what this thread's scopes are now: whether a sync is judged, whether
    a copy protects its pages, the outermost scope's serial (named in race reports), and whether
    the innermost scope is a plain allow (recorded in C, no call into Python)."""
    state = thread_state()
    if state is None:
        return
    scope = _scope_mod()
    frame = scope._current.get()
    state.races_armed = _thread.__dict__.get("races", 0)
    if frame is None:
        state.armed = scope.default_level() != "allow"
        state.scope_serial = state.allow_fast = 0
    else:
        state.armed = 1
        state.scope_serial = frame.serial
        state.allow_fast = frame.level == "allow" and not frame.first_only


def record_allowed(frame) -> None:
    """At a plain allow scope's exit: the blocking calls the C side recorded there without
    calling Python, as allowed reports (the frames are the scope's exit: where the allowance
    ends). When more than the ring holds were recorded, the last name stands for the rest."""
    state = _thread.__dict__.get("state")
    if state is None or frame is None or not state.allowed_count:
        return
    n = state.allowed_count
    state.allowed_count = 0
    if not sync_names:
        return
    ring = len(state.allowed_names)
    names = [sync_names[i] for i in state.allowed_names[:min(n, ring)]]
    names += [names[-1]] * (n - len(names))
    scope = _scope_mod()
    thread, frames = scope.thread_name(), scope.user_frames()
    for name in names:
        scope._record(frame, scope.SyncReport(f"{name} (native)", thread, frames,
                                              allowed_by=frame.reason))


_TRACE_LINE = re.compile(r'File "(.*)", line (\d+) in (.*)')


def _frames(record: FaultRecord) -> list[traceback.FrameSummary]:
    is_user_file = _scope_mod().is_user_file
    if record.dump_offset < 0:
        return []
    text = os.pread(_state["dump"].fileno(), record.dump_length, record.dump_offset).decode(
        "utf-8", "replace")
    frames = [traceback.FrameSummary(m[1], int(m[2]), m[3].strip(), lookup_line=False)
              for m in _TRACE_LINE.finditer(text) if is_user_file(m[1])]
    frames.reverse()   # the dump is most recent call first
    return frames


def _thread_name(tid: int) -> str:
    for thread in threading.enumerate():
        if thread.native_id == tid:
            return thread.name
    return f"a thread that has ended or is not Python's (native id {tid})"


def take_races() -> list:
    """The races the fault handler recorded since the last call, as BufferRace errors (one per
    pending copy)."""
    lib = _state.get("lib")
    if lib is None:
        return []
    written = _state["fault_write"].value
    if written == _state.get("fault_seen", 0):
        return []
    records = (FaultRecord * 32)()
    races = []
    while True:
        n = lib.sg_take_faults(records, 32, ctypes.byref(_lost))
        for record in records[:n]:
            if record.serial and record.serial in _reported:
                continue
            _reported.add(record.serial)
            races.append(_race(record))
        if n < 32:
            break
    _state["fault_seen"] = written
    if _lost.value:
        logger.warning("sync_guard: %d page faults were not recorded (the record buffer was "
                       "full)", _lost.value)
        _lost.value = 0
    return races


def _race(record: FaultRecord):
    from .races import BufferRace
    name, start, _ = _ranges.get(record.range) or _names.get(record.range) or (
        "a staging buffer", record.addr, 0)
    if record.range not in _ranges:
        name += " (freed since)"
    access = "write to" if record.write else "access to"
    copy = ("device-to-host copy into it" if record.to_host else
            "host-to-device copy from it")
    pending = (f"while the {copy} (copy #{record.serial}, enqueued by thread "
               f"{_thread_name(record.copy_tid)!r} in guarded scope #{record.scope}) was "
               f"pending: the host never waited on it" if record.serial else
               "while a copy was pending")
    message = (f"host {access} {name} (byte {record.addr - start}) by thread "
               f"{_thread_name(record.tid)!r} {pending} (seen by the page guard)")
    return BufferRace.from_access(message, _frames(record))


def raise_races(level: str, exc_type: Any) -> list:
    """At a race-checking scope's exit: the recorded races are raised (the first; the others
    logged), or logged and returned under ``level="log"`` or while another exception propagates
    (then, at the outermost race-checking scope, every guarded page is opened again)."""
    if exc_type is not None and not races_armed():
        release_all()
    _warn_if_dropped()
    races = take_races()
    if not races:
        return races
    if level == "log" or exc_type is not None:
        for race in races:
            logger.warning("%s", race)
        return races
    for race in races[1:]:
        logger.warning("%s", race)
    raise races[0]


def _at_exit() -> None:
    release_all()
    _state["lib"].sg_configure(None, None, -1)   # no more traceback dumps into the file
    _state["dump"].close()


def _warn_if_dropped() -> None:
    dropped = _state["dropped"].value if "dropped" in _state else 0
    if dropped and not _state.get("dropped_warned"):
        _state["dropped_warned"] = True
        logger.warning("sync_guard: the native model's tables were full %d times (copies on "
                       "more than 160 streams, or over 4M live events): races on what it could "
                       "not track may be missed", dropped)


@contextmanager
def checking_races(level: str) -> Iterator[list]:
    """The page guard alone, as a scope: copies enqueued inside protect their pages, and the
    races are raised (or logged) at its exit."""
    arm_races(+1)
    try:
        yield []
    except BaseException as exc:
        arm_races(-1)
        raise_races(level, type(exc))
        raise
    arm_races(-1)
    raise_races(level, None)


def release_all() -> None:
    """Open every guarded page and forget the pending copies (exit, a scope left by an error)."""
    lib = _state.get("lib")
    if lib is not None:
        lib.sg_release_all()


def counts() -> tuple[int, int]:
    """(pending copies, ranges with protected pages) in the native model."""
    lib = library()
    pending, protected, lost = ctypes.c_int(), ctypes.c_int(), ctypes.c_uint64()
    lib.sg_counts(ctypes.byref(pending), ctypes.byref(protected), ctypes.byref(lost))
    return pending.value, protected.value


def ensure_handler() -> None:
    """Our fault handler first in line (again, if faulthandler or someone replaced it)."""
    if library().sg_ensure_handler() < 0:
        raise RuntimeError("sync_guard: the page guard's SIGSEGV handler could not be installed")
