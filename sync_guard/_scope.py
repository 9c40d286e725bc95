"""Levels and scopes: which thread or task is guarded, and what a detected sync does there.

The scope stack lives in a context variable, so it belongs to the thread (and the asyncio task)
that entered it: another thread's legitimate waits are never judged by it. The default level,
for code outside any scope, comes from the ``SYNC_GUARD`` environment variable (``allow``), read
at first use: a bad value is a ``ValueError`` that names the variable then, not at import.

One level vocabulary everywhere (API, ``SYNC_GUARD``, the pytest plugin): ``allow``, ``log``,
``disallow``; ``off``, ``warn`` and ``error`` are accepted as aliases.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sys
import threading
import traceback
from collections.abc import Sequence
from contextlib import ContextDecorator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import pages
from .levels import ENV_VAR, LEVELS, normalize_level  # noqa: F401  (re-exported)

logger = logging.getLogger("sync_guard")

_PACKAGE_DIR = str(Path(__file__).parent)
_TORCH_DIR = str(Path(torch.__file__).parent)
_SKIPPED = (_PACKAGE_DIR, _TORCH_DIR, str(Path(contextlib.__file__)))
_SKIPPED_PARTS = tuple(f"{os.sep}{name}{os.sep}" for name in ("_pytest", "pytest", "pluggy"))


class GuardError(RuntimeError):
    """Base of the guard's errors; code that catches broad exceptions should re-raise these."""

    __module__ = "sync_guard"  # reports name the public spelling, sync_guard.SyncViolation


_default: list[str] = []   # the SYNC_GUARD level, once read successfully


def default_level() -> str:
    """The level outside any scope, from ``SYNC_GUARD`` (read once; a bad value raises at
    every use, so the error is seen where the guard is first used)."""
    if not _default:
        raw = os.environ.get(ENV_VAR, "").strip() or "allow"
        _default.append(normalize_level(raw, ENV_VAR))
    return _default[0]


_hidden_files: dict[str, bool] = {}  # filename -> not a user frame (judged once per file)


def is_user_file(filename: str) -> bool:
    """Not the guard's, torch's, pytest's or pluggy's (nor a frozen module)."""
    hidden = _hidden_files.get(filename)
    if hidden is None:
        hidden = _hidden_files[filename] = (
            filename.startswith(_SKIPPED) or filename.startswith("<frozen")
            or any(part in filename for part in _SKIPPED_PARTS))
    return not hidden


class Frames(Sequence):
    """The user's frames of one report, captured as (code object, instruction offset) pairs:
    a line number costs a scan of the code's line table, so the ``FrameSummary`` objects are
    made on first use (most reports, allowed syncs and tracked copies, are never printed)."""

    __slots__ = ("_raw", "_frames")

    def __init__(self, raw: list) -> None:
        self._raw = raw
        self._frames: list[traceback.FrameSummary] | None = None

    def _summaries(self) -> list[traceback.FrameSummary]:
        if self._frames is None:
            self._frames = [traceback.FrameSummary(code.co_filename, _line_of(code, offset),
                                                   code.co_name, lookup_line=False)
                            for code, offset in self._raw]
            self._raw = []
        return self._frames

    def __getitem__(self, index):
        return self._summaries()[index]

    def __len__(self) -> int:
        return len(self._raw) if self._frames is None else len(self._frames)

    def __repr__(self) -> str:
        return repr(self._summaries())


def _line_of(code, offset: int) -> int | None:
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
    return code.co_firstlineno


def user_frames() -> Frames:
    """The caller's stack without the guard's, torch's, pytest's and pluggy's frames.

    Only the code objects and instruction offsets are read here (no line numbers, no source):
    this runs for every tracked copy and every allowed wait.
    """
    raw = []
    hidden = _hidden_files
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        skip = hidden.get(code.co_filename)
        if skip is None:
            skip = not is_user_file(code.co_filename)
        if not skip:
            raw.append((code, frame.f_lasti))
        frame = frame.f_back
    raw.reverse()
    return Frames(raw)


def thread_name() -> str:
    name = threading.current_thread().name
    if asyncio._get_running_loop() is not None:
        task = asyncio.current_task()
        if task is not None:
            return f"{name} (task {task.get_name()})"
    return name


@dataclass
class SyncReport:
    """One detected host sync: what, in which thread, from where."""

    op: str
    thread: str
    frames: Sequence[traceback.FrameSummary]
    allowed_by: str | None = None

    def __str__(self) -> str:
        where = "".join(traceback.format_list(self.frames[-6:])) or "  (no user frames)\n"
        why = f" (allowed: {self.allowed_by})" if self.allowed_by else ""
        return f"host sync: {self.op} in thread {self.thread!r}{why}\n{where}"


class SyncViolation(GuardError):
    """A host sync inside a ``disallow`` scope."""

    __module__ = "sync_guard"

    def __init__(self, report: SyncReport) -> None:
        super().__init__(str(report))
        self.report = report


@dataclass
class _Frame:
    level: str
    parent: "_Frame | None"
    records: list[SyncReport]
    reason: str | None = None
    first_only: bool = False
    used: bool = False
    violations: list[SyncReport] = field(default_factory=list)
    deferred: list[SyncReport] = field(default_factory=list)   # raised when the scope exits
    serial: int = 0   # the outermost scope's number in this process (named in race reports)


_current: ContextVar[_Frame | None] = ContextVar("sync_guard_scope", default=None)
_serials = itertools.count(1)


def armed() -> bool:
    """Whether a sync in the calling context would be looked at (cheap: one variable read)."""
    frame = _current.get()
    return default_level() != "allow" if frame is None else True


def check_sync(op: str, deferred: bool = False) -> None:
    """Judge a host sync by the innermost scope of the calling context. ``deferred``: the caller
    cannot raise (a callback from native code): a violation is raised when its scope exits."""
    frame = _current.get()
    if frame is None and default_level() == "allow":
        return
    report = SyncReport(op, thread_name(), user_frames())
    while frame is not None and frame.level == "allow":
        if not (frame.first_only and frame.used):
            frame.used = True
            report.allowed_by = frame.reason
            _record(frame, report)
            return
        frame = frame.parent  # a first_only allowance that was used: the next scope decides
    level = default_level() if frame is None else frame.level
    if frame is not None:
        _record(frame, report)
    if level == "log":
        logger.warning("%s", report)
    elif level == "disallow":
        if frame is not None:
            frame.violations.append(report)
        if not deferred:
            raise SyncViolation(report)
        if frame is not None:
            frame.deferred.append(report)
        else:
            logger.warning("%s (outside any scope, under SYNC_GUARD=disallow)", report)


_internal_errors = [0]


def note_internal_error() -> None:
    """A guard callback from native code failed (it cannot raise there): counted, logged once."""
    _internal_errors[0] += 1
    if _internal_errors[0] == 1:
        logger.exception("sync_guard: a native callback failed; it is ignored")


def _record(frame: _Frame | None, report: SyncReport) -> None:
    while frame is not None:
        frame.records.append(report)
        frame = frame.parent


class Scope(ContextDecorator):
    """A guard scope; ``with`` it gives the list of syncs seen inside (allowed ones included)."""

    def __init__(self, level: str, reason: str | None = None, first_only: bool = False,
                 deep: bool = True) -> None:
        level = normalize_level(level)
        self.deep = deep  # False: no per-op dispatch mode (the always-on mode, sync_guard.light)
        default_level()  # a bad SYNC_GUARD is an error at the first use of the guard
        if level == "allow" and not reason:
            raise ValueError("allow() needs a reason, e.g. allow('collect: wait for outputs')")
        self.level, self.reason, self.first_only = level, reason, first_only
        self.records: list[SyncReport] = []
        self._tokens: list = []

    def __enter__(self) -> list[SyncReport]:
        parent = _current.get()
        if self.level == "allow" and parent is None and default_level() == "allow":
            self._tokens.append(None)  # nothing is guarded here: the allowance has no effect
            return self.records
        frame = _Frame(self.level, parent, self.records, self.reason, self.first_only,
                       serial=parent.serial if parent is not None else next(_serials))
        self._tokens.append(_current.set(frame))
        pages.refresh()
        if self.level != "allow" and self.deep:  # an allowance needs no mode of its own
            from .detector import arm_thread
            arm_thread()
        return self.records

    def __exit__(self, *exc) -> None:
        if self.level != "allow" and self.deep:
            from .detector import disarm_thread
            disarm_thread()
        token = self._tokens.pop()
        if token is not None:
            frame = _current.get()
            if self.level == "allow":
                pages.record_allowed(frame)
            _current.reset(token)
            pages.refresh()
            if frame is not None and frame.deferred and exc[0] is None:
                raise SyncViolation(frame.deferred[0])
