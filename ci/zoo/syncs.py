"""Hidden host syncs: the host waits for the device where async scheduling needs it not to."""
from __future__ import annotations

import logging

from lockstep.engine.core import EngineCore
from lockstep.engine.input_batch import InputBatch
from lockstep.engine.model_runner import ModelRunner, PendingOutput

from .registry import injection
from .witness import LAZY, Witness

logger = logging.getLogger("lockstep.engine")
_real_prepare = InputBatch.prepare
_real_execute = ModelRunner.execute_model
_real_get_output = PendingOutput.get_output
_real_step = EngineCore.step
_real_launch = EngineCore._launch
TRT_INPUT_POS = ("NVIDIA/TensorRT-LLM#15289 (adjusting input positions synced the host and "
                 "broke overlap)")


def _prepare_checking_positions(self, out, block_tables):
    inputs = _real_prepare(self, out, block_tables)
    assert inputs.positions.max().item() < inputs.attn.kv_len, "positions past the span"  # BUG
    return inputs


@injection("syncs", (TRT_INPUT_POS,), Witness("mixed_batch", LAZY, ("sync",)))
def item_in_input_prep(patch) -> None:
    """InputBatch.prepare checks the staged positions with ``.item()``.

    A sanity check on a device value: the host waits for the device in every step's input
    preparation, which serialises async scheduling. Both modes.
    """
    patch.setattr(InputBatch, "prepare", _prepare_checking_positions)


def _execute_logging(self, sched, block_tables, step):
    pending = _real_execute(self, sched, block_tables, step)
    logger.debug(f"step {step}: sampled {pending._result.tokens}")  # BUG: formats eagerly
    return pending


@injection("syncs", ("vllm-project/vllm#34667 (an unintended CPU-GPU sync in the model runner)",),
           Witness("mixed_batch", LAZY, ("sync",)))
def device_tensor_in_a_debug_log(patch) -> None:
    """ModelRunner.execute_model logs the step's sampled ids with an f-string.

    The f-string formats the device tensor even when debug logging is off: printing a device
    tensor copies it to the host and waits for the step. Both modes.
    """
    patch.setattr(ModelRunner, "execute_model", _execute_logging)


def _get_output_from_the_device(self):
    output = _real_get_output(self)
    output.sampled = [t if s is not None else None  # BUG: a blocking read of device memory
                      for t, s in zip(self._result.tokens.tolist(), output.sampled)]
    return output


@injection("syncs", ("vllm-project/vllm#36013 (the sampled ids' D2H path)",),
           Witness("mixed_batch", LAZY, ("sync",)))
def blocking_read_of_the_device_ids(patch) -> None:
    """PendingOutput.get_output reads the sampled ids from the device tensor with ``.tolist()``
    instead of from the pinned copy.

    A blocking device-to-host copy outside the collect's named wait. Both modes.
    """
    patch.setattr(PendingOutput, "get_output", _get_output_from_the_device)


def _step_then_synchronize(self):
    outputs = _real_step(self)
    self.device.synchronize()  # BUG: "flush so step timings are accurate"
    return outputs


@injection("syncs", ("NVIDIA/TensorRT-LLM#6976 (a synchronize that stopped batches "
                     "overlapping)",), Witness("mixed_batch", LAZY, ("sync",)))
def synchronize_after_each_step(patch) -> None:
    """EngineCore.step ends with a device-wide synchronize.

    The host waits for the step it just launched: the next step can no longer be prepared
    while this one runs. Both modes (async loses its overlap).
    """
    patch.setattr(EngineCore, "step", _step_then_synchronize)


def _launch_after_waiting(self):
    if self._in_flight:  # BUG: "make sure the previous step's ids are ready"
        self._in_flight[-1][2]._copied.synchronize()
    return _real_launch(self)


@injection("syncs", ("vllm-project/vllm#27615 (a needless sync removed from the async path)",),
           Witness("mixed_batch", LAZY, ("sync", "overlap")))
def launch_waits_for_the_previous_step(patch) -> None:
    """EngineCore._launch waits for the previous step's sampled ids before scheduling.

    An event wait outside the collect: async mode degenerates to sync mode plus a queue.
    Async only.
    """
    patch.setattr(EngineCore, "_launch", _launch_after_waiting)


_real_has_unfinished = EngineCore.has_unfinished_requests


def _has_unfinished_draining(self):
    self.device.synchronize()  # BUG: "no step may be pending when we decide"
    return _real_has_unfinished(self)


@injection("syncs", ("NVIDIA/TensorRT-LLM#6976",), Witness("mixed_batch", LAZY, ("sync",)))
def synchronize_between_steps(patch) -> None:
    """EngineCore.has_unfinished_requests synchronizes the device before answering.

    The serving loop calls it between steps, outside ``step()``: a device-wide synchronize
    on every iteration, invisible to a guard that watches only the step. Both modes.
    """
    patch.setattr(EngineCore, "has_unfinished_requests", _has_unfinished_draining)


def _get_output_polling(self):
    while not self._copied.query():  # BUG: a poll instead of the named wait
        pass
    return _real_get_output(self)


@injection("collect", ("vllm-project/vllm#39115 (the waiter blocked on the wrong step's "
                       "event)",), Witness("edge_lengths", LAZY, ("hang",)))
def collect_polls_instead_of_waiting(patch) -> None:
    """PendingOutput.get_output spins on ``Event.query()`` instead of waiting ("no blocking
    sync").

    A poll never drives the device: where device work runs only when the host waits (sim lazy),
    the collect spins forever inside one step; on a GPU it is a busy-wait that burns the host
    core the next step needs. Both modes.
    """
    patch.setattr(PendingOutput, "get_output", _get_output_polling)
