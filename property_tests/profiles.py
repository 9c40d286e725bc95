"""Hypothesis settings profiles: ``ci`` (derandomized, reproducible), ``dev`` and ``fuzz``.

Chosen by ``HYPOTHESIS_PROFILE`` (or ``load(name)``); without it, ``ci`` when the ``CI``
environment variable is set, else ``dev``. ``dev`` and ``fuzz`` keep failures in the example
database, so a plain ``pytest`` run replays what a fuzzing session found.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import InvalidArgument

PROFILES = ("ci", "dev", "fuzz")
ENV_VAR = "HYPOTHESIS_PROFILE"
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("ci", max_examples=30, derandomize=True, database=None,
                          deadline=None, print_blob=True, suppress_health_check=_SLOW_OK)
settings.register_profile("dev", max_examples=30, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("fuzz", max_examples=1_000_000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK,
                          phases=[Phase.reuse, Phase.generate, Phase.target, Phase.shrink])


def default_profile() -> str:
    return os.environ.get(ENV_VAR) or ("ci" if os.environ.get("CI") else "dev")


def load(name: str | None = None) -> str:
    """Load profile ``name`` (default: :func:`default_profile`); returns the name loaded."""
    name = name or default_profile()
    try:
        settings.get_profile(name)
    except InvalidArgument:
        source = "profile" if name != os.environ.get(ENV_VAR) else ENV_VAR
        raise ValueError(f"{source}={name!r} is not a settings profile; choose one of "
                         f"{', '.join(PROFILES)}") from None
    settings.load_profile(name)
    return name
