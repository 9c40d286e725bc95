"""Output collection that depends on timing: what the host knows, and which step a span names.

With ``collect="eager"`` the engine collects every step whose outputs already reached the host
before it schedules the next one, so what the host knows at a schedule depends on the device's
timing. The tokens must not: the gate runs the eager collect on sim threaded (timing decides)
and skewed (the compute stream done, the outputs' copy not) beside the lazy collect.
"""
from __future__ import annotations

from lockstep.engine.core import EngineCore
from lockstep.engine.model_runner import PendingOutput
from lockstep.engine.request import RequestOutput

from .registry import injection
from .witness import LAZY, SKEWED_EAGER_COLLECT, Witness

_real_get_output = PendingOutput.get_output


def _ready_when_computed(self) -> bool:
    self.found_ready = self.device_done.query()  # BUG: the step's compute, not its outputs' copy
    return self.found_ready


def _get_output_trusting_ready(self):
    if getattr(self, "found_ready", False):  # "the collect saw it arrive: no second wait"
        return self._assemble(self._host[0].tolist())
    return _real_get_output(self)


@injection("collect", ("tenstorrent/tt-metal#47359 (a one-step-stale last token that only some "
                       "timings reach under async scheduling)",
                       "intel/torch-xpu-ops#4349 (an event that completed before the "
                       "device-to-host copy it was meant to cover: stale host data)"),
           Witness("retiring", SKEWED_EAGER_COLLECT, ("race", "outputs")))
def eager_collect_trusts_the_compute_event(patch) -> None:
    """PendingOutput.ready asks the step's compute event, and the eager collect then reads the
    outputs without waiting for their copy.

    Only the eager collect calls ``ready``: the lazy collect waits on the copy's event and is
    right, so the bug hides until the host's knowledge depends on timing. Wherever the compute
    finishes before the outputs' copy (sim skewed; a busy copy engine), the host reads the
    host buffers before the copy wrote them: stale or garbage tokens. Async only (with the
    eager collect).
    """
    patch.setattr(PendingOutput, "ready", _ready_when_computed)
    patch.setattr(PendingOutput, "get_output", _get_output_trusting_ready)


def _collect_under_the_newest_step(self):
    step, sched, pending = self._in_flight.popleft()
    try:
        with self.timeline.host("collect", self.num_steps):  # BUG: the step launched last
            result = pending.get_output()
            changed = self.scheduler.update_from_output(sched, result.sampled, result.logprobs)
            return [RequestOutput(r) for r in changed]
    except BaseException as exc:
        self._contain(exc, "collect", step, [row.request for row in sched.rows])
        return []


@injection("timeline", ("NVIDIA/TensorRT-LLM#3785 (iteration statistics that mixed two "
                        "iterations under the overlap scheduler)",
                        "NVIDIA/TensorRT-LLM#11860"), Witness("retiring", LAZY, ("timeline",)))
def collect_span_names_the_newest_step(patch) -> None:
    """EngineCore._collect records its timeline span under ``num_steps``, the step launched
    last, not the step it collects.

    Right in sync mode, where they are the same step; under overlap the collect of step N is
    booked to step N+1, so a trace (or per-step latency) shows step N+1 "collected" before
    its device work ran and step N never collected. Tokens stay right. Async only.
    """
    patch.setattr(EngineCore, "_collect", _collect_under_the_newest_step)
