"""Invariants checked after every step: Lockstep's engine internals, and every engine's outputs.

:class:`EngineInvariants` watches one :class:`~lockstep.engine.core.EngineCore` (it wraps the
instance's ``schedule`` and ``execute_model`` to see each step as it is planned and launched):
KV blocks conserved and never shared, slots conserved, placeholders within the steps in flight,
budgets respected, nothing scheduled past prompt + max_tokens - 1 computed tokens, no request
admitted in a step that preempted, and on ``sim`` lazy in async mode, step N+1 launched without
forcing step N's device work to complete.

:class:`OutputRules` checks what any engine emits: nothing after a finish, ids only ever
appended, "length" exactly at max_tokens, min_tokens respected, stops where they belong.
"""
from __future__ import annotations

from collections import Counter

import sync_guard
from lockstep.engine import SamplingParams

from .attribution import attribution_errors


class InvariantViolation(AssertionError):
    """An engine broke one of the harness's invariants (the message says which and where)."""


class EngineInvariants:
    def __init__(self, core) -> None:
        self.core = core
        self.overlapped_launches = 0
        self.launches_after_forced_wait = 0
        self.attributed_steps = 0
        self.rows_per_step: list[int] = []   # of each launched step (the occupancy rule)
        self._launched: list[int] = []   # launched since the timeline was last checked
        self._violations: list[str] = []
        cfg = core.config
        self._watch_overlap = (cfg.async_scheduling and cfg.device == "sim"
                               and cfg.sim_policy == "lazy")
        scheduler, runner = core.scheduler, core.runner
        schedule, execute = type(scheduler).schedule, type(runner).execute_model

        def checked_schedule():
            before = scheduler.num_preemptions
            out = schedule(scheduler)
            self._check_schedule(out, preempted=scheduler.num_preemptions > before)
            return out

        def checked_execute(sched, block_tables, step):
            previous = core._in_flight[-1] if self._watch_overlap and core._in_flight else None
            pending = execute(runner, sched, block_tables, step)
            self._launched.append(step)
            self.rows_per_step.append(len(sched.rows))
            if previous is not None:
                self._check_overlap(previous, step)
            return pending

        scheduler.schedule = checked_schedule
        runner.execute_model = checked_execute

    def counters(self) -> dict:
        return {"overlapped_launches": self.overlapped_launches,
                "attributed_steps": self.attributed_steps,
                "rows_per_step": list(self.rows_per_step)}

    def check(self) -> None:
        core, problems = self.core, self._violations
        self._violations = []
        kv, sched = core.kv, core.scheduler
        held = Counter(b for table in kv.block_tables.values() for b in table)
        free = list(kv.pool._free)
        if len(free) + sum(held.values()) != kv.pool.num_blocks:
            problems.append(f"KV blocks not conserved: {len(free)} free + {sum(held.values())} "
                            f"held != {kv.pool.num_blocks} total")
        shared = [b for b, n in held.items() if n > 1]
        if shared or set(free) & set(held):
            problems.append(f"KV blocks {sorted(set(shared) | (set(free) & set(held)))} are held "
                            f"twice or both held and free")
        live = set(sched.requests)
        if not set(kv.block_tables) <= live:
            problems.append(f"finished requests {sorted(set(kv.block_tables) - live)} hold KV "
                            f"blocks")
        batch = core.runner.input_batch
        slots = list(batch.slot_of.values()) + batch._free_slots
        if sorted(slots) != list(range(core.config.num_slots)):
            problems.append(f"slots not conserved: in use {sorted(batch.slot_of.values())}, "
                            f"free {sorted(batch._free_slots)}")
        stale = set(batch.slot_of) - live - set(sched._freed)  # freed ones go at next schedule
        if stale:
            problems.append(f"finished requests {sorted(stale)} keep their slots")
        in_flight = len(core._in_flight)
        for rid, req in sched.requests.items():
            if not 0 <= req.num_placeholders <= in_flight:
                problems.append(f"{rid}: {req.num_placeholders} placeholders with {in_flight} "
                                f"steps in flight")
        if self._launched and not core.has_unfinished_requests():
            problems += self._check_attribution()
        if problems:
            raise InvariantViolation("; ".join(problems))

    def _check_attribution(self) -> list[str]:
        """Once the engine is idle (reading device spans waits for the device): the timeline's
        spans belong to their steps (:mod:`.attribution`)."""
        timeline, launched, self._launched = self.core.timeline, self._launched, []
        if not timeline.enabled:
            return []
        with sync_guard.allow("harness: the timeline's device spans, read with the engine idle"):
            spans = timeline.device_spans()
        self.attributed_steps += len(launched)
        tolerance = timeline.anchor_error_ns + (1000 if self.core.device.kind == "cuda" else 0)
        return [f"timeline: {p}" for p in attribution_errors(timeline.host_spans, spans,
                                                            launched, tolerance)]

    def _check_schedule(self, out, preempted: bool) -> None:
        cfg = self.core.config
        admitted = [row.request.request_id for row in out.rows if row.is_new]
        if preempted and admitted:
            self._violations.append(f"requests {admitted} admitted in a step that preempted "
                                    f"(the cache thrashes: wait for the next step)")
        if out.num_tokens > cfg.max_num_batched_tokens:
            self._violations.append(f"step schedules {out.num_tokens} tokens, budget "
                                    f"{cfg.max_num_batched_tokens}")
        if len(out.rows) > cfg.max_num_seqs:
            self._violations.append(f"step schedules {len(out.rows)} rows, max_num_seqs "
                                    f"{cfg.max_num_seqs}")
        ids = [row.request.request_id for row in out.rows]
        if len(set(ids)) != len(ids):
            self._violations.append(f"a request is scheduled twice in one step: {ids}")
        for row in out.rows:
            req = row.request
            limit = req.num_prompt_tokens + req.sampling_params.max_tokens - 1
            if req.num_computed_tokens > limit:
                self._violations.append(
                    f"{req.request_id}: scheduled to {req.num_computed_tokens} computed tokens, "
                    f"past prompt + max_tokens - 1 = {limit}")

    def _check_overlap(self, previous, step: int) -> None:
        """On sim lazy, device work runs only when the host waits: if step N's device work (its
        forward pass and sampler, not only its output copy) had run by the time step N+1's
        launch returned, the host waited for it while preparing N+1. Judged by what the device
        did, not by the order of the calls: a fence that waits for more than the staging
        copies fails here whatever it is called."""
        previous_step, _, pending = previous
        if pending.device_done.is_done():
            self._violations.append(f"no overlap: step {previous_step}'s device work had "
                                    f"completed when step {step}'s launch returned (sim lazy)")
        else:
            self.overlapped_launches += 1


class OutputRules:
    """Per-request checks on the outputs an engine emits, for any engine."""

    def __init__(self, params: SamplingParams, eos_token_ids: tuple[int, ...], name: str) -> None:
        self.params = params
        self.stops = set(params.stop_token_ids) | (set() if params.ignore_eos
                                                  else set(eos_token_ids))
        self.name = name
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def observe(self, token_ids, finish_reason: str | None) -> None:
        p, tokens, name = self.params, list(token_ids), self.name
        if self.finish_reason is not None:
            raise InvariantViolation(f"{name}: output after it finished "
                                     f"({self.finish_reason}): {tokens}")
        if tokens[:len(self.tokens)] != self.tokens:
            raise InvariantViolation(f"{name}: emitted ids changed: {self.tokens} -> {tokens}")
        if len(tokens) > p.max_tokens:
            raise InvariantViolation(f"{name}: {len(tokens)} tokens, max_tokens={p.max_tokens}")
        early = [t for t in tokens[:p.min_tokens] if t in self.stops]
        if early:
            raise InvariantViolation(f"{name}: stop id {early[0]} within the first "
                                     f"min_tokens={p.min_tokens} tokens: {tokens}")
        stop_at = next((i for i, t in enumerate(tokens) if t in self.stops and i >= p.min_tokens),
                       None)
        if stop_at is not None and stop_at < len(tokens) - 1:
            raise InvariantViolation(f"{name}: tokens after stop id {tokens[stop_at]} at "
                                     f"position {stop_at}: {tokens}")
        if finish_reason == "length" and len(tokens) != p.max_tokens:
            raise InvariantViolation(f"{name}: finish 'length' after {len(tokens)} tokens, "
                                     f"max_tokens={p.max_tokens}")
        if finish_reason == "stop" and stop_at != len(tokens) - 1:
            raise InvariantViolation(f"{name}: finish 'stop' without a stop id at the end: "
                                     f"{tokens}")
        if finish_reason is None and (stop_at is not None or len(tokens) == p.max_tokens):
            raise InvariantViolation(f"{name}: not finished after {tokens} (max_tokens="
                                     f"{p.max_tokens}, stops {sorted(self.stops)[:8]})")
        self.tokens, self.finish_reason = tokens, finish_reason
