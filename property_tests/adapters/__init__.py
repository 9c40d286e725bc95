"""Engines under test: the adapters Lockstep ships, and how ``--engine`` finds a user's own.

``--engine NAME`` picks a shipped adapter (:data:`ENGINES`); ``--engine module:factory`` imports
``factory`` from ``module``: a callable ``(EngineSpec, Mode) -> EngineUnderTest`` with a
``capabilities`` attribute (:class:`~lockstep.property_tests.capabilities.Capabilities`).
``docs/engines.md`` walks through writing one.
"""
from __future__ import annotations

import importlib

from ..capabilities import Capabilities

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
