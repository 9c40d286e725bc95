"""The ``nosync`` pytest plugin (registered through the ``pytest11`` entry point).

``@pytest.mark.nosync`` runs the whole test body under the sync detector and the race checker.
``@pytest.mark.nosync("pkg.module:function")`` (or ``target="pkg.module:Class.method"``) narrows
the sync detector to the calls of that function, however the test reached it: the module
attribute, every module-level name bound to it (a ``from pkg.module import function``), or the
class attribute; the race checker still spans the whole test, since a copy enqueued in one
call races with the next. A target that does not resolve, or is never called during the test,
fails the test with a usage error that names it: the plugin never passes a test it did not
guard.

Settings (command line, or the ini file): ``--sync-guard`` / ``sync_guard`` = ``allow``, ``log``
or ``disallow`` (default; aliases ``off``, ``warn``, ``error``), ``--widen-races`` /
``sync_guard_widen_races`` = milliseconds. Under ``log`` the syncs and races found are listed
in the terminal summary. Fixtures: ``sync_guard_options`` and ``no_sync`` (a context-manager
factory that arms the configured guard).

Loading the plugin imports no torch: the guard is imported when a ``nosync`` test runs or a
fixture is used, so a test run that never guards anything pays nothing for it.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
import types
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from .levels import normalize_level

MARKER_HELP = ("nosync(target=None): run the test body (or only the calls of target, "
               "'module:function' or 'module:Class.method') under sync_guard's host-sync "
               "detector and host-buffer race checker")
_HIDDEN = tuple(os.sep + part + os.sep for part in ("sync_guard", "torch", "_pytest", "pluggy"))


MODES = ("deep", "light", "auto")


@dataclass(frozen=True)
class GuardOptions:
    level: str         # allow | log | disallow
    widen_ms: float    # 0: no widening
    mode: str = "deep"  # deep | light | auto (light on CUDA with the native hook, else deep)


@dataclass
class Findings:
    """What ``log`` saw: (test id, kind, operation, user frame) per sync or race."""

    entries: list[tuple[str, str, str, str]] = field(default_factory=list)


_OPTIONS = pytest.StashKey[GuardOptions]()
_FINDINGS = pytest.StashKey[Findings]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sync_guard", "host-sync and host-buffer race detection")
    group.addoption("--sync-guard", default=None, metavar="LEVEL",
                    help="what a host sync or a buffer race in a nosync test does: allow, log "
                         "or disallow (default; aliases off, warn, error)")
    group.addoption("--widen-races", default=None, metavar="MS",
                    help="on CUDA, delay each tracked copy by MS milliseconds so that latent "
                         "host-buffer races corrupt data deterministically")
    group.addoption("--sync-guard-mode", default=None, choices=MODES,
                    help="deep (default): a dispatch mode judges every op, the race checker "
                         "tracks every pinned copy; light: the native hook judges every "
                         "blocking CUDA call and the page guard watches staging buffers "
                         "(sync_guard.staging_empty) only; auto: light on CUDA where the native "
                         "hook installs and races are not widened, else deep")
    parser.addini("sync_guard", "the level of nosync tests (as --sync-guard)", default="disallow")
    parser.addini("sync_guard_widen_races", "as --widen-races", default="0")
    parser.addini("sync_guard_mode", "as --sync-guard-mode", default="deep")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    level_arg = config.getoption("--sync-guard")
    widen_arg = config.getoption("--widen-races")
    level_name = "--sync-guard" if level_arg is not None else "sync_guard (ini)"
    widen_name = "--widen-races" if widen_arg is not None else "sync_guard_widen_races (ini)"
    try:
        level = normalize_level(level_arg if level_arg is not None else config.getini("sync_guard"),
                                level_name)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    raw = widen_arg if widen_arg is not None else config.getini("sync_guard_widen_races")
    try:
        widen = float(raw)
    except ValueError:
        raise pytest.UsageError(f"{widen_name}={raw!r}: not a number of milliseconds") from None
    if widen < 0:
        raise pytest.UsageError(f"{widen_name}={raw!r}: must be >= 0 milliseconds")
    mode = config.getoption("--sync-guard-mode") or config.getini("sync_guard_mode")
    if mode not in MODES:
        raise pytest.UsageError(f"sync_guard_mode (ini)={mode!r}: expected one of "
                                f"{', '.join(MODES)}")
    config.stash[_OPTIONS] = GuardOptions(level, widen, mode)
    config.stash[_FINDINGS] = Findings()


def _options(config: pytest.Config) -> GuardOptions:
    return config.stash[_OPTIONS]


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> str:
    """The header line: level, widening, and what this machine can check."""
    options = _options(config)
    guarded = sum(item.get_closest_marker("nosync") is not None for item in items)
    widen = f"{options.widen_ms:g} ms race widening" if options.widen_ms else "no race widening"
    head = f"sync_guard: level={options.level}, {widen}, nosync tests: {guarded}"
    if guarded and options.level != "allow":
        head += f", mode={resolved_mode(options)}"
    if not guarded or options.level == "allow":
        return head
    return f"{head}; {_what_is_checked()}"


def _what_is_checked() -> str:
    import torch
    if torch.cuda.is_available():
        return f"checks CUDA syncs and pinned-buffer races on {torch.cuda.get_device_name()}"
    return ("no CUDA device: only simulated-device memory is checked (CPU tensors never sync; "
            "run step code on lockstep.engine.sim.SimDevice to check it here)")


_warned_no_cuda = []


def _warn_once_without_cuda(item: pytest.Item) -> None:
    import torch
    if not _warned_no_cuda and not torch.cuda.is_available():
        _warned_no_cuda.append(True)
        item.warn(UserWarning("sync_guard: no CUDA device: only simulated-device memory is "
                              "checked; a sync on CPU tensors cannot happen and is not reported"))


_resolved: dict[GuardOptions, str] = {}


def resolved_mode(options: GuardOptions) -> str:
    """``deep`` or ``light``: ``auto`` is light on CUDA when the native hook is installed (every
    blocking CUDA call judged, staging buffers page-guarded) and races are not widened."""
    if options.mode != "auto":
        return options.mode
    if options not in _resolved:
        mode = "deep"
        import torch
        if torch.cuda.is_available() and not options.widen_ms:
            from sync_guard import native
            native.install_if_requested()
            mode = "light" if native.installed() else "deep"
        _resolved[options] = mode
    return _resolved[options]


@contextmanager
def armed(options: GuardOptions, sync_level: bool = True) -> Iterator[tuple[list, list]]:
    """The race checker at the configured level, and (``sync_level``) the sync detector."""
    if options.level == "allow":
        yield [], []
        return
    import sync_guard
    if resolved_mode(options) == "light":   # light() checks races through the page guard
        from sync_guard import pages
        with (sync_guard.light(options.level) if sync_level
              else pages.checking_races(options.level)) as syncs:
            yield (syncs if sync_level else []), []
        return
    with ExitStack() as stack:
        races = stack.enter_context(sync_guard.race_check(widen_ms=options.widen_ms or None,
                                                          level=options.level))
        syncs = stack.enter_context(sync_guard.Scope(options.level)) if sync_level else []
        yield syncs, races


def _resolve(item: pytest.Item, target: str):
    """(owner, attribute name, raw attribute) of ``target``, or fail the test saying why."""
    module_name, colon, attr_path = target.partition(":")
    if not colon or not module_name or not attr_path:
        _usage(item, f"target={target!r} is not 'module:function' or 'module:Class.method'")
    try:
        owner = importlib.import_module(module_name)
    except ImportError as exc:
        _usage(item, f"target={target!r}: cannot import module {module_name!r} ({exc})")
    *parents, name = attr_path.split(".")
    for part in [*parents, name]:
        if not hasattr(owner, part):
            _usage(item, f"target={target!r}: {getattr(owner, '__name__', owner)!s} has no "
                         f"attribute {part!r}")
        if part != name:
            owner = getattr(owner, part)
    raw = inspect.getattr_static(owner, name)
    if not callable(getattr(owner, name)):
        _usage(item, f"target={target!r} is not callable")
    return owner, name, raw


def _usage(item: pytest.Item, why: str):
    __tracebackhide__ = True
    pytest.fail(f"{item.nodeid}: @pytest.mark.nosync usage error: {why}", pytrace=False)


def _target(item: pytest.Item, marker: pytest.Mark) -> str | None:
    unknown = set(marker.kwargs) - {"target"}
    if unknown or len(marker.args) > 1 or (marker.args and "target" in marker.kwargs):
        _usage(item, f"takes one target, positional or target=...; got args={marker.args} "
                     f"kwargs={marker.kwargs}")
    target = marker.args[0] if marker.args else marker.kwargs.get("target")
    if target is not None and not isinstance(target, str):
        _usage(item, f"target={target!r} must be a 'module:function' string")
    return target


@contextmanager
def _guard_calls(item: pytest.Item, target: str, level: str, deep: bool = True
                 ) -> Iterator[list]:
    """Replace every reference to ``target`` by a guarded wrapper; yields the calls' count."""
    import sync_guard
    owner, name, raw = _resolve(item, target)
    function = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    calls, syncs = [0], []

    def guarded(*args, **kwargs):
        calls[0] += 1
        with (sync_guard.Scope(level) if deep else sync_guard.light(level)) as found:
            try:
                return function(*args, **kwargs)
            finally:
                syncs.extend(found)
    guarded.__wrapped__ = function
    wrapper = type(raw)(guarded) if isinstance(raw, (staticmethod, classmethod)) else guarded
    patched = [(owner, name, raw)]
    if not isinstance(owner, type):  # a function: every module-level name bound to it as well
        test_module = getattr(item, "module", None)
        namespaces = [m for m in list(sys.modules.values()) if m is not None] + [test_module]
        for module in {id(m): m for m in namespaces if m is not None}.values():
            for key, value in list(getattr(module, "__dict__", {}).items()):
                if value is function and (module, key) != (owner, name):
                    patched.append((module, key, value))
    for where, key, _ in patched:
        setattr(where, key, wrapper if where is owner and key == name else guarded)
    try:
        yield calls, syncs
    finally:
        for where, key, value in patched:
            setattr(where, key, value)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    marker = item.get_closest_marker("nosync")
    options = _options(item.config)
    if marker is None or options.level == "allow":
        return (yield)
    target = _target(item, marker)
    _warn_once_without_cuda(item)
    try:
        if target is None:
            with armed(options) as (syncs, races):
                result = yield
        else:
            with armed(options, sync_level=False) as (_, races), \
                    _guard_calls(item, target, options.level,
                                 resolved_mode(options) == "deep") as (calls, syncs):
                result = yield
            if calls[0] == 0:
                _usage(item, f"target={target!r} was never called by the test: nothing was "
                             f"guarded")
    except BaseException as exc:
        import sync_guard
        if isinstance(exc, sync_guard.GuardError):
            raise exc.with_traceback(_user_traceback(exc.__traceback__)) from None
        raise
    _record(item, syncs, races)
    return result


def _user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """``tb`` without the guard's, torch's, pytest's and pluggy's frames."""
    kept = []
    while tb is not None:
        if not any(part in tb.tb_frame.f_code.co_filename for part in _HIDDEN):
            kept.append(tb)
        tb = tb.tb_next
    out = None
    for frame in reversed(kept):
        out = types.TracebackType(out, frame.tb_frame, frame.tb_lasti, frame.tb_lineno)
    return out


def _record(item: pytest.Item, syncs: list, races: list) -> None:
    findings = item.config.stash[_FINDINGS]
    for report in syncs:
        if report.allowed_by is None:
            where = report.frames[-1] if report.frames else None
            findings.entries.append((item.nodeid, "sync", report.op, _frame(where)))
    for race in races:
        site = race.access_site[-1] if race.access_site else None
        findings.entries.append((item.nodeid, "race", str(race).split(",")[0], _frame(site)))


def _frame(frame) -> str:
    return "-" if frame is None else f"{frame.filename}:{frame.lineno} in {frame.name}"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    findings = config.stash.get(_FINDINGS, None)
    if findings is None or not findings.entries:
        return
    terminalreporter.section("sync_guard: syncs and races logged")
    for test, kind, op, where in findings.entries:
        terminalreporter.line(f"{test}: {kind}: {op} at {where}")


@pytest.fixture
def sync_guard_options(request: pytest.FixtureRequest) -> GuardOptions:
    return _options(request.config)


@pytest.fixture
def no_sync(sync_guard_options: GuardOptions):
    """``with no_sync() as reports:`` arms the configured detector and race checker."""
    @contextmanager
    def arm():
        with armed(sync_guard_options) as (syncs, _):
            yield syncs
    return arm
