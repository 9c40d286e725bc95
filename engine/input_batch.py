"""The persistent input batch: stable per-request slots and the step's device inputs.

Each running request owns a slot (``0..num_slots-1``; ``EngineConfig.num_slots``: a retiring
request keeps its slot, not its admission capacity) for as long as it holds KV blocks; the
device-side per-slot state (penalty token counts, last sampled id) is indexed by it. ``prepare``
turns a scheduler output into flat token arrays, attention metadata and sampling parameters, and
ships them to the device through two staging buffers (one int64, one float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EngineConfig
from .device import Device
from .models.attention import AttentionMetadata
from .request import Request
from .scheduler import SchedulerOutput


@dataclass
class SamplingInputs:
    """Per-row sampling parameters on the device, plus host flags that skip unused work."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    keys: torch.Tensor
    out_pos: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    slots: torch.Tensor
    banned_rows: torch.Tensor
    banned_tokens: torch.Tensor
    any_random: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalties: bool
    max_logprobs: int | None


@dataclass
class PenaltyUpdate:
    """Which input tokens to add to the per-slot prompt masks and output counts."""

    reset_slots: torch.Tensor
    output_token_idx: torch.Tensor
    output_slots: torch.Tensor
    prompt_token_idx: torch.Tensor
    prompt_slots: torch.Tensor


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logits_indices: torch.Tensor
    sampling: SamplingInputs
    penalty: PenaltyUpdate | None
    gather_token_idx: torch.Tensor  # input positions whose id is the slot's last sampled token
    gather_slots: torch.Tensor
    num_gathered: int


def _known_tokens(req: Request, start: int, n: int) -> list[int]:
    n = min(n, req.num_tokens - start)
    p = req.num_prompt_tokens
    if start >= p:
        return req.output_token_ids[start - p:start - p + n]
    if start + n <= p:
        return req.prompt_token_ids[start:start + n]
    return req.prompt_token_ids[start:] + req.output_token_ids[:start + n - p]


class InputBatch:
    """Slot assignment and per-step input preparation."""

    def __init__(self, config: EngineConfig, device: Device) -> None:
        self.block_size = config.block_size
        self.slot_of: dict[str, int] = {}
        self._free_slots = list(range(config.num_slots - 1, -1, -1))
        tokens, rows = config.max_num_batched_tokens, config.max_num_seqs
        blocks = -(-config.max_model_len // config.block_size)
        self.ints = device.host_buffer(6 * tokens + rows * (blocks + 8), torch.int64)
        self.floats = device.host_buffer(6 * rows, torch.float32)

    def fence(self) -> None:
        """Wait until the previous step's copies have read both staging buffers."""
        self.ints.fence()
        self.floats.fence()

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            slot = self.slot_of.pop(rid, None)
            if slot is not None:
                self._free_slots.append(slot)

    def _slot_for(self, rid: str) -> int:
        if rid not in self.slot_of:
            self.slot_of[rid] = self._free_slots.pop()
        return self.slot_of[rid]

    def prepare(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> StepInputs:
        """Build the step's inputs with plain lists (cheaper than numpy at decode sizes)."""
        rows = out.rows
        bs = self.block_size
        num_rows = len(rows)
        slots = [self._slot_for(r.request.request_id) for r in rows]
        ids: list[int] = []
        positions: list[int] = []
        slot_map: list[int] = []
        tok_rows: list[int] = []
        tok_cols: list[int] = []
        logits_idx: list[int] = []
        gather_idx: list[int] = []
        gather_slots: list[int] = []
        q_max = max(r.num_tokens for r in rows)
        num_blocks = -(-max(r.start + r.num_tokens for r in rows) // bs)
        tables: list[int] = []
        for i, row in enumerate(rows):
            req, start, n = row.request, row.start, row.num_tokens
            table = block_tables[req.request_id]
            known = _known_tokens(req, start, n)
            if len(known) < n:  # async: the last id is still on the device
                assert len(known) == n - 1, f"{req.request_id}: ids unknown"
                gather_idx.append(len(ids) + n - 1)
                gather_slots.append(slots[i])
                known = known + [0]
            ids += known
            pos = range(start, start + n)
            positions += pos
            slot_map += [table[p // bs] * bs + p % bs for p in pos]
            logits_idx.append(len(ids) - 1)
            if q_max > 1:
                tok_rows += [i] * n
                tok_cols += range(n)
            row_table = table[:num_blocks]
            tables += row_table
            tables += [0] * (num_blocks - len(row_table))
        if q_max == 1:  # decode: one token per row
            tok_rows, tok_cols, qpos = range(num_rows), [0] * num_rows, positions
        else:
            qpos = []
            for row in rows:
                qpos += range(row.start, row.start + row.num_tokens)
                qpos += [0] * (q_max - row.num_tokens)

        samp_ints, samp_floats, flags, banned = self._sampling_arrays(rows, slots)
        penalty_arrays = self._penalty_arrays(rows, slots)
        staged = self.ints.stage(
            [ids, positions, slot_map, tok_rows, tok_cols, tables, qpos, logits_idx, *samp_ints,
             *banned, gather_idx, gather_slots, *penalty_arrays])
        (input_ids, pos_t, slot_t, rows_t, cols_t, tables_t, qpos_t, logits_t,
         top_k, keys, out_pos, slots_t, banned_rows, banned_tokens, g_idx, g_slots,
         *pen) = staged
        temperature, top_p, min_p, presence, frequency, repetition = self.floats.stage(samp_floats)
        attn = AttentionMetadata(slot_t, tables_t.view(num_rows, num_blocks), rows_t, cols_t,
                                 qpos_t.view(num_rows, q_max), q_max, num_blocks * bs)
        sampling = SamplingInputs(temperature, top_k, top_p, min_p, keys, out_pos, presence,
                                  frequency, repetition, slots_t, banned_rows, banned_tokens,
                                  **flags)
        penalty = PenaltyUpdate(*pen) if penalty_arrays else None
        return StepInputs(input_ids, pos_t, attn, logits_t, sampling, penalty, g_idx, g_slots,
                          len(gather_idx))

    @staticmethod
    def _sampling_arrays(rows, slots):
        params = [r.request.sampling_params for r in rows]
        out_pos = [r.start + r.num_tokens - r.request.num_prompt_tokens for r in rows]
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        for i, (row, p) in enumerate(zip(rows, params)):
            if row.samples and out_pos[i] < p.min_tokens:
                stops = list(p.stop_token_ids)
                if not p.ignore_eos:
                    stops += row.request.eos_token_ids
                banned_rows += [i] * len(stops)
                banned_tokens += stops
        ints = [[p.top_k if p.top_k > 0 else 0 for p in params],
                [r.request.seed for r in rows], [max(o, 0) for o in out_pos], slots]
        floats = [[0.0 if p.greedy else p.temperature for p in params],
                  [p.top_p for p in params], [p.min_p for p in params],
                  [p.presence_penalty for p in params], [p.frequency_penalty for p in params],
                  [p.repetition_penalty for p in params]]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        flags = dict(any_random=any(not p.greedy for p in params),
                     any_top_k=any(p.top_k > 0 and not p.greedy for p in params),
                     any_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
                     any_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
                     any_penalties=any(p.has_penalties for p in params),
                     max_logprobs=max(logprobs) if logprobs else None)
        return ints, floats, flags, (banned_rows, banned_tokens)

    @staticmethod
    def _penalty_arrays(rows, slots) -> list[list[int]]:
        """Slots to reset, then (flat index, slot) of output tokens and of prompt tokens."""
        if not any(r.request.sampling_params.has_penalties for r in rows):
            return []  # the common case: no per-row walk at all
        reset: list[int] = []
        out_idx: list[int] = []
        out_slots: list[int] = []
        prompt_idx: list[int] = []
        prompt_slots: list[int] = []
        offset = 0
        for i, row in enumerate(rows):
            n, first = row.num_tokens, offset
            offset += n
            if not row.request.sampling_params.has_penalties:
                continue
            if row.is_new:
                reset.append(slots[i])
            num_prompt = min(max(row.request.num_prompt_tokens - row.start, 0), n)
            prompt_idx += range(first, first + num_prompt)
            prompt_slots += [slots[i]] * num_prompt
            out_idx += range(first + num_prompt, first + n)
            out_slots += [slots[i]] * (n - num_prompt)
        return [reset, out_idx, out_slots, prompt_idx, prompt_slots]
