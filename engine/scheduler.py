"""Continuous-batching scheduler: token budget, chunked prefill, recompute preemption, abort.

Scheduling is token-based as in vLLM V1: every request has ``num_computed_tokens`` and a target
(prompt + output + placeholders); each step gives each running request, then waiting requests,
up to the remaining token budget. A row *samples* when it reaches the end of its known tokens.
Scheduling a sampling row adds a placeholder for the token it will produce; the output update
replaces the placeholder by the real id. In sync mode that happens before the next schedule; in
async mode the next step is scheduled first and feeds the placeholder from the device.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import EngineConfig
from .kv_cache import KVCacheManager
from .request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRow:
    """One request's share of a step: ``num_tokens`` new tokens from position ``start``."""

    request: Request
    start: int
    num_tokens: int
    samples: bool
    is_new: bool


@dataclass
class SchedulerOutput:
    rows: list[ScheduledRow]
    freed_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)


class Scheduler:
    """Decides which requests run in the next step and how many tokens each gets."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._freed: list[str] = []

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        active = self._places_taken()  # before this step's rows: a last row still takes one
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(self._tokens_to_schedule(req), budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.can_allocate(req.request_id, req.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            rows.append(self._schedule_row(req, num_new, is_new=False))
            budget -= num_new
            i += 1
        while (self.waiting and not preempted and budget > 0
               and active < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.num_placeholders:  # preempted with a step in flight: wait for its token
                break
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.can_allocate(req.request_id, req.num_computed_tokens + num_new):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            active += 1
            rows.append(self._schedule_row(req, num_new, is_new=True))
            budget -= num_new
        freed, self._freed = self._freed, []
        return SchedulerOutput(rows, freed)

    def _places_taken(self) -> int:
        """Running requests that count against ``max_num_seqs``: a retiring request (every
        token scheduled, the last in flight) runs no more rows, so it holds its slot and blocks
        until that step is collected, not a place (async would admit late at each turnover)."""
        return sum(not self._retiring(r) for r in self.running)

    @staticmethod
    def _retiring(req: Request) -> bool:
        return req.num_output_tokens_with_placeholders >= req.sampling_params.max_tokens

    def _tokens_to_schedule(self, req: Request) -> int:
        if self._retiring(req):
            return 0
        return req.num_tokens_with_placeholders - req.num_computed_tokens

    def _schedule_row(self, req: Request, num_new: int, is_new: bool) -> ScheduledRow:
        start = req.num_computed_tokens
        self.kv.allocate(req.request_id, start + num_new)
        req.num_computed_tokens += num_new
        samples = req.num_computed_tokens == req.num_tokens_with_placeholders
        if samples:
            req.num_placeholders += 1
        return ScheduledRow(req, start, num_new, samples, is_new)

    def _preempt(self, req: Request) -> None:
        """Recompute preemption: drop the KV blocks, re-queue at the front of the waiting line."""
        self.running.remove(req)
        self.kv.free(req.request_id)
        self._freed.append(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def update_from_output(self, out: SchedulerOutput, sampled: list[int | None],
                           logprobs: list[dict[int, float] | None]) -> list[Request]:
        """Replace placeholders by sampled ids; returns requests that changed (new token or end)."""
        changed: list[Request] = []
        for row, token, lp in zip(out.rows, sampled, logprobs):
            if not row.samples:
                continue
            req = row.request
            if req.is_finished:  # ended (abort, error) with this step in flight
                continue
            req.num_placeholders -= 1
            assert req.num_placeholders >= 0, f"{req.request_id}: negative placeholders"
            if token is None:
                continue
            req.output_token_ids.append(token)
            if req.logprobs is not None:
                req.logprobs.append(lp)
            reason = req.stop_reason_for(token)
            if reason is not None:
                self.finish(req, reason)
            changed.append(req)
        return changed

    def finish(self, req: Request, reason: str) -> None:
        """End ``req`` (stop, length, abort or error) and free its blocks. Its placeholders go
        too: the steps still in flight for it skip it when they are collected."""
        if req.is_finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        self._freed.append(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.num_placeholders = 0
        del self.requests[req.request_id]
