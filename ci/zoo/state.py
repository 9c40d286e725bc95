"""Per-request device state: penalties, min_tokens, seeds, logprobs; preemption and resume."""
from __future__ import annotations

import sync_guard
from lockstep.engine import input_batch
from lockstep.engine.input_batch import InputBatch
from lockstep.engine.model_runner import ModelRunner, ModelRunnerOutput, PendingOutput
from lockstep.engine.scheduler import Scheduler
from lockstep.engine.sampler import sample

from .registry import injection
from .witness import LAZY, SYNC, Witness

PENALTIES_ASYNC = ("vllm-project/vllm#26467 (penalties under async scheduling: output ids lag "
                   "by one)")
_real_penalty_arrays = InputBatch._penalty_arrays
_real_sampling_arrays = InputBatch._sampling_arrays


def _device_step_penalising_first(self, inputs, result):
    if inputs.penalty is not None:  # BUG: before the gather, the placeholder 0 is counted
        self._update_penalty_state(inputs)
    if inputs.num_gathered:
        inputs.input_ids[inputs.gather_token_idx] = self.last_sampled[inputs.gather_slots]
    num_rows = inputs.attn.block_tables.shape[0]
    if self.graphs is not None and self.graphs.fits(inputs, num_rows):
        logits = self.graphs.run(inputs, num_rows)
    else:
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
    out = sample(logits, inputs.sampling, self.output_counts, self.prompt_mask)
    self.last_sampled.index_copy_(0, inputs.sampling.slots, out.tokens)
    result.fill(out)


@injection("penalties", (PENALTIES_ASYNC, "vllm-project/vllm#27910 (placeholder ids reached the "
                         "penalty scatter)"), Witness("slot_reuse", LAZY, ("outputs",)))
def penalties_count_the_placeholder(patch) -> None:
    """ModelRunner._device_step folds the step's input ids into the penalty counts before the
    placeholders were replaced by the ids sampled on the device.

    Every async decode step counts token 0 (the placeholder) instead of the token the request
    really produced. Async only, with penalties.
    """
    patch.setattr(ModelRunner, "_device_step", _device_step_penalising_first)


def _penalty_arrays_known_only(rows, slots):
    arrays = _real_penalty_arrays(rows, slots)
    if not arrays:
        return arrays
    reset, out_idx, out_slots, prompt_idx, prompt_slots = arrays
    unknown, offset = set(), 0
    for row in rows:  # BUG: "ids not on the host yet" are left out of the counts for good
        offset += row.num_tokens
        if row.start + row.num_tokens > row.request.num_tokens:
            unknown.add(offset - 1)
    kept = [(i, s) for i, s in zip(out_idx, out_slots) if i not in unknown]
    return [reset, [i for i, _ in kept], [s for _, s in kept], prompt_idx, prompt_slots]


@injection("penalties", (PENALTIES_ASYNC,), Witness("slot_reuse", LAZY, ("outputs",)))
def penalties_miss_the_newest_token(patch) -> None:
    """InputBatch._penalty_arrays leaves out input ids that are still on the device.

    In async mode the newest token of every decoding request is such an id, so it never
    enters the output counts: presence and frequency penalties lag. Async only.
    """
    patch.setattr(InputBatch, "_penalty_arrays", staticmethod(_penalty_arrays_known_only))


@injection("penalties", ("vllm-project/vllm#27910 (mixed penalties batch)",),
           Witness("slot_reuse", SYNC, ("outputs",)))
def penalties_of_the_previous_row(patch) -> None:
    """InputBatch._penalty_arrays looks rows up in the slot list off by one (``slots[i - 1]``).

    Each row's penalty state (reset, prompt mask, output counts) is kept in the previous row's
    slot while the sampler reads the row's own: a request is penalised by another's tokens.
    Both modes, with two rows in a step and penalties on one.
    """
    patch.setattr(InputBatch, "_penalty_arrays", staticmethod(
        lambda rows, slots: _real_penalty_arrays(rows, [slots[i - 1] for i in range(len(slots))])))


def _penalty_arrays_never_reset(rows, slots):
    arrays = _real_penalty_arrays(rows, slots)
    return [[], *arrays[1:]] if arrays else arrays  # BUG: a new request keeps the slot's counts


@injection("penalties", ("sgl-project/sglang#18803 (per-slot state of a recycled index)",),
           Witness("slot_reuse", SYNC, ("outputs",)))
def penalties_stale_in_a_reused_slot(patch) -> None:
    """InputBatch._penalty_arrays never resets a slot's penalty state for a new request.

    A request admitted into a slot that another penalised request used before inherits its
    prompt mask and output counts. Both modes, whenever slots are reused.
    """
    patch.setattr(InputBatch, "_penalty_arrays", staticmethod(_penalty_arrays_never_reset))


def _sampling_arrays_with(rows, slots, out_pos_of, ban_pos_of):
    ints, floats, flags, banned = _real_sampling_arrays(rows, slots)
    ints[2] = [max(out_pos_of(r), 0) for r in rows]
    banned_rows, banned_tokens = [], []
    for i, row in enumerate(rows):
        p = row.request.sampling_params
        if row.samples and ban_pos_of(row) < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else
                                              list(row.request.eos_token_ids))
            banned_rows += [i] * len(stops)
            banned_tokens += stops
    return ints, floats, flags, (banned_rows, banned_tokens)


def _out_pos(row) -> int:
    return row.start + row.num_tokens - row.request.num_prompt_tokens


@injection("stops", (PENALTIES_ASYNC, "vllm-project/vllm#26317 (min_tokens in the stop check)"),
           Witness("stops_in_flight", LAZY, ("outputs",)))
def min_tokens_from_the_host_count(patch) -> None:
    """InputBatch._sampling_arrays bans stop ids while the host's count of output tokens is
    below min_tokens.

    In async mode that count lags by the token in flight, so at output position min_tokens a
    stop id is still banned: the request runs past the stop that sync mode emits. Async only.
    """
    patch.setattr(InputBatch, "_sampling_arrays", staticmethod(
        lambda rows, slots: _sampling_arrays_with(
            rows, slots, _out_pos, lambda r: len(r.request.output_token_ids))))


@injection("sampling", ("vllm-project/vllm#51226 (a seed's stream depended on the rest of the "
                        "batch)", "vllm-project/vllm#50440"),
           Witness("mixed_batch", SYNC, ("outputs",)))
def seed_keyed_on_the_batch_row(patch) -> None:
    """InputBatch._sampling_arrays folds the row's index in the batch into the random position.

    One noise stream per batch row, as with a per-row generator: a seeded request's tokens
    depend on which other requests share its steps. Both modes; only the solo run can tell.
    """
    patch.setattr(InputBatch, "_sampling_arrays", staticmethod(
        lambda rows, slots: _sampling_arrays_with(
            rows, slots, lambda r: _out_pos(r) + 1000 * rows.index(r), _out_pos)))


@injection("sampling", (PENALTIES_ASYNC,), Witness("mixed_batch", LAZY, ("outputs",)))
def seed_position_from_the_host_count(patch) -> None:
    """InputBatch._sampling_arrays keys the random draw on the host's count of output tokens.

    In async mode the count lags by the token in flight, so two consecutive draws share a
    position: async streams differ from sync ones. Async only, random rows.
    """
    patch.setattr(InputBatch, "_sampling_arrays", staticmethod(
        lambda rows, slots: _sampling_arrays_with(
            rows, slots, lambda r: len(r.request.output_token_ids), _out_pos)))


def _get_output_packed_logprobs(self):
    with sync_guard.allow("collect: the step's sampled ids reach the host"):
        self._copied.synchronize()
    tokens = self._host[0].tolist()
    rows = self.sched.rows
    sampled = [t if row.samples else None for t, row in zip(tokens, rows)]
    logprobs: list = [None] * len(tokens)
    if len(self._host) > 1:
        sampled_lp, top_lp, top_ids = (t.tolist() for t in self._host[1:])
        j = 0
        for i, row in enumerate(rows):
            n = row.request.sampling_params.logprobs
            if n is None or not row.samples:
                continue
            # BUG: the arrays hold one row per batch row, not one per row that asked
            entry = dict(zip(top_ids[j][:n], top_lp[j][:n]))
            entry[tokens[i]] = sampled_lp[j]
            logprobs[i] = entry
            j += 1
    return ModelRunnerOutput(sampled, logprobs)


@injection("sampling", ("vllm-project/vllm#27615 (per-request logprob slicing under async "
                        "scheduling)",), Witness("mixed_batch", SYNC, ("outputs",)))
def logprobs_of_another_row(patch) -> None:
    """PendingOutput.get_output indexes the logprob arrays by the count of rows that asked for
    logprobs, not by batch row.

    A request's logprobs come from another request whenever a row without logprobs precedes
    it in the batch. Both modes; batch-dependent.
    """
    patch.setattr(PendingOutput, "get_output", _get_output_packed_logprobs)


_real_preempt = Scheduler._preempt


def _preempt_keeping_prompt(self, req):
    computed = req.num_computed_tokens
    _real_preempt(self, req)
    req.num_computed_tokens = min(computed, req.num_prompt_tokens)  # BUG: its KV was freed


@injection("preemption", ("vllm-project/vllm#29071 (chunked prefill and preemption)",),
           Witness("tight_cache", SYNC, ("outputs", "crash")))
def resume_skips_the_prompt(patch) -> None:
    """Recompute preemption keeps the prompt's progress ("the prompt is cached") while it frees
    every block.

    The resumed request recomputes only its outputs: the attention reads the prompt's positions
    from freshly allocated blocks that hold another request's KV. Both modes.
    """
    patch.setattr(Scheduler, "_preempt", _preempt_keeping_prompt)


_real_known_tokens = input_batch._known_tokens


def _known_tokens_newest(req, start, n):
    p, end = req.num_prompt_tokens, start + min(n, req.num_tokens - start)
    if not start < p < end:
        return _real_known_tokens(req, start, n)
    # BUG: the chunk ends inside the outputs; it takes the newest ones, not the first
    outputs = req.output_token_ids
    return req.prompt_token_ids[start:] + outputs[len(outputs) - (end - p):]


@injection("preemption", ("vllm-project/vllm#29071 (chunked prefill and preemption)",
                          "vllm-project/vllm#38624 (tokens on resume)"),
           Witness("tight_cache", SYNC, ("outputs",)))
def resume_chunk_takes_the_newest_outputs(patch) -> None:
    """The input ids of a chunk that spans the prompt and the outputs take the newest outputs
    instead of the first ones.

    Only a resumed request (recomputing prompt and outputs) whose recompute is split into
    chunks by the token budget hits it: its history is truncated and shifted. Both modes.
    """
    patch.setattr(input_batch, "_known_tokens", _known_tokens_newest)
