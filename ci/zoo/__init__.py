"""The zoo: historical async-scheduling bugs as fault injections, and ``lockstep zoo``.

Each injection (see :mod:`.registry`) is a realistic bug of a class that has shipped in async
engines, applied by monkeypatching one named engine function; :mod:`.witness` demonstrates that
it misbehaves; :mod:`.runner` applies each in a fresh process and runs the gate against it.
"""
# each module registers its own injections
from . import buffers, collect, containment, scheduling, state, syncs  # noqa: F401
from .registry import CLASSES, INJECTIONS, Injection, Patcher

__all__ = ["CLASSES", "INJECTIONS", "Injection", "Patcher"]
