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

# One failure per run (each replay file then belongs to one bug), and no explain phase: it
# traces every shrink step, which made shrinking a differential failure about 3x slower.
_COMMON = dict(deadline=None, print_blob=True, suppress_health_check=_SLOW_OK,
               report_multiple_bugs=False)
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
settings.register_profile("ci", max_examples=30, derandomize=True, database=None,
                          phases=_PHASES, **_COMMON)
settings.register_profile("dev", max_examples=30, phases=_PHASES, **_COMMON)
settings.register_profile("fuzz", max_examples=1_000_000, phases=_PHASES[1:], **_COMMON)


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
