"""Output collection, placeholder accounting, budgets, stops and aborts (scheduler and core)."""
from __future__ import annotations

from lockstep.engine.core import EngineCore
from lockstep.engine.request import Request, RequestStatus
from lockstep.engine.scheduler import Scheduler

from .registry import injection
from .witness import LAZY, SYNC, Witness

_real_preempt = Scheduler._preempt


_real_collect = EngineCore._collect


def _collect_newest(self):
    self._in_flight.rotate(1)  # BUG: the newest step comes first, and popleft() takes it
    return _real_collect(self)


@injection("collect", ("sgl-project/sglang#5788 (launch_done could be assigned to the wrong "
                       "batch)",), Witness("mixed_batch", LAZY, ("outputs", "crash")))
def collect_newest_step_first(patch) -> None:
    """EngineCore._collect takes the newest step in flight instead of the oldest.

    With two steps in flight, step N+1's ids are applied before step N's: each request's
    tokens arrive out of order. Async only.
    """
    patch.setattr(EngineCore, "_collect", _collect_newest)


def _step_collecting_only_when_full(self):
    outputs, self._pending_outputs = self._pending_outputs, []
    if len(self._in_flight) < self._queue_depth and self.scheduler.has_unfinished():
        self._launch()
    if len(self._in_flight) == self._queue_depth:  # BUG: and when nothing more was launched?
        outputs += self._collect()
    return outputs + self._pending_outputs_now()


@injection("collect", ("vllm-project/vllm#23770 (finished requests not processed in the "
                       "async batch-queue path)",), Witness("edge_lengths", LAZY, ("hang",)))
def collect_only_when_queue_full(patch) -> None:
    """EngineCore.step collects a step only once the in-flight queue is full.

    When nothing can be launched (every request has all its tokens scheduled), the last step
    in flight is never collected: the engine spins without finishing. Async only; sync mode's
    queue of one is full after every launch.
    """
    patch.setattr(EngineCore, "_step", _step_collecting_only_when_full)


def _places_taken_by_every_running_request(self):
    return len(self.running)  # BUG: a retiring request holds its place until it is collected


@injection("placeholders", ("vllm-project/vllm#45257 (max_num_seqs counted requests whose last "
                            "token was in flight: prefill nodes with max_tokens=1 ran below it); "
                            "vllm-project/vllm#45339",),
           Witness("turnover", LAZY, ("wasted work",)))
def admission_counts_retiring_requests(patch) -> None:
    """Scheduler admission counts every running request against ``max_num_seqs``, including
    the ones whose last token is in flight.

    The old admission check. In sync mode a retiring request is collected before the next
    schedule, so nothing changes; in async mode it stays in ``running`` for one more step with
    no rows, so at every turnover the engine admits late: smaller steps, or an empty schedule,
    and more steps for the same tokens. Tokens stay right. Async only.
    """
    patch.setattr(Scheduler, "_places_taken", _places_taken_by_every_running_request)


def _preempt_dropping_placeholders(self, req):
    _real_preempt(self, req)
    req.num_placeholders = 0  # BUG: the step in flight still owes this request its token


@injection("placeholders", ("vllm-project/vllm#48245 (num_output_placeholders underflow on "
                            "preemption)",), Witness("tight_cache", LAZY, ("crash",)))
def preemption_resets_placeholders(patch) -> None:
    """Recompute preemption resets the request's placeholder count.

    The step in flight then delivers a token for a request that owes none: the count goes
    negative (the engine's assertion fires and the step's requests are lost). Async only, with
    a preemption while a step is in flight.
    """
    patch.setattr(Scheduler, "_preempt", _preempt_dropping_placeholders)


def _stop_reason_counting_placeholders(self, token):
    params = self.sampling_params
    n_out = len(self.output_token_ids)
    if n_out > params.min_tokens and (token in params.stop_token_ids or (
            token in self.eos_token_ids and not params.ignore_eos)):
        return "stop"
    if n_out + self.num_placeholders >= params.max_tokens:  # BUG: placeholders are not tokens
        return "length"
    return None


@injection("placeholders", ("vllm-project/vllm#49860 (placeholders left in the count skewed the "
                            "finish check)",), Witness("mixed_batch", LAZY, ("outputs",)))
def finish_check_counts_placeholders(patch) -> None:
    """Request.stop_reason_for counts in-flight placeholders as generated tokens.

    With a step in flight, a request finishes "length" one token short of max_tokens.
    Async only.
    """
    patch.setattr(Request, "stop_reason_for", _stop_reason_counting_placeholders)


def _tokens_to_schedule_off_by_one(self, req):
    if req.num_output_tokens_with_placeholders > req.sampling_params.max_tokens:  # BUG: >=
        return 0
    return req.num_tokens_with_placeholders - req.num_computed_tokens


@injection("placeholders", ("vllm-project/vllm#27922 (async scheduling ran one step past "
                            "max_tokens)",), Witness("mixed_batch", LAZY, ("wasted work",)))
def schedule_past_max_tokens(patch) -> None:
    """Scheduler._tokens_to_schedule compares with ``>`` instead of ``>=``.

    With a placeholder in flight for the last allowed token, async scheduling runs the request
    one more step: a wasted forward pass and KV past prompt + max_tokens - 1 (the extra token
    is dropped, so outputs stay right). Async only.
    """
    patch.setattr(Scheduler, "_tokens_to_schedule", _tokens_to_schedule_off_by_one)


_real_schedule = Scheduler.schedule


def _schedule_admitting_after_preemption(self):
    before = self.num_preemptions
    out = _real_schedule(self)
    if self.num_preemptions == before:
        return out
    budget = self.config.max_num_batched_tokens - out.num_tokens
    # BUG: the admission loop the real schedule skips after a preemption, run anyway
    while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
        req = self.waiting[0]
        num_new = min(req.num_tokens - req.num_computed_tokens, budget)
        if req.num_placeholders or not self.kv.can_allocate(
                req.request_id, req.num_computed_tokens + num_new):
            break
        self.waiting.popleft()
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        out.rows.append(self._schedule_row(req, num_new, is_new=True))
        budget -= num_new
    return out


@injection("placeholders", ("vllm-project/vllm V1 scheduler (no new requests in a step that "
                            "preempted)",),
           Witness("tight_cache", LAZY, ("wasted work", "outputs")))
def admit_in_a_preempting_step(patch) -> None:
    """Scheduler.schedule admits waiting requests in a step that preempted.

    The request just preempted (at the front of the waiting line) is admitted again at once
    into the blocks it gave up, and is preempted again next step: the cache thrashes, every
    re-admission recomputes the whole history. Both modes, under a tight KV cache.
    """
    patch.setattr(Scheduler, "schedule", _schedule_admitting_after_preemption)


def _update(self, out, sampled, logprobs, skip, lookup=lambda self, row: row.request,
            check: bool = True) -> list:
    """Scheduler.update_from_output with the skip rule, the row's request lookup and the
    placeholder check as parameters (the injections change one of them)."""
    changed = []
    for row, token, lp in zip(out.rows, sampled, logprobs):
        if not row.samples:
            continue
        req = lookup(self, row)
        if req is None:
            continue
        if not req.is_finished:  # a finished request's placeholders went with it
            req.num_placeholders -= 1
            assert not check or req.num_placeholders >= 0, \
                f"{req.request_id}: negative placeholders"
        if skip(req) or token is None:
            continue
        req.output_token_ids.append(token)
        if req.logprobs is not None and lp is not None:
            req.logprobs.append(lp)
        reason = req.stop_reason_for(token)
        if reason is not None:
            self.finish(req, reason)
        changed.append(req)
    return changed


@injection("stops", ("sgl-project/sglang#6184 (the overlap scheduler's delayed token sent "
                     "after the request ended)",), Witness("stops_in_flight", LAZY,
                                                          ("outputs",)))
def token_after_stop(patch) -> None:
    """Scheduler.update_from_output drops the in-flight token of an aborted request only.

    A request that stopped on a stop id at the previous collect still receives the token of
    the step launched before that collect: a token after the stop. Async only.
    """
    patch.setattr(Scheduler, "update_from_output",
                  lambda self, out, s, lp: _update(self, out, s, lp,
                                                   lambda r: r.finish_reason == "abort"))


@injection("stops", ("sgl-project/sglang#6184 (no dummy output from the delayed token after "
                     "an abort)",), Witness("aborts", LAZY, ("outputs",)))
def token_after_abort(patch) -> None:
    """Scheduler.update_from_output drops in-flight tokens of requests that stopped or hit
    their length, but not of aborted ones.

    A request aborted with a step in flight receives that step's token after its "abort"
    output. Async only.
    """
    patch.setattr(Scheduler, "update_from_output",
                  lambda self, out, s, lp: _update(self, out, s, lp,
                                                   lambda r: r.finish_reason in ("stop",
                                                                                 "length")))


def _update_by_id(self, out, sampled, logprobs):
    # BUG: the request is looked up by id (None once it ended), not the row's own; without the
    # engine's placeholder assertion the bug shows as wrong tokens
    return _update(self, out, sampled, logprobs, lambda r: r.is_finished,
                   lookup=lambda self, row: self.requests.get(row.request.request_id),
                   check=False)


@injection("lifecycle", ("vllm-project/vllm#42523 (an in-flight batch's output applied to a "
                         "new request reusing a cancelled id)",),
           Witness("reused_ids", LAZY, ("outputs", "crash")))
def stale_frame_applied_to_reused_id(patch) -> None:
    """Scheduler.update_from_output finds each row's request by id, as vLLM's scheduler does.

    A step still in flight when its request stopped applies its token (and placeholder) to the
    new request that reuses the id. Async only, with id reuse right after a stop or an abort.
    """
    patch.setattr(Scheduler, "update_from_output", _update_by_id)


def _preempt_keeping_the_table(self, req):
    self.running.remove(req)
    self.kv.pool.give_back(list(self.kv.block_tables.get(req.request_id, ())))  # BUG: kept too
    self._freed.append(req.request_id)
    req.num_computed_tokens = 0
    req.status = RequestStatus.WAITING
    self.waiting.appendleft(req)
    self.num_preemptions += 1


@injection("lifecycle", ("sgl-project/sglang#18694 (a double free of KV blocks around "
                         "preemption)",), Witness("tight_cache", SYNC, ("crash", "outputs")))
def preemption_frees_blocks_it_keeps(patch) -> None:
    """Recompute preemption returns the request's blocks to the pool but keeps its block table.

    The resumed request grows the stale table, so it shares blocks with whoever took them
    from the pool (its KV is overwritten), and its finish frees them a second time. Both modes.
    """
    patch.setattr(Scheduler, "_preempt", _preempt_keeping_the_table)


def _finish(self, req, reason, frees_blocks: bool, frees_slot: bool) -> None:
    """Scheduler.finish, with freeing the blocks and the slot as parameters."""
    if req.is_finished:
        return
    if req.status is RequestStatus.RUNNING:
        self.running.remove(req)
    else:
        self.waiting.remove(req)
    if frees_blocks:
        self.kv.free(req.request_id)
    if frees_slot:
        self._freed.append(req.request_id)
    req.status = RequestStatus.FINISHED
    req.finish_reason = reason
    req.num_placeholders = 0
    del self.requests[req.request_id]


def _finish_keeping_blocks_in_flight(self, req, reason):
    # BUG: "freed once the in-flight step is collected" - and then never
    _finish(self, req, reason, frees_blocks=not (reason == "abort" and req.num_placeholders),
            frees_slot=True)


@injection("lifecycle", ("vllm-project/vllm#45357 (block freeing deferred until in-flight steps "
                         "finish)",), Witness("aborts", LAZY, ("leak",)))
def abort_in_flight_leaks_blocks(patch) -> None:
    """Scheduler.finish defers freeing an aborted request's KV blocks while a step is in flight
    ("the step still writes them"), and nothing frees them later.

    Every abort with a step in flight leaks the request's blocks. Async only.
    """
    patch.setattr(Scheduler, "finish", _finish_keeping_blocks_in_flight)


def _finish_keeping_slot(self, req, reason):
    # BUG: the slot of a request that ran to max_tokens is never freed
    _finish(self, req, reason, frees_blocks=True, frees_slot=reason != "length")


@injection("lifecycle", ("vllm-project/vllm#23770 (finished requests not processed in one "
                         "path)",), Witness("slot_reuse", LAZY, ("leak", "crash")))
def finish_on_length_keeps_slot(patch) -> None:
    """Scheduler.finish does not release the slot of a request that finished on its length.

    The slot stays mapped to the finished request; once every slot leaked the next admission
    fails. Both modes.
    """
    patch.setattr(Scheduler, "finish", _finish_keeping_slot)


_real_add_checked = EngineCore.add_checked_request
_real_abort = EngineCore.abort_request
_real_step = EngineCore.step
_real_has_unfinished = EngineCore.has_unfinished_requests


def _inbox(core: EngineCore) -> list:
    return core.__dict__.setdefault("_zoo_inbox", [])


def _add_at_next_step(self, request_id, prompt, params):
    _inbox(self).append(("add", request_id, prompt, params, self._num_added))


def _abort_at_next_step(self, request_id):
    queued = any(c[0] == "add" and c[1] == request_id for c in _inbox(self))
    if request_id not in self.scheduler.requests and not queued:
        return False
    _inbox(self).append(("abort", request_id))
    return True


def _step_applying_adds_then_aborts(self):
    inbox, self.__dict__["_zoo_inbox"] = _inbox(self), []
    for _, request_id, prompt, params, num_added in (c for c in inbox if c[0] == "add"):
        self._num_added = num_added
        _real_add_checked(self, request_id, prompt, params)
    for _, request_id in (c for c in inbox if c[0] == "abort"):  # BUG: after every add, by id
        _real_abort(self, request_id)
    return _real_step(self)


@injection("lifecycle", ("huggingface/transformers#48918 (request ids as keys of continuous "
                         "batching state); the cancel-then-re-add finding in docs/engines.md",),
           Witness("client_orders", SYNC, ("crash",)))
def aborts_applied_after_the_steps_adds(patch) -> None:
    """EngineCore queues adds and aborts and applies them at the next step: every add first,
    then every abort, by id.

    A client that aborts a request and adds its id again before the next step gets the new
    request refused (its id is still held) or aborted in place of the old one. Both modes;
    only a client order "abort x, add x" inside one step shows it.
    """
    patch.setattr(EngineCore, "add_checked_request", _add_at_next_step)
    patch.setattr(EngineCore, "abort_request", _abort_at_next_step)
    patch.setattr(EngineCore, "step", _step_applying_adds_then_aborts)
    patch.setattr(EngineCore, "has_unfinished_requests",
                  lambda self: bool(_inbox(self)) or _real_has_unfinished(self))
