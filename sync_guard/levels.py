"""The guard's one level vocabulary (no torch here: the pytest plugin reads it at start-up).

``allow`` (nothing is judged), ``log`` (record and log), ``disallow`` (raise). The API, the
``SYNC_GUARD`` environment variable and the pytest plugin all take these, and accept ``off``,
``warn`` and ``error`` as aliases.
"""
from __future__ import annotations

LEVELS = ("allow", "log", "disallow")
ALIASES = {"off": "allow", "warn": "log", "error": "disallow"}
ENV_VAR = "SYNC_GUARD"


def normalize_level(value: object, name: str = "level") -> str:
    """The canonical level for ``value`` (a level or an alias), or ValueError naming ``name``."""
    level = str(value).strip().lower() if isinstance(value, str) else value
    if level in LEVELS:
        return level
    if level in ALIASES:
        return ALIASES[level]
    raise ValueError(f"{name}={value!r} is not a sync_guard level; choose one of "
                     f"{', '.join(LEVELS)} (aliases: "
                     f"{', '.join(f'{a}={c}' for a, c in ALIASES.items())})")
