"""The ``nosync`` pytest plugin (registered through the ``pytest11`` entry point).

``@pytest.mark.nosync`` runs the marked test's engine steps (``EngineCore.step`` by default, or
``@pytest.mark.nosync(target="package.module:Class.method")``, or ``target=None`` for the whole
test body) under the sync detector and the race checker; a sync or a race fails the test.
Options: ``--sync-guard=off|log|error`` (default ``error``) and ``--widen-races=MS``. Fixtures:
``sync_guard_options`` (the two options) and ``no_sync`` (a context-manager factory that arms
the configured guard, for tests that drive it themselves).

Loading the plugin imports no torch: the guard is imported when a ``nosync`` test runs or a
fixture is used, so a test run that never guards anything pays nothing for it.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import pytest

DEFAULT_TARGET = "lockstep.engine.core:EngineCore.step"
_LEVEL_OF_OPTION = {"log": "log", "error": "disallow"}


@dataclass(frozen=True)
class GuardOptions:
    level: str         # off | log | error
    widen_ms: float    # 0: no widening


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sync_guard", "host-sync and host-buffer race detection")
    group.addoption("--sync-guard", choices=("off", "log", "error"), default="error",
                    help="what a host sync or a buffer race in a nosync test does (default: error)")
    group.addoption("--widen-races", type=float, default=0.0, metavar="MS",
                    help="on CUDA, delay each tracked copy by MS milliseconds so that latent "
                         "host-buffer races corrupt data deterministically")


def pytest_configure(config: pytest.Config) -> None:
    widen = config.getoption("--widen-races")
    if widen < 0:
        raise pytest.UsageError(f"--widen-races={widen}: must be >= 0 milliseconds")
    config.addinivalue_line(
        "markers", "nosync(target='module:Class.method'): run the test's engine steps (or "
                   "`target`) under sync_guard's sync detector and race checker")


def _options(config: pytest.Config) -> GuardOptions:
    return GuardOptions(config.getoption("--sync-guard"), config.getoption("--widen-races"))


@contextmanager
def armed(options: GuardOptions) -> Iterator[list]:
    """The configured guard: detector at the chosen level plus the race checker."""
    if options.level == "off":
        yield []
        return
    import sync_guard
    with sync_guard.armed(_LEVEL_OF_OPTION[options.level], options.widen_ms or None) as reports:
        yield reports


def _resolve(target: str):
    module_name, _, attr_path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    marker = item.get_closest_marker("nosync")
    options = _options(item.config)
    if marker is None or options.level == "off":
        yield
        return
    import sync_guard
    target = marker.kwargs.get("target", DEFAULT_TARGET)
    if target is None:
        with armed(options):
            yield
        return
    # the race checker spans the whole test: a copy enqueued in one step races with the next
    with sync_guard.race_check(widen_ms=options.widen_ms or None):
        owner, name = _resolve(target)
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            with sync_guard.Scope(_LEVEL_OF_OPTION[options.level]):
                return original(*args, **kwargs)

        setattr(owner, name, guarded)
        try:
            yield
        finally:
            setattr(owner, name, original)


@pytest.fixture
def sync_guard_options(request: pytest.FixtureRequest) -> GuardOptions:
    return _options(request.config)


@pytest.fixture
def no_sync(sync_guard_options: GuardOptions):
    """``with no_sync() as reports:`` arms the configured detector and race checker."""
    return lambda: armed(sync_guard_options)
