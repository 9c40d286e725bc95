"""Output collection that depends on timing: what the host knows when it schedules.

With ``collect="eager"`` the engine collects every step whose outputs already reached the host
before it schedules the next one, so what the host knows at a schedule depends on the device's
timing. The tokens must not: the gate runs the eager collect on sim threaded (timing decides)
and skewed (the compute stream done, the outputs' copy not) beside the lazy collect.
"""
from __future__ import annotations

from lockstep.engine.model_runner import PendingOutput

from .registry import injection
from .witness import SKEWED_EAGER_COLLECT, Witness

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
    host buffers before the copy wrote them: stale or garbage tokens. Async, eager collect.
    """
    patch.setattr(PendingOutput, "ready", _ready_when_computed)
    patch.setattr(PendingOutput, "get_output", _get_output_trusting_ready)
