"""Lockstep: a simulation and verification harness for async scheduling in LLM inference.

The distribution installs one import namespace, ``lockstep`` (``lockstep.engine``,
``lockstep.property_tests``, ``lockstep.ci``), plus the stand-alone ``sync_guard`` library.
This file is the package's ``__init__``: the repository root *is* the ``lockstep`` package
(``pyproject.toml`` maps it), so the top-level folders are its subpackages.

    from lockstep import LLM, SamplingParams
    out = LLM(model="oracle").generate([[1, 2, 3]], SamplingParams(max_tokens=4))[0]
    print(out.token_ids, out.finish_reason)

``LLM``, ``SamplingParams``, ``RequestOutput`` and ``EngineBrokenError`` (raised by every call
on an engine that an interrupt left unusable) are imported on first use, so ``import lockstep``
stays cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["__version__", "LLM", "SamplingParams", "RequestOutput", "EngineBrokenError"]

if TYPE_CHECKING:
    from .engine import LLM, EngineBrokenError, RequestOutput, SamplingParams


def __getattr__(name: str) -> Any:
    if name in __all__[1:]:
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'lockstep' has no attribute {name!r}")
