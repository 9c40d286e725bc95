"""The bookkeeping every adapter needs, so an adapter maps only its engine's calls.

:class:`AdapterBase` keeps the ids an engine holds, refuses to add an id that is still live (the
protocol's contract, whatever the engine does with duplicates) while letting an id whose abort was
accepted be added again at once, counts steps, beats the watchdog's heartbeat around each step,
and checks the outputs' shape: an output for an id that is not live, or one after its request's
final output, is an :class:`InvariantViolation` raised at once.
"""
from __future__ import annotations

from collections.abc import Sequence

from lockstep.engine import SamplingParams

from ..engine_under_test import Mode, Output, heartbeat
from ..invariants import InvariantViolation
from ..workload import EngineSpec


class AdapterBase:
    """Subclass and implement ``_add``, ``_abort``, ``_step``; set ``eos_token_ids``."""

    eos_token_ids: tuple[int, ...] = ()

    def __init__(self, spec: EngineSpec, mode: Mode) -> None:
        self.spec = spec
        self.mode = mode
        self.live: set[str] = set()            # ids of requests neither finished nor aborted
        self.abort_due: dict[str, int] = {}     # id -> accepted aborts whose output is due
        self.steps = 0
        self.finished_outputs = 0

    # -- the protocol --------------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], params: SamplingParams,
            arrival_index: int) -> None:
        if request_id in self.live:
            raise ValueError(f"request_id={request_id!r} is still live")
        self._add(request_id, list(prompt), params, arrival_index)
        self.live.add(request_id)

    def abort(self, request_id: str) -> bool:
        if request_id not in self.live or not self._abort(request_id):
            return False
        self.live.discard(request_id)
        self.abort_due[request_id] = self.abort_due.get(request_id, 0) + 1
        return True

    def step(self) -> Sequence[Output]:
        self.steps += 1
        heartbeat.beat(self.mode.name, self.steps, True)
        outputs = list(self._step())
        heartbeat.beat(self.mode.name, self.steps, False)
        for out in outputs:
            rid = out.request_id
            if self.abort_due.get(rid) and out.finish_reason == "abort":
                self.abort_due[rid] -= 1   # the final output of an accepted abort
                if not self.abort_due[rid]:
                    del self.abort_due[rid]
            elif rid in self.live and not self.abort_due.get(rid):
                if out.finish_reason is not None:
                    self.live.discard(rid)
            else:
                raise InvariantViolation(f"{self.mode.name}: output {list(out.token_ids)} "
                                         f"{out.finish_reason} for {rid!r}, which is not live "
                                         f"(finished, aborted or never added) or whose abort "
                                         f"output is still due")
            if out.finish_reason is not None:
                self.finished_outputs += 1
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.live or self.abort_due)

    def stats(self) -> dict:
        return {"num_steps": self.steps, "finished_outputs": self.finished_outputs}

    def check_invariants(self) -> None:
        """Override to check the engine's own state (blocks, slots) after every step."""

    # -- what a subclass maps --------------------------------------------------------------------

    def _add(self, request_id: str, prompt: list[int], params: SamplingParams,
             arrival_index: int) -> None:
        raise NotImplementedError

    def _abort(self, request_id: str) -> bool:
        raise NotImplementedError

    def _step(self) -> Sequence[Output]:
        raise NotImplementedError
