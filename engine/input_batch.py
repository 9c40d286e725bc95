"""The persistent input batch: stable per-request slots and the step's device inputs.

Each running request owns a slot (``0..max_num_seqs-1``) for as long as it holds KV blocks; the
device-side per-slot state (penalty token counts, last sampled id) is indexed by it. ``prepare``
turns a scheduler output into flat token arrays, attention metadata and sampling parameters, and
ships them to the device through two staging buffers (one int64, one float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
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
        rows = out.rows
        bs = self.block_size
        num_rows = len(rows)
        counts = np.array([r.num_tokens for r in rows], dtype=np.int64)
        starts = np.array([r.start for r in rows], dtype=np.int64)
        q_max = int(counts.max())
        num_blocks = int(-(-(starts + counts).max() // bs))
        slots = [self._slot_for(r.request.request_id) for r in rows]

        ids, positions, slot_map, tok_rows, tok_cols = [], [], [], [], []
        gather_idx, gather_slots = [], []
        offset = 0
        tables = np.zeros((num_rows, num_blocks), dtype=np.int64)
        qpos = np.zeros((num_rows, q_max), dtype=np.int64)
        for i, row in enumerate(rows):
            req = row.request
            pos = np.arange(row.start, row.start + row.num_tokens, dtype=np.int64)
            table = np.asarray(block_tables[req.request_id], dtype=np.int64)
            known = _known_tokens(req, row.start, row.num_tokens)
            if len(known) < row.num_tokens:  # async: the last id is still on the device
                assert len(known) == row.num_tokens - 1, f"{req.request_id}: ids unknown"
                gather_idx.append(offset + len(known))
                gather_slots.append(slots[i])
                known = known + [0]
            offset += row.num_tokens
            ids.append(np.asarray(known, dtype=np.int64))
            positions.append(pos)
            slot_map.append(table[pos // bs] * bs + pos % bs)
            tok_rows.append(np.full(row.num_tokens, i, dtype=np.int64))
            tok_cols.append(np.arange(row.num_tokens, dtype=np.int64))
            tables[i, :len(table)] = table[:num_blocks]
            qpos[i, :row.num_tokens] = pos
        logits_idx = np.cumsum(counts) - 1

        samp_ints, samp_floats, flags, banned = self._sampling_arrays(rows, slots)
        penalty_arrays, penalty_sizes = self._penalty_arrays(rows, slots, counts, starts)
        staged = self.ints.stage(
            [np.concatenate(ids), np.concatenate(positions), np.concatenate(slot_map),
             np.concatenate(tok_rows), np.concatenate(tok_cols), tables, qpos, logits_idx,
             *samp_ints, banned[0], banned[1], np.array(gather_idx, dtype=np.int64),
             np.array(gather_slots, dtype=np.int64), *penalty_arrays])
        (input_ids, pos_t, slot_t, rows_t, cols_t, tables_t, qpos_t, logits_t,
         top_k, keys, out_pos, slots_t, banned_rows, banned_tokens, g_idx, g_slots,
         *pen) = staged
        temperature, top_p, min_p, presence, frequency, repetition = self.floats.stage(samp_floats)
        attn = AttentionMetadata(slot_t, tables_t.view(num_rows, num_blocks), rows_t, cols_t,
                                 qpos_t.view(num_rows, q_max), q_max, num_blocks * bs)
        sampling = SamplingInputs(temperature, top_k, top_p, min_p, keys, out_pos, presence,
                                  frequency, repetition, slots_t, banned_rows, banned_tokens,
                                  **flags)
        penalty = PenaltyUpdate(*pen) if penalty_sizes else None
        return StepInputs(input_ids, pos_t, attn, logits_t, sampling, penalty, g_idx, g_slots,
                          len(gather_idx))

    @staticmethod
    def _sampling_arrays(rows, slots):
        params = [r.request.sampling_params for r in rows]
        out_pos = np.array([r.start + r.num_tokens - r.request.num_prompt_tokens for r in rows],
                           dtype=np.int64)
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        for i, (row, p) in enumerate(zip(rows, params)):
            if row.samples and out_pos[i] < p.min_tokens:
                stops = list(p.stop_token_ids)
                if not p.ignore_eos:
                    stops += row.request.eos_token_ids
                banned_rows += [i] * len(stops)
                banned_tokens += stops
        ints = [np.array([p.top_k if p.top_k > 0 else 0 for p in params], dtype=np.int64),
                np.array([r.request.seed for r in rows], dtype=np.int64),
                np.maximum(out_pos, 0), np.array(slots, dtype=np.int64)]
        floats = [np.array([0.0 if p.greedy else p.temperature for p in params]),
                  np.array([p.top_p for p in params]), np.array([p.min_p for p in params]),
                  np.array([p.presence_penalty for p in params]),
                  np.array([p.frequency_penalty for p in params]),
                  np.array([p.repetition_penalty for p in params])]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        flags = dict(any_random=any(not p.greedy for p in params),
                     any_top_k=any(p.top_k > 0 and not p.greedy for p in params),
                     any_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
                     any_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
                     any_penalties=any(p.has_penalties for p in params),
                     max_logprobs=max(logprobs) if logprobs else None)
        banned = (np.array(banned_rows, dtype=np.int64), np.array(banned_tokens, dtype=np.int64))
        return ints, floats, flags, banned

    @staticmethod
    def _penalty_arrays(rows, slots, counts, starts):
        reset, out_idx, out_slots, prompt_idx, prompt_slots = [], [], [], [], []
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for i, row in enumerate(rows):
            if not row.request.sampling_params.has_penalties:
                continue
            if row.is_new:
                reset.append(slots[i])
            pos = np.arange(starts[i], starts[i] + counts[i])
            flat = offsets[i] + np.arange(counts[i])
            is_out = pos >= row.request.num_prompt_tokens
            out_idx.append(flat[is_out])
            prompt_idx.append(flat[~is_out])
            out_slots.append(np.full(int(is_out.sum()), slots[i]))
            prompt_slots.append(np.full(int((~is_out).sum()), slots[i]))
        if not out_idx:
            return [], 0
        arrays = [np.array(reset, dtype=np.int64)] + [
            np.concatenate(a).astype(np.int64)
            for a in (out_idx, out_slots, prompt_idx, prompt_slots)]
        return arrays, len(arrays)
