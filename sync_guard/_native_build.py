"""Builds and loads ``_native.c`` (the CUPTI callback and the page guard) on first use.

The library is compiled with the system's C compiler into a cache directory keyed by the
source's hash and the machine, so a changed source or another architecture builds afresh and
concurrent processes never load a half-written file (it is renamed into place). No CUDA or
Python headers are needed.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("_native.c")
CACHE_ENV = "SYNC_GUARD_CACHE"
_lock = threading.Lock()
_library: list[ctypes.CDLL] = []


class NativeBuildError(RuntimeError):
    """The native half could not be built or loaded; the message says why and what to do."""


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sync_guard")
    return Path(root)


def compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise NativeBuildError("no C compiler found (cc, gcc or clang; or set CC): sync_guard's "
                           "native hook and page guard are built from C on first use")


def library_path() -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]
    return cache_dir() / f"sync_guard_native-{key}.so"


def build() -> Path:
    """The compiled library's path, compiling it if the cache lacks it."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [compiler(), "-O2", "-shared", "-fPIC", "-pthread", "-std=gnu11", "-o", partial,
               str(SOURCE)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise NativeBuildError(f"building sync_guard's native half failed "
                                   f"({' '.join(command)}):\n{done.stderr[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load() -> ctypes.CDLL:
    """The library (built and loaded once per process), with its functions' signatures."""
    if _library:
        return _library[0]
    with _lock:
        if not _library:
            lib = ctypes.CDLL(str(build()))
            c = ctypes
            lib.sg_configure.argtypes = [c.c_void_p, c.c_void_p, c.c_int]
            lib.sg_configure.restype = None
            lib.sg_set_judge.argtypes = [c.c_void_p]
            lib.sg_set_judge.restype = None
            lib.sg_set_callback.argtypes = [c.c_int] * 5
            lib.sg_thread_state.restype = c.c_void_p
            lib.sg_thread_state_size.restype = c.c_size_t
            lib.sg_add_range.argtypes = [c.c_size_t, c.c_size_t]
            lib.sg_remove_range.argtypes = [c.c_int]
            lib.sg_remove_range.restype = None
            lib.sg_release_all.restype = None
            lib.sg_take_faults.argtypes = [c.c_void_p, c.c_int, c.POINTER(c.c_uint64)]
            lib.sg_counts.argtypes = [c.POINTER(c.c_int), c.POINTER(c.c_int),
                                      c.POINTER(c.c_uint64)]
            lib.sg_counts.restype = None
            lib.sg_fault_record_size.restype = c.c_size_t
            lib.sg_callback.argtypes = [c.c_void_p, c.c_int, c.c_uint32, c.c_void_p]
            lib.sg_callback.restype = None
            _library.append(lib)
    return _library[0]
