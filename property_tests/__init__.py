"""Property-based differential testing of async vs sync scheduling.

* :class:`Workload` (with :class:`EngineSpec`, :class:`RequestSpec`, :class:`AbortSpec`): one
  serialisable value holding everything a run depends on.
* :func:`workloads`: hypothesis strategies aimed at the hard states.
* :func:`run_differential`: sync vs async on every sim policy vs each request alone.
* :class:`EngineUnderTest`: the protocol through which the harness drives an engine
  (:class:`LockstepEngine` is the first implementation); :class:`Capabilities`, what an
  engine declares it supports (the harness generates only that, and :func:`narrowing` says what
  it left out); :class:`AdapterBase`, the common bookkeeping; :func:`resolve_engine`, what
  ``--engine NAME|module:factory`` resolves to (``docs/engines.md``).
* :class:`EngineMachine` and ``TestEngineMachine``: the stateful machine.
* ``lockstep replay FILE`` and ``lockstep fuzz``: see ``docs/property_tests.md``.
"""
from .adapters import resolve_engine
from .adapters.base import AdapterBase
from .capabilities import Capabilities, narrowing
from .comparator import Divergence
from .differential import DifferentialReport, run_differential
from .driver import EngineHang
from .engine_under_test import EngineUnderTest, LockstepEngine, Mode, lockstep_engine
from .invariants import InvariantViolation
from .properties import PropertyFailure, check_workload
from .strategies import workloads
from .workload import AbortSpec, EngineSpec, RequestSpec, Workload

__all__ = ["Workload", "EngineSpec", "RequestSpec", "AbortSpec", "workloads",
           "run_differential", "DifferentialReport", "check_workload", "PropertyFailure",
           "Divergence", "InvariantViolation", "EngineHang", "EngineUnderTest",
           "LockstepEngine", "Mode", "lockstep_engine", "Capabilities", "narrowing",
           "AdapterBase", "resolve_engine"]
