"""The zoo's registry: an :class:`Injection` is one historical bug, applied from outside the engine.

An injection is a function that takes a :class:`Patcher` and monkeypatches one named function
or method of the engine (never its source); its docstring says what goes wrong and in which
modes. It carries its bug class, the upstream threads of the same class, and a
:class:`~lockstep.ci.zoo.witness.Witness`: the short demonstration that it misbehaves.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from .witness import Witness

CLASSES = {
    "staging": "host staging buffers",
    "streams": "device buffers and streams",
    "collect": "output collection",
    "placeholders": "placeholders and budgets",
    "penalties": "penalty state",
    "stops": "min_tokens, stops and aborts",
    "lifecycle": "ids, slots and blocks",
    "preemption": "preemption and resume",
    "sampling": "seeds and logprobs",
    "syncs": "hidden host syncs",
    "containment": "fault containment",
    "timeline": "step timeline attribution",
}


class Patcher:
    """``setattr`` that remembers what it replaced; ``undo`` puts everything back."""

    def __init__(self) -> None:
        self._undo: list[tuple[object, str, object]] = []

    def setattr(self, owner: object, name: str, value: object) -> None:
        if not hasattr(owner, name):
            raise AttributeError(f"{owner!r} has no attribute {name!r} to patch")
        self._undo.append((owner, name, inspect.getattr_static(owner, name)))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._undo:
            owner, name, value = self._undo.pop()
            setattr(owner, name, value)


@dataclass(frozen=True)
class Injection:
    name: str
    bug_class: str
    references: tuple[str, ...]
    apply: Callable[[Patcher], None]
    witness: Witness

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.apply) or ""

    @property
    def summary(self) -> str:
        return self.doc.split("\n\n")[0].replace("\n", " ")


INJECTIONS: dict[str, Injection] = {}


def injection(bug_class: str, references: tuple[str, ...], witness: Witness):
    """Register the decorated ``apply(patch)`` function as an injection named after it."""
    if bug_class not in CLASSES:
        raise ValueError(f"bug_class={bug_class!r}: not one of {sorted(CLASSES)}")

    def register(apply: Callable[[Patcher], None]) -> Callable[[Patcher], None]:
        if not inspect.getdoc(apply):
            raise ValueError(f"injection {apply.__name__} has no docstring")
        INJECTIONS[apply.__name__] = Injection(apply.__name__, bug_class, references, apply,
                                               witness)
        return apply
    return register
