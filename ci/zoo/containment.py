"""Fault containment: what the engine does after one phase of a step fails.

A fault in one step must end only the requests that step touched and leave the engine serving
the rest. Both bugs here pass every fault-free check: only an injected fault (the gate's
``faults`` check, :mod:`lockstep.property_tests.faults`) reaches them.
"""
from __future__ import annotations

from lockstep.engine.core import EngineCore, RequestOutput

from .registry import injection
from .witness import LAZY, Witness

CONTAINMENT_REFS = (
    "jundot/omlx#1315 (an exception in the engine loop left a request in none of the queues the "
    "failure sweep covers: its HTTP request hung forever)",
    "SX-Aurora/aveo#11 (requests in the in-flight queue had to get the error after an exception, "
    "or waiting for their results hung)",
    "vllm-project/vllm#9263 (with async output processing, a request the scheduler ignored "
    "never returned)",
)


def _launch_dropping_in_flight(self) -> bool:
    step = self.num_steps + 1
    try:
        with self.timeline.host("schedule", step):
            sched = self.scheduler.schedule()
            self.runner.release(sched.freed_request_ids)
    except BaseException as exc:
        self._contain(exc, "schedule", step, list(self.scheduler.running))
        return False
    if not sched.rows:
        return False
    self.num_steps = step
    try:
        with self.device.step_scope(step):
            pending = self.runner.execute_model(sched, self.kv.block_tables, step)
    except BaseException as exc:
        # BUG: "after a failed launch the stream's queue is suspect: drop what it holds"; a
        # request whose last token was in an earlier step in flight never gets it
        self._in_flight.clear()
        self._contain(exc, "launch", step, [row.request for row in sched.rows])
        return False
    self._in_flight.append((step, sched, pending))
    return True


@injection("containment", CONTAINMENT_REFS,
           Witness("retiring", LAZY, ("hang", "leak", "outputs"), fault=("launch", 2)))
def launch_failure_drops_steps_in_flight(patch) -> None:
    """EngineCore._launch, on a failed launch, clears the queue of steps in flight before ending
    the failing step's requests.

    Harmless when every request in flight is also in the failing step (they all end with
    "error" anyway); when a request's last token is in flight and the failing step does not
    hold it, that token is never collected: the request never finishes, its blocks and slot
    stay held, and the engine never drains. Async only (sync has no step in flight at a
    launch).
    """
    patch.setattr(EngineCore, "_launch", _launch_dropping_in_flight)


def _collect_popping_after_update(self) -> list[RequestOutput]:
    step, sched, pending = self._in_flight[0]   # BUG: popped only once the update succeeded,
    try:                                        # "so a failure can be retried"
        with self.timeline.host("collect", step):
            result = pending.get_output()
            changed = self.scheduler.update_from_output(sched, result.sampled, result.logprobs)
            self._in_flight.popleft()
            return [RequestOutput(r) for r in changed]
    except BaseException as exc:
        self._contain(exc, "collect", step, [row.request for row in sched.rows])
        return []


@injection("containment", CONTAINMENT_REFS,
           Witness("retiring", LAZY, ("hang", "crash", "outputs", "leak"), fault=("device", 2)))
def collect_pops_in_flight_entry_after_update(patch) -> None:
    """EngineCore._collect leaves the step at the head of the queue until its output update
    succeeded, meaning to retry a failed one.

    After a failed output wait (the step's device work failed) the failed step stays at the
    head of the queue: every later collect takes it again and fails again, no later step's
    tokens are ever collected, and the engine never drains. (After a failed update the retry
    happens to be harmless: the step's requests have ended.) Both modes.
    """
    patch.setattr(EngineCore, "_collect", _collect_popping_after_update)
