"""The model runner: turns a scheduler output into one forward pass and one sampled token per row."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

import sync_guard

from .config import EngineConfig
from .cuda_graphs import DecodeGraphs, capture_sizes
from .device import Device
from .input_batch import InputBatch, StepInputs
from .sampler import SamplerOutput, sample
from .scheduler import SchedulerOutput
from .timeline import Timeline


POLL_MIN_S, POLL_MAX_S = 20e-6, 1e-3  # the polling collect's back-off


@dataclass
class ModelRunnerOutput:
    """Host-side result of a step: per row the sampled id (None for a partial prefill)."""

    sampled: list[int | None]
    logprobs: list[dict[int, float] | None]


class PendingOutput:
    """A launched step's results, on their way to the host.

    The sampled ids (and logprobs) are copied on the copy stream, after the compute stream's
    ``done`` event, into fresh host memory (pinned on CUDA), followed by an event. Only
    ``get_output`` waits on that event, so the critical path never does.
    """

    def __init__(self, device: Device, sched: SchedulerOutput, result: "DeviceResult",
                 poll: bool = False) -> None:
        self.sched = sched
        self._device = device
        self._poll = poll
        self._result = result
        done = device.record(device.compute)
        self.device_done = done   # the step's device work is complete (the harness's overlap check)
        device.wait(device.copy, done)
        # fresh pinned memory each step, not a page-guarded staging buffer: one allocation per
        # step is all it costs (a staging buffer's registration would cost every step, guard
        # or no guard); the deep mode checks an early read of it
        self._host = [device.host_empty(tuple(t.shape), t.dtype, staging=False)
                      for t in result.tensors()]
        for dst, src in zip(self._host, result.tensors()):
            device.copy_async(dst, src, device.copy)
        self._copied = device.record(device.copy)

    def ready(self) -> bool:
        """The outputs have reached the host (never waits): ``get_output`` will not block."""
        return self._copied.query()

    def get_output(self) -> ModelRunnerOutput:
        with sync_guard.allow("collect: the step's sampled ids reach the host"):
            if self._poll:
                self._poll_until_copied()
            self._copied.synchronize()  # after a poll: returns at once, raises a device fault
        return self._assemble(self._host[0].tolist())

    def _poll_until_copied(self) -> None:
        """Query the event, idling between queries with a back-off that doubles up to
        ``POLL_MAX_S``: the host core is free for others, the device goes on."""
        backoff = POLL_MIN_S
        while not self._copied.query():
            self._device.idle(backoff, self._copied)
            backoff = min(2 * backoff, POLL_MAX_S)

    def _assemble(self, tokens: list[int]) -> ModelRunnerOutput:
        """Per row: the sampled id (None for a partial prefill) and its logprobs entry."""
        rows = self.sched.rows
        sampled = [t if row.samples else None for t, row in zip(tokens, rows)]
        logprobs: list[dict[int, float] | None] = [None] * len(tokens)
        if len(self._host) > 1:
            sampled_lp, top_lp, top_ids = (t.tolist() for t in self._host[1:])
            for i, row in enumerate(rows):
                n = row.request.sampling_params.logprobs
                if n is None or not row.samples:
                    continue
                entry = dict(zip(top_ids[i][:n], top_lp[i][:n]))
                entry[tokens[i]] = sampled_lp[i]
                logprobs[i] = entry
        return ModelRunnerOutput(sampled, logprobs)


class DeviceResult:
    """Device tensors, allocated by the host, that the step's device work fills."""

    def __init__(self, device: Device, num_rows: int, num_logprobs: int | None) -> None:
        self.tokens = device.empty(num_rows, dtype=torch.int64)
        self.logprobs = None if num_logprobs is None else (
            device.empty(num_rows, dtype=torch.float32),
            device.empty(num_rows, num_logprobs, dtype=torch.float32),
            device.empty(num_rows, num_logprobs, dtype=torch.int64))

    def tensors(self) -> list[torch.Tensor]:
        return [self.tokens, *(self.logprobs or ())]

    def fill(self, out: SamplerOutput) -> None:
        self.tokens.copy_(out.tokens)
        if self.logprobs is not None:
            for dst, src in zip(self.logprobs, (out.sampled_logprob, out.top_logprobs,
                                                out.top_ids)):
                dst.copy_(src)


def kv_block_bytes(model: torch.nn.Module, block_size: int) -> int:
    shape = model.kv_cache_shape(1, block_size)
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch.empty((), dtype=model.kv_cache_dtype).element_size()


def host_available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_sizes(config: EngineConfig, model: torch.nn.Module, device: Device, vocab_size: int,
                num_blocks: int, blocks_named: str) -> None:
    """Before allocating: ValueError naming the field whose buffers would not fit in memory
    (``blocks_named`` is the field the KV block count came from)."""
    rows, tokens = config.max_num_seqs, config.max_num_batched_tokens
    blocks_per_seq = -(-config.max_model_len // config.block_size)
    block = kv_block_bytes(model, config.block_size)
    staging = (6 * tokens + rows * (blocks_per_seq + 8)) * 8 + 6 * rows * 4
    wants = [  # (the fields, bytes, what, on the device)
        (f"block_size={config.block_size}", block, "one KV cache block", True),
        (f"max_num_seqs={rows}", config.num_slots * (vocab_size * 5 + 8),
         "per-slot sampling state", True),
        (f"max_num_batched_tokens={tokens}", 6 * tokens * 8 * 2, "staging buffers", False),
        (f"max_num_seqs={rows}", staging, "staging buffers", False),
        (f"{blocks_named}={getattr(config, blocks_named)} with block_size={config.block_size}",
         (num_blocks + 1) * block, "the KV cache", True),
    ]
    host = host_available_memory()
    free = device.free_memory() if device.kind == "cuda" else host
    for fields, nbytes, what, on_device in wants:
        available = free if on_device else host
        if available is not None and nbytes > available:
            where = "free device" if on_device and device.kind == "cuda" else "available host"
            raise ValueError(f"{fields} needs {nbytes:,} bytes for {what}, more than the "
                             f"{available:,} bytes of {where} memory")


def choose_num_kv_blocks(config: EngineConfig, model: torch.nn.Module, device: Device) -> int:
    """Blocks for ``max_num_seqs`` full-length requests, capped by free device memory."""
    wanted = config.max_num_seqs * -(-config.max_model_len // config.block_size)
    free = device.free_memory()
    if free is None:
        return wanted
    fits = int(free * config.kv_cache_memory_fraction) // kv_block_bytes(model, config.block_size)
    return max(1, min(wanted, fits))


class ModelRunner:
    """Owns the model, the KV cache and the device-side per-slot state."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, device: Device,
                 num_blocks: int, vocab_size: int, timeline: Timeline) -> None:
        self.model = model
        self.timeline = timeline
        self.device = device
        # one block past the pool: the scratch block that CUDA-graph padding rows write to
        self.kv_cache = device.zeros(*model.kv_cache_shape(num_blocks + 1, config.block_size),
                                     dtype=model.kv_cache_dtype)
        slots = config.num_slots   # rows of per-slot state; CUDA graphs stay keyed by step rows
        self.output_counts = device.zeros(slots, vocab_size, dtype=torch.int32)
        self.prompt_mask = device.zeros(slots, vocab_size, dtype=torch.bool)
        self.last_sampled = device.zeros(slots, dtype=torch.int64)
        self.input_batch = InputBatch(config, device)
        self.poll = config.output_wait == "poll"
        self.graphs = None
        if device.kind == "cuda" and not config.enforce_eager:
            sizes = list(config.cuda_graph_sizes or capture_sizes(config.max_num_seqs))
            self.graphs = DecodeGraphs(model, self.kv_cache, sizes,
                                       -(-config.max_model_len // config.block_size),
                                       config.block_size, scratch_block=num_blocks)

    def release(self, request_ids: list[str]) -> None:
        self.input_batch.release(request_ids)

    def execute_model(self, sched: SchedulerOutput, block_tables: dict[str, list[int]],
                      step: int) -> PendingOutput:
        """Prepare inputs on the host, launch the step's device work, return at once."""
        with self.timeline.host("prepare", step):
            self.input_batch.fence()
            inputs = self.input_batch.prepare(sched, block_tables)
            result = DeviceResult(self.device, len(sched.rows), inputs.sampling.max_logprobs)
        with self.timeline.host("launch", step):
            begin = self.timeline.device_begin()
            self.device.launch(self.device.compute, self._device_step, inputs, result)
            self.timeline.device_end(step, begin)
            return PendingOutput(self.device, sched, result, self.poll)

    def _device_step(self, inputs: StepInputs, result: DeviceResult) -> None:
        """Everything the device does in one step; runs in compute-stream order."""
        if inputs.num_gathered:
            inputs.input_ids[inputs.gather_token_idx] = self.last_sampled[inputs.gather_slots]
        num_rows = inputs.attn.block_tables.shape[0]
        if self.graphs is not None and self.graphs.fits(inputs, num_rows):
            logits = self.graphs.run(inputs, num_rows)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if inputs.penalty is not None:
            self._update_penalty_state(inputs)
        out = sample(logits, inputs.sampling, self.output_counts, self.prompt_mask)
        self.last_sampled.index_copy_(0, inputs.sampling.slots, out.tokens)
        result.fill(out)

    def _update_penalty_state(self, inputs: StepInputs) -> None:
        """Fold this step's input tokens into the per-slot prompt masks and output counts."""
        pen = inputs.penalty
        self.output_counts.index_fill_(0, pen.reset_slots, 0)
        self.prompt_mask.index_fill_(0, pen.reset_slots, False)
        ids = inputs.input_ids
        one = torch.ones((), dtype=torch.int32, device=ids.device)
        self.output_counts.index_put_((pen.output_slots, ids[pen.output_token_idx]),
                                      one.expand(pen.output_slots.shape), accumulate=True)
        self.prompt_mask.index_put_((pen.prompt_slots, ids[pen.prompt_token_idx]),
                                    torch.ones((), dtype=torch.bool, device=ids.device))
