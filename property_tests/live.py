"""What the harness knows one engine holds: each id's current request, and aborted requests whose
final output is still due.

The protocol's rule for an abort: once ``abort(x)`` returns True, the id ``x`` is free, and a
client may add a new request named ``x`` at once, in the same step. The aborted request's only
further output is its final one (finish reason "abort"), and it comes before any output of the new
``x``: in an earlier ``step()``, or earlier in the same step's list. Anything else for ``x`` while
that final output is due (a late token of the aborted request, or an output of the new one first)
is an :class:`InvariantViolation`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .invariants import InvariantViolation, OutputRules

Key = tuple[str, int]


@dataclass
class RequestResult:
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None
    error: str | None = None


@dataclass
class Held:
    key: Key            # (request id, occurrence)
    rules: OutputRules  # what its outputs must obey


class LiveRequests:
    """One engine's unfinished requests as seen through its outputs, keyed by (id, occurrence)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.current: dict[str, Held] = {}
        self.aborting: dict[str, deque[Held]] = {}

    def busy(self, request_id: str) -> bool:
        """True while ``request_id`` names a request that is neither finished nor aborted: the
        id cannot be added again yet."""
        return request_id in self.current

    def key(self, request_id: str) -> Key | None:
        held = self.current.get(request_id)
        return None if held is None else held.key

    def add(self, request_id: str, key: Key, rules: OutputRules) -> None:
        if request_id in self.current:
            raise ValueError(f"{self.name}: request id {request_id!r} is still live")
        self.current[request_id] = Held(key, rules)

    def aborted(self, request_id: str) -> None:
        """The engine accepted an abort of the current ``request_id``: the id is free, and the
        request's final "abort" output is due."""
        self.aborting.setdefault(request_id, deque()).append(self.current.pop(request_id))

    def unfinished(self) -> list[str]:
        return sorted(set(self.current) | {f"{rid} (abort output due)" for rid in self.aborting})

    def __bool__(self) -> bool:
        return bool(self.current or self.aborting)

    def observe(self, results: dict[Key, RequestResult], out) -> None:
        """Check one output against its request's rules and record it under its key."""
        rid, reason = out.request_id, out.finish_reason
        due = self.aborting.get(rid)
        if due:
            held = due[0]
            if reason != "abort":
                raise InvariantViolation(
                    f"{self.name}: output for {rid!r}#{held.key[1]} after its abort was "
                    f"accepted: {list(out.token_ids)} {reason} (only its final 'abort' output may "
                    f"follow an accepted abort, before any output of a new request {rid!r})")
            due.popleft()
            if not due:
                del self.aborting[rid]
        else:
            held = self.current.get(rid)
            if held is None:
                raise InvariantViolation(f"{self.name}: output for {rid!r}, which is not live "
                                         f"(finished or never added): {list(out.token_ids)} "
                                         f"{reason}")
            if reason is not None:
                del self.current[rid]
        held.rules.observe(out.token_ids, reason)
        logprobs = None if out.logprobs is None else list(out.logprobs)
        results[held.key] = RequestResult(list(out.token_ids), reason, logprobs,
                                          getattr(out, "error", None))
