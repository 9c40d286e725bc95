"""The model runner: turns a scheduler output into one forward pass and one sampled token per row."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EngineConfig
from .device import Device
from .input_batch import InputBatch, StepInputs
from .sampler import SamplerOutput, sample
from .scheduler import SchedulerOutput


@dataclass
class ModelRunnerOutput:
    """Host-side result of a step: per row the sampled id (None for a partial prefill)."""

    sampled: list[int | None]
    logprobs: list[dict[int, float] | None]


class PendingOutput:
    """A launched step's device results; ``get_output`` brings them to the host (blocking)."""

    def __init__(self, sched: SchedulerOutput, out: SamplerOutput) -> None:
        self.sched = sched
        self.out = out

    def get_output(self) -> ModelRunnerOutput:
        out = self.out
        tokens = out.tokens.cpu().tolist()
        sampled = [t if row.samples else None for t, row in zip(tokens, self.sched.rows)]
        logprobs: list[dict[int, float] | None] = [None] * len(tokens)
        if out.top_ids is not None:
            top_ids, top_lp = out.top_ids.cpu().tolist(), out.top_logprobs.cpu().tolist()
            sampled_lp = out.sampled_logprob.cpu().tolist()
            for i, row in enumerate(self.sched.rows):
                n = row.request.sampling_params.logprobs
                if n is None or not row.samples:
                    continue
                entry = dict(zip(top_ids[i][:n], top_lp[i][:n]))
                entry[tokens[i]] = sampled_lp[i]
                logprobs[i] = entry
        return ModelRunnerOutput(sampled, logprobs)


def kv_block_bytes(model: torch.nn.Module, block_size: int) -> int:
    shape = model.kv_cache_shape(1, block_size)
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch.empty((), dtype=model.kv_cache_dtype).element_size()


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
                 num_blocks: int, vocab_size: int) -> None:
        self.model = model
        self.device = device
        self.kv_cache = device.zeros(*model.kv_cache_shape(num_blocks, config.block_size),
                                     dtype=model.kv_cache_dtype)
        self.output_counts = device.zeros(config.max_num_seqs, vocab_size, dtype=torch.int32)
        self.prompt_mask = device.zeros(config.max_num_seqs, vocab_size, dtype=torch.bool)
        self.input_batch = InputBatch(config, device)

    def release(self, request_ids: list[str]) -> None:
        self.input_batch.release(request_ids)

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput,
                      block_tables: dict[str, list[int]]) -> PendingOutput:
        inputs = self.input_batch.prepare(sched, block_tables)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        if inputs.penalty is not None:
            self._update_penalty_state(inputs)
        return PendingOutput(sched, sample(logits, inputs.sampling, self.output_counts,
                                           self.prompt_mask))

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
