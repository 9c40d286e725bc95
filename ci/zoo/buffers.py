"""Host staging buffers, D2H destinations, and device buffers shared between streams."""
from __future__ import annotations

import sync_guard
from lockstep.engine import model_runner
from lockstep.engine.device import HostBuffer
from lockstep.engine.input_batch import InputBatch
from lockstep.engine.model_runner import PendingOutput
from lockstep.property_tests.engine_under_test import Mode

from .registry import injection
from .witness import LAZY, SKEWED, Witness

VLLM_CPU_RACE = "vllm-project/vllm#24527 (reused CPU tensors rewritten during async scheduling)"


@injection("staging", (VLLM_CPU_RACE,), Witness("mixed_batch", LAZY, ("race", "outputs")))
def fence_removed(patch) -> None:
    """The input-prep fence removed ("the copy is asynchronous anyway").

    Step N+1's input preparation rewrites both staging buffers while step N's host-to-device
    copy has not read them yet: the device receives N+1's values for N. Async only (in sync
    mode the host waits for each step's tokens, long after its copies ran); on a GPU whenever
    the copy engine lags, on sim lazy every step.
    """
    patch.setattr(InputBatch, "fence", lambda self: None)


@injection("staging", ("vllm-project/vllm#25279 (the #24527 barrier was too narrow)",),
           Witness("mixed_batch", LAZY, ("race", "outputs")))
def fence_too_narrow(patch) -> None:
    """The fence waits for the int64 staging buffer only.

    The float32 buffer (temperature, top-p, min-p, penalties) is rewritten for step N+1 while
    step N's copy of it is pending: step N samples with N+1's parameters. Async only.
    """
    patch.setattr(InputBatch, "fence", lambda self: self.ints.fence())


def _fence_on_everything(self) -> None:
    with sync_guard.allow("input-prep fence"):
        self.ints.device.synchronize()


@injection("staging", ("NVIDIA/TensorRT-LLM#6976 (a wider wait stopped consecutive batches "
                       "overlapping)",), Witness("mixed_batch", LAZY, ("overlap",)))
def fence_too_wide(patch) -> None:
    """The fence waits for the whole device instead of the staging buffers' last copies.

    Tokens stay right, and the wait is still labelled as the allowed input-prep fence, but the
    host now waits for step N's whole forward pass before preparing step N+1: async scheduling
    silently loses its overlap. Async only; only the overlap check can see it.
    """
    patch.setattr(InputBatch, "fence", _fence_on_everything)


def _stage_recording_first(self, parts):
    sizes = [len(p) for p in parts]
    flat: list = []
    for part in parts:
        flat.extend(part)
    total = len(flat)
    if total > self.host.numel():
        self._allocate(max(total, 2 * self.host.numel()))
    self.host_np[:total] = flat
    stream = self.device.compute
    self.copied = self.device.record(stream)  # BUG: recorded before the copy it should follow
    self.device.copy_async(self.dev[:total], self.host[:total], stream)
    return self.dev[:total].split(sizes)


@injection("staging", ("vllm-project/vllm#39115 (the output copy's event waited on the wrong "
                       "step)",), Witness("mixed_batch", LAZY, ("race", "outputs")))
def fence_waits_on_wrong_event(patch) -> None:
    """HostBuffer.stage records the "copied" event before issuing the copy, not after.

    The fence then waits for work that precedes the copy: it returns while the copy is still
    queued, and the next step's preparation rewrites the buffer under it. Async only.
    """
    patch.setattr(HostBuffer, "stage", _stage_recording_first)


_real_stage = HostBuffer.stage


def _stage_then_clear(self, parts):
    views = _real_stage(self, parts)
    self.host_np[:sum(len(p) for p in parts)] = 0  # BUG: the copy may not have read it yet
    return views


@injection("staging", ("NVIDIA/TensorRT-LLM#15546 (a persistent pinned buffer overwritten "
                       "while its H2D copy was pending)",),
           Witness("mixed_batch", LAZY, ("race", "outputs")))
def staging_cleared_after_copy(patch) -> None:
    """HostBuffer.stage zeroes the region it just staged ("no stale ids into the next step").

    The clear runs right after the copy is issued, before the copy reads the buffer: the device
    receives zeros whenever the copy lags. Both modes on a GPU; on sim lazy and threaded.
    """
    patch.setattr(HostBuffer, "stage", _stage_then_clear)


def _get_output_reading_first(self):
    tokens = self._host[0].tolist()  # BUG: read before the copy is known complete
    with sync_guard.allow("collect: the step's sampled ids reach the host"):
        self._copied.synchronize()
    return self._assemble(tokens)


@injection("staging", ("vllm-project/vllm#36013 (pinned D2H destination read before its "
                       "non-blocking copy landed)",), Witness("stops_in_flight", LAZY,
                                                            ("race", "outputs")))
def d2h_read_before_wait(patch) -> None:
    """PendingOutput.get_output reads the sampled ids before waiting for their copy.

    The host reads the D2H destination while the copy may still be writing it: uninitialised
    or stale ids become tokens. Both modes whenever the copy lags (sim lazy: always).
    """
    patch.setattr(PendingOutput, "get_output", _get_output_reading_first)


_real_pending_init = PendingOutput.__init__


def _pending_with_one_destination(self, device, sched, result):
    pool = device.__dict__.setdefault("_zoo_d2h_pool", {})
    real_host_empty = device.host_empty

    def pooled(shape, dtype, name="a staging buffer", staging=True):  # BUG: one destination
        if (shape, dtype) not in pool:                    # per shape, whatever is in flight
            pool[(shape, dtype)] = real_host_empty(shape, dtype, name, staging)
        return pool[(shape, dtype)]
    device.host_empty = pooled
    try:
        _real_pending_init(self, device, sched, result)
    finally:
        del device.host_empty


@injection("staging", ("vllm-project/vllm#39115 (one event reused for every step's output "
                       "copy)",), Witness("stops_in_flight", LAZY, ("race", "outputs")))
def d2h_destination_ring_of_one(patch) -> None:
    """PendingOutput takes its host destination from a pool holding one buffer per shape.

    With two steps in flight, step N+1's copy of its sampled ids lands in the buffer that step
    N's ids are still to be read from: the pool is shallower than the queue. Async only.
    """
    patch.setattr(PendingOutput, "__init__", _pending_with_one_destination)


def _pending_without_wait(self, device, sched, result):
    self.sched = sched
    self._result = result
    # BUG: no ``device.wait(device.copy, done)``: the copy stream does not wait for compute
    self._host = [device.host_empty(tuple(t.shape), t.dtype, staging=False)
                  for t in result.tensors()]
    for dst, src in zip(self._host, result.tensors()):
        device.copy_async(dst, src, device.copy)
    self._copied = device.record(device.copy)


@injection("streams", ("sgl-project/sglang#26380 (a schedule-stream write raced the previous "
                       "forward's reads: a missing cross-stream barrier)",),
           Witness("mixed_batch", LAZY, ("outputs", "crash")))
def output_copy_without_stream_wait(patch) -> None:
    """The D2H copy of the sampled ids is issued on the copy stream without waiting for the
    compute stream's event.

    The copy can run before the sampler wrote the ids: the host receives whatever the result
    buffer held. Both modes, whenever the copy stream runs ahead (sim lazy: always).
    """
    patch.setattr(PendingOutput, "__init__", _pending_without_wait)


_real_device_result = model_runner.DeviceResult


def _shared_device_result(device, num_rows, num_logprobs):
    cache = device.__dict__.setdefault("_zoo_results", {})
    key = (num_rows, num_logprobs)  # BUG: one result buffer per shape, reused every step
    if key not in cache:
        cache[key] = _real_device_result(device, num_rows, num_logprobs)
    return cache[key]


@injection("streams", ("sgl-project/sglang#34076 (a tensor used on another stream was reused "
                       "by the allocator)", "sgl-project/sglang#18803"),
           Witness("slot_reuse", SKEWED, ("outputs",)))
def device_result_reused_across_streams(patch) -> None:
    """The step's device result buffer is cached per batch shape and reused by the next step.

    Step N+1's sampler (compute stream) overwrites the buffer that step N's D2H copy (copy
    stream) may not have read yet: step N reports N+1's ids. Async only, timing-dependent: a
    GPU shows it when the copy stream lags, sim skewed (compute ahead of copy) on every step,
    sim lazy never (it runs each stream only as far as the host waits).
    """
    patch.setattr(model_runner, "DeviceResult", _shared_device_result)


def _fence_on_the_compute_stream(self) -> None:
    # BUG: "the staging copies run on the compute stream: wait for where it has got to"; the
    # stream's tail is the previous step's forward pass and sampler, not only the copies
    with sync_guard.allow("input-prep fence: the staging copies on the compute stream"):
        self.ints.device.record(self.ints.device.compute).synchronize()


@injection("staging", ("NVIDIA/TensorRT-LLM#6976 (a wider wait stopped consecutive batches "
                       "overlapping)",), Witness("mixed_batch", LAZY, ("overlap",)))
def fence_waits_for_the_compute_stream(patch) -> None:
    """The fence waits for an event recorded on the compute stream now, instead of the staging
    buffers' copy events.

    The copies are on that stream, so the buffers are safe and tokens stay right; but so is the
    previous step's forward pass: the host waits for step N's whole device work before it
    prepares step N+1, and async scheduling loses its overlap. Only the previous step's output
    copy (on the copy stream) is still pending at the launch, so an overlap check that looks at
    the output copy counts every launch as overlapped. Async only.
    """
    patch.setattr(InputBatch, "fence", _fence_on_the_compute_stream)


_real_fence = InputBatch.fence
_real_input_batch_init = InputBatch.__init__
_real_get_output = PendingOutput.get_output


def samples_nothing(pending: PendingOutput) -> bool:
    """Every row of the step is a partial prefill: it has no token for the host to read."""
    return not any(row.samples for row in pending.sched.rows)


def _input_batch_knowing_its_mode(self, config, device):
    _real_input_batch_init(self, config, device)
    self.zoo_async = config.async_scheduling


def _fence_in_async_mode_only(self) -> None:
    if self.zoo_async:  # BUG: "in sync mode the collect already waited for the step"
        _real_fence(self)


def _get_output_without_a_wait_for_a_tokenless_step(self):
    if samples_nothing(self):  # nothing to read, so nothing waited for
        rows = len(self.sched.rows)
        return model_runner.ModelRunnerOutput([None] * rows, [None] * rows)
    return _real_get_output(self)


def skip_the_fence_in_sync_mode(patch) -> None:
    """The first half of the entry below, harmless alone."""
    patch.setattr(InputBatch, "__init__", _input_batch_knowing_its_mode)
    patch.setattr(InputBatch, "fence", _fence_in_async_mode_only)


def collect_tokenless_steps_without_a_wait(patch) -> None:
    """The second half of the entry below, harmless alone."""
    patch.setattr(PendingOutput, "get_output", _get_output_without_a_wait_for_a_tokenless_step)


@injection("staging", ("vllm-project/vllm#48214 (sync mode: a prefill-only chunk step of a "
                       "pooling model returned without a device sync, and the next step "
                       "rewrote a pinned input buffer its copy had not read)",
                       "vllm-project/vllm#53057 (an encoder-only step had no host wait point, "
                       "so the pinned input slots were reused under a running step)"),
           Witness("tight_cache", Mode(False, "sim", "lazy"), ("race", "outputs")))
def sync_fence_skipped_with_a_tokenless_step(patch) -> None:
    """Sync mode skips the input-prep fence ("the collect waited for the step"), and the collect
    of a step that samples nothing (every row a partial prefill) returns without waiting.

    Each edit alone is harmless: the fence protects the staging buffers in both modes, and the
    collect's wait makes the fence free in sync mode. Together, a prefill-only step has no host
    wait point in sync mode: the next step's preparation rewrites both staging buffers while
    that step's copies are still queued, and the prefill chunk runs on the next step's inputs.
    Sync only (async mode keeps its fence); on sim lazy whenever a step is prefill-only.
    """
    skip_the_fence_in_sync_mode(patch)
    collect_tokenless_steps_without_a_wait(patch)
