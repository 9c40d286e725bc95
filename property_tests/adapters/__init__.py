"""Engines under test: the adapters Lockstep ships, and how ``--engine`` finds a user's own.

``--engine NAME`` picks a shipped adapter (:data:`ENGINES`); ``--engine module:factory`` imports
``factory`` from ``module``: a callable ``(EngineSpec, Mode) -> EngineUnderTest`` with a
``capabilities`` attribute (:class:`~lockstep.property_tests.capabilities.Capabilities`).
``docs/engines.md`` walks through writing one.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..capabilities import Capabilities

if TYPE_CHECKING:   # the protocol module imports the engine: only when a mode is asked for
    from ..engine_under_test import Mode

ENGINES = {
    "lockstep": "lockstep.property_tests.engine_under_test:lockstep_engine",
    "transformers": "lockstep.property_tests.adapters.transformers_cb:transformers_engine",
}


class EngineSpecError(ValueError):
    """``--engine`` names nothing usable; the message names the value."""


def resolve_engine(name: str):
    """The engine factory ``name`` stands for (a shipped name or ``module:factory``)."""
    target = ENGINES.get(name, name)
    if ":" not in target:
        raise EngineSpecError(f"--engine {name!r}: not one of {sorted(ENGINES)} and not "
                              f"module:factory")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineSpecError(f"--engine {name!r}: cannot import {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise EngineSpecError(f"--engine {name!r}: {module_name!r} has no callable {attr!r}")
    caps = getattr(factory, "capabilities", None)
    if not isinstance(caps, Capabilities):
        raise EngineSpecError(f"--engine {name!r}: {attr} has no `capabilities` (a "
                              f"lockstep.property_tests.Capabilities declaring what the engine "
                              f"supports); the harness generates only what is declared")
    check = getattr(factory, "check_environment", None)
    if check is not None:
        try:
            check()
        except (ImportError, RuntimeError, ValueError) as exc:
            raise EngineSpecError(f"--engine {name!r}: {exc}") from None
    return factory


def engine_name(factory) -> str:
    """What ``--engine`` takes for ``factory``: its shipped name, else ``module:factory``."""
    path = f"{factory.__module__}:{factory.__qualname__}"
    return next((name for name, target in ENGINES.items() if target == path), path)


def engine_modes(factory, device: str) -> tuple[Mode, tuple[Mode, ...]]:
    """(the sync reference, the async modes) ``factory``'s engine runs on ``device`` ("cpu":
    the simulated device where the engine has one, else the CPU; "cuda"), as it declares;
    EngineSpecError when it declares no sync mode there."""
    from ..engine_under_test import ASYNC_MODES, SYNC, Mode
    caps = factory.capabilities
    if device == "cpu" and caps.runs(False, "sim"):
        return SYNC, (ASYNC_MODES if caps.runs(True, "sim") else ())
    if not caps.runs(False, device):
        raise EngineSpecError(f"--device {device}: {caps.engine} declares no sync mode there "
                              f"(it runs on {', '.join(caps.devices())})")
    return Mode(False, device), ((Mode(True, device),) if caps.runs(True, device) else ())


def describe(factory, device: str) -> list[str]:
    """What a run on ``factory``'s engine compares and what it leaves out, in words: every run
    prints this (a narrowing is never silent)."""
    from ..capabilities import narrowing
    caps = factory.capabilities
    reference, modes = engine_modes(factory, device)
    compared = " vs ".join([reference.name, *(m.name for m in modes), "solo"])
    lines = [f"engine {caps.engine} (adapter {caps.adapter_version}): {compared}"]
    if not modes:
        lines.append(f"no async mode on {device}: sync against each request alone only")
    return lines + [f"narrowed: {line}" for line in narrowing(caps)]
