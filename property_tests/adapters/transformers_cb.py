"""Hugging Face transformers' continuous batching behind the engine-under-test protocol.

``--engine transformers`` drives a ``ContinuousBatchingManager``
(``model.init_continuous_batching``) one batch at a time from the calling thread, with no
background thread. Requests, cancellations and results go through the manager's public calls
(``add_request``, ``cancel_request``, ``get_result``); ``step()`` runs one iteration of the
manager's generation loop body: schedule a batch, run its forward and sampling, update the
requests from the tokens. In async mode (CUDA only: two IO pairs, batch N+1 scheduled and
launched before batch N's tokens are known) a step is the loop body exactly as the manager's
thread runs it: prepare and launch N+1, then update N; the first batch is launched without an
update, as the manager bootstraps it, and a step with nothing to schedule launches and updates
nothing, as the thread waits there.

Transformers has no public single-step API, so everything that touches its internals lives in
:class:`_Loop`. Tested on 5.17.0 and 5.24.0 (their caches differ: blocks in 5.17, sectors in
5.24; the adapter tells them apart by feature); versions outside ``SUPPORTED`` are refused.

What maps (the rest is in the capability notes): ``block_size`` -> the page size (at least 4 in
transformers: smaller blocks run as pages of 4 with the same token capacity); ``num_kv_blocks``
-> ``num_blocks`` (None: room for ``max_num_seqs`` requests of ``max_model_len`` tokens);
``max_num_batched_tokens`` -> ``max_batch_tokens``; ``max_num_seqs`` -> requests per batch;
``max_model_len`` is checked here. Transformers reports no finish reason: "stop" when the last
id is one of the request's stops (its eos ids), "length" otherwise, "error" when it failed.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import torch

import sync_guard
from lockstep.engine import SamplingParams

from ..capabilities import SAMPLING_OPTIONS, Capabilities, narrow_params
from ..engine_under_test import Mode
from ..invariants import InvariantViolation
from ..workload import EngineSpec
from . import transformers_model as tiny
from .base import AdapterBase

SUPPORTED = ("5.17.0", "5.25.0")   # [low, high): tested on 5.17.0 and 5.24.0
MIN_PAGE_SIZE = 4                   # transformers refuses smaller pages
# the host waits transformers designs in: sync mode copies every batch in and out with blocking
# copies; async mode waits only for the D2H copy of the batch it updates
SYNC_MODE_WAITS = "transformers CB sync mode: blocking copies in and out of every batch"
ASYNC_UPDATE_WAIT = "transformers CB async: the update waits for its batch's D2H copy (d2h_over)"


def check_environment() -> None:
    """RuntimeError naming the installed version unless transformers is importable and in
    ``SUPPORTED``."""
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"the transformers adapter needs transformers "
                           f">={SUPPORTED[0]},<{SUPPORTED[1]}: {exc}") from None
    from packaging.version import Version
    version = Version(transformers.__version__)
    if not Version(SUPPORTED[0]) <= version < Version(SUPPORTED[1]):
        raise RuntimeError(f"transformers {transformers.__version__} is installed; the "
                           f"transformers adapter drives continuous-batching internals known "
                           f"only for >={SUPPORTED[0]},<{SUPPORTED[1]}")


class TransformersCrash(RuntimeError):
    """Transformers raised inside one iteration of its generation loop: the engine is broken."""


@dataclass(slots=True)
class TransformersOutput:
    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None   # never reported
    error: str | None = None


@dataclass(slots=True)
class _Holder:
    """One use of a request id: when it was added (tells its results from an earlier use's)."""

    added_at: float
    stops: frozenset[int]
    tokens: list[int]
    aborted: bool = False


class TransformersEngine(AdapterBase):
    """A ``ContinuousBatchingManager`` driven one batch per ``step()``."""

    eos_token_ids = (tiny.EOS_TOKEN_ID,)
    vocab_size = tiny.VOCAB_SIZE

    def __init__(self, spec: EngineSpec, mode: Mode) -> None:
        super().__init__(spec, mode)
        check_environment()
        tiny.check_model_name(spec.model)
        if not transformers_engine.capabilities.runs(mode.async_scheduling, mode.device):
            raise ValueError(f"mode={mode.name!r}: transformers CB runs sync on cpu and cuda and "
                             f"async on cuda only")
        if mode.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("mode device 'cuda' but no CUDA device is available")
        self.max_model_len = spec.max_model_len or tiny.MAX_POSITIONS
        if self.max_model_len > tiny.MAX_POSITIONS:
            raise ValueError(f"EngineSpec.max_model_len={spec.max_model_len} exceeds the tiny "
                             f"model's {tiny.MAX_POSITIONS} positions")
        self.page_size = max(spec.block_size, MIN_PAGE_SIZE)
        if spec.num_kv_blocks is None:
            per_request = -(-self.max_model_len // self.page_size) + 1
            self.num_pages = per_request * spec.max_num_seqs
        else:   # the same number of tokens when pages are larger than the spec's blocks
            self.num_pages = -(-spec.num_kv_blocks * spec.block_size // self.page_size)
        model = tiny.tiny_llama(spec.seed, mode.device)
        with sync_guard.allow("transformers CB: building the manager (seeding, cache sizing)"):
            # an earlier engine's ContinuousBatchProcessor empties the CUDA cache in __del__:
            # collect it here, not at a random allocation inside a later engine's guarded step
            gc.collect()
            self._loop = _Loop(model, mode.async_scheduling, self.page_size, self.num_pages,
                               spec.max_num_batched_tokens, spec.max_num_seqs, spec.seed)
        self._holders: dict[str, _Holder] = {}
        self._ended: dict[str, list[_Holder]] = {}   # earlier uses of each id
        self._abort_outputs: list[TransformersOutput] = []
        self.outputs_after_abort = 0

    # -- the protocol --------------------------------------------------------------------------

    def _add(self, request_id: str, prompt: list[int], params: SamplingParams,
             arrival_index: int) -> None:
        self._check_request(prompt, params)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos
                                              else set(self.eos_token_ids))
        holder = _Holder(time.perf_counter(), frozenset(stops), [])
        self._loop.add(request_id, prompt, params.max_tokens, sorted(stops))
        self._holders[request_id] = holder

    def _abort(self, request_id: str) -> bool:
        if request_id not in self._holders:
            return False   # aborted already: its "abort" output goes out with the next step
        holder = self._end(request_id, aborted=True)
        self._loop.cancel(request_id)
        self._abort_outputs.append(TransformersOutput(request_id, list(holder.tokens), "abort"))
        return True

    def _step(self) -> Sequence[TransformersOutput]:
        self._loop.step()
        results = self._loop.results()
        outputs, self._abort_outputs = self._abort_outputs, []
        latest: dict[str, TransformersOutput] = {}
        for result in results:
            out = self._translate(result)
            if out is not None:
                latest[out.request_id] = out
        return outputs + list(latest.values())

    def stats(self) -> dict:
        return {**super().stats(), **self._loop.stats(),
                "outputs_after_abort": self.outputs_after_abort}

    def check_invariants(self) -> None:
        problems = self._loop.problems(set(self._holders))
        if problems:
            raise InvariantViolation(f"transformers {self.mode.name}: " + "; ".join(problems))

    # -- mapping -------------------------------------------------------------------------------

    def _check_request(self, prompt: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {params!r}")
        if not prompt:
            raise ValueError("prompt is empty")
        for i, tok in enumerate(prompt):
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < self.vocab_size:
                raise ValueError(f"prompt[{i}]={tok!r} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        params.check_vocab(self.vocab_size)
        narrowed = narrow_params(params, transformers_engine.capabilities)
        for option in (*SAMPLING_OPTIONS, "logprobs"):
            if getattr(narrowed, option) != getattr(params, option):
                raise ValueError(f"params.{option}={getattr(params, option)!r}: transformers CB "
                                 f"does not honour it per request (greedy only; see "
                                 f"transformers_engine.capabilities)")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} with a {len(prompt)}-token prompt "
                             f"exceeds max_model_len={self.max_model_len}")
        if -(-total // self.page_size) > self.num_pages:
            raise ValueError(f"the request needs {-(-total // self.page_size)} KV pages of "
                             f"{self.page_size} tokens but the cache has {self.num_pages}")

    def _translate(self, result) -> TransformersOutput | None:
        """The protocol's output for one transformers result; None for a late result of an
        aborted request (transformers may still update a request that was in flight)."""
        rid = result.request_id
        holder = self._holders.get(rid)
        if holder is None or result.created_time < holder.added_at:
            ended = [h for h in self._ended.get(rid, ()) if h.added_at <= result.created_time]
            owner = max(ended, key=lambda h: h.added_at, default=None)
            if owner is not None and owner.aborted:
                self.outputs_after_abort += 1
                return None
            raise InvariantViolation(f"transformers {self.mode.name}: a result for {rid!r} "
                                     f"after that request finished: "
                                     f"{list(result.generated_tokens)}")
        holder.tokens = list(result.generated_tokens)
        if result.error is not None:
            reason = "error"
        elif result.is_finished():
            reason = "stop" if holder.tokens and holder.tokens[-1] in holder.stops else "length"
        else:
            reason = None
        if reason is not None:
            self._end(rid, aborted=False)
        return TransformersOutput(rid, list(holder.tokens), reason, error=result.error)

    def _end(self, request_id: str, aborted: bool) -> _Holder:
        holder = self._holders.pop(request_id)
        holder.aborted = aborted
        self._ended.setdefault(request_id, []).append(holder)
        return holder


def transformers_engine(spec: EngineSpec, mode: Mode) -> TransformersEngine:
    """The :data:`~lockstep.property_tests.engine_under_test.EngineFactory` for ``--engine
    transformers``."""
    return TransformersEngine(spec, mode)


transformers_engine.check_environment = check_environment
transformers_engine.capabilities = Capabilities(
    engine="transformers", adapter_version="1",
    sampling=frozenset({"stop_token_ids", "ignore_eos"}),
    max_logprobs=None, abort=True, reuse_ids=True, force_preempt=False,
    modes=frozenset({(False, "cpu"), (False, "cuda"), (True, "cuda")}),
    exact=False,
    notes=(
        "transformers: greedy only (its sampling, seed and logprob switches are per manager, "
        "not per request); stop ids and ignore_eos are honoured per request through the "
        "request's eos ids",
        "transformers: no ties: the tiny random Llama runs in float64, so batched and solo "
        "logits differ by ~1e-16 and greedy streams compare exactly (a scaled LM head would "
        "not help: gaps and rounding noise scale alike)",
        "transformers: block sizes under 4 run as pages of 4 with the same token capacity; "
        "max_num_seqs caps requests per batch; preemption is transformers' own soft reset",
    ))


# ------------------------------------------------------------------------------------------------
# Every touch of transformers internals is below (tested on 5.17.0 and 5.24.0):
#   manager._create_batch_processor(), manager.batch_processor     the processor its thread builds
#   processor.prepare_next_batch / _generation_step / update_batch  one loop body
#   processor.inputs_and_outputs.prepare_batch_update              async: the designed host wait
#   processor.scheduler.active/waiting_requests, RequestState._true_initial_tokens   bookkeeping
#   5.24: cache.cache_allocators[*].block_table/.ledger, cache.pool (sectors of blocks)
#   5.17: cache.group_cache_managers[*].block_table, cache._block_manager (blocks)
#   ContinuousBatchingConfig.page_size (5.24) or .block_size (5.17)
# ------------------------------------------------------------------------------------------------

class _Loop:
    """The manager's generation loop, one body per ``step`` in the calling thread."""

    def __init__(self, model, use_async: bool, page_size: int, num_pages: int,
                 max_batch_tokens: int, max_requests: int, seed: int) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        page = "page_size" if "page_size" in fields else "block_size"
        cb_config = ContinuousBatchingConfig(
            **{page: page_size}, num_blocks=num_pages, max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_requests, use_async_batching=use_async,
            use_cuda_graph=False, seed=seed, cpu_offload_space=0.0)
        generation = GenerationConfig(do_sample=False, eos_token_id=tiny.EOS_TOKEN_ID)
        self.model = model
        # sizing logs "no psutil" on every CPU engine; the sizes here are all given
        cb_logger = logging.getLogger("ContinuousBatchingLogger")
        level = cb_logger.level
        cb_logger.setLevel(logging.CRITICAL)
        try:
            self.manager = model.init_continuous_batching(generation_config=generation,
                                                          continuous_batching_config=cb_config)
            with torch.random.fork_rng(devices=_rng_devices(model.device)):
                self.processor = self.manager._create_batch_processor()   # seeds torch globally
        except MemoryError as exc:   # it checks the cache against the memory it can see
            raise RuntimeError(f"transformers refused a KV cache of {num_pages} pages: {exc} "
                               f"(on CPU without CUDA, transformers 5.17 sees no memory unless "
                               f"psutil is installed)") from None
        finally:
            cb_logger.setLevel(level)
        self.manager.batch_processor = self.processor
        for name in ("prepare_next_batch", "_generation_step", "update_batch", "scheduler"):
            if not hasattr(self.processor, name):
                raise RuntimeError(f"transformers continuous batching has no "
                                   f"ContinuousBatchProcessor.{name}: this version's internals "
                                   f"differ from those the adapter knows")
        if use_async:   # the one host wait async mode is designed with
            ios = self.processor.inputs_and_outputs
            ios.prepare_batch_update = sync_guard.allow(ASYNC_UPDATE_WAIT)(ios.prepare_batch_update)
        self.cache = self.processor.cache
        self.sectors = hasattr(self.cache, "cache_allocators")
        self.use_async = use_async
        self.in_flight = False
        self.batches = 0
        self._resets: set[tuple[str, float]] = set()   # soft resets seen (recompute preemptions)

    def add(self, request_id: str, prompt: list[int], max_tokens: int, eos: list[int]) -> None:
        self.manager.add_request(prompt, request_id=request_id, max_new_tokens=max_tokens,
                                 streaming=True, eos_token_id=eos)

    def cancel(self, request_id: str) -> None:
        self.manager.cancel_request(request_id)

    @torch.no_grad()
    def step(self) -> None:
        """Sync: schedule, run and update one batch. Async: schedule and launch a batch, then
        update the one launched before it (none on the first)."""
        try:
            if self.use_async:
                self._body()
            else:
                with sync_guard.allow(SYNC_MODE_WAITS):
                    self._body()
        except (sync_guard.GuardError, InvariantViolation):
            raise
        except Exception as exc:
            raise TransformersCrash(f"transformers CB raised in its generation loop body "
                                    f"({type(exc).__name__}: {exc}); its own thread would fail "
                                    f"every request and stop") from exc

    def _body(self) -> None:
        processor = self.processor
        if not processor.prepare_next_batch():
            return   # nothing to schedule: the manager's thread would wait here
        processor._generation_step(self.model)
        self.batches += 1
        if self.use_async and not self.in_flight:
            self.in_flight = True   # bootstrapping: the first batch is not updated yet
        else:
            processor.update_batch()
        # a soft reset requeues an equivalent state whose prompt holds the generated ids
        self._resets |= {(s.request_id, s.created_time)
                         for s in processor.scheduler.waiting_requests.values()
                         if s._true_initial_tokens}

    def results(self) -> list:
        """The results the last step delivered, in order (the manager's public queue)."""
        out = []
        while (result := self.manager.get_result()) is not None:
            out.append(result)
        return out

    def stats(self) -> dict:
        total, free, _ = self._census()
        blocks = self.cache.num_blocks   # whole-model blocks of one page per layer
        return {"batches": self.batches, "num_preemptions": len(self._resets),
                "num_total_blocks": blocks,
                "num_free_blocks": free * blocks // total}   # free or cached for prefix reuse

    def problems(self, live: set[str]) -> list[str]:
        """What is inconsistent, given the request ids the adapter holds unfinished."""
        scheduler = self.processor.scheduler
        active, waiting = set(scheduler.active_requests), set(scheduler.waiting_requests)
        found = []
        if active & waiting:
            found.append(f"requests both active and waiting: {sorted(active & waiting)}")
        if active | waiting != live:
            found.append(f"scheduler holds {sorted(active | waiting)} but the unfinished "
                         f"requests are {sorted(live)}")
        total, free, holders = self._census()
        if holders - active:
            found.append(f"KV blocks held by requests that are not active: "
                         f"{sorted(holders - active)}")
        if not live and free != total:
            found.append(f"idle, but only {free} of {total} KV units are free or cached")
        return found

    def _census(self) -> tuple[int, int, set[str]]:
        """(cache size, free or cached for prefix reuse, ids holding blocks), in bytes (5.24) or
        blocks (5.17); InvariantViolation when in use, cached and free do not add up."""
        cache = self.cache
        if self.sectors:   # 5.24: sectors handed to per-attention-type block allocators
            sector = cache.bytes_per_sector
            total, free, used = cache.num_sectors * sector, cache.pool.num_free_sectors * sector, 0
            holders: set[str] = set()
            for allocator in cache.cache_allocators.values():
                held = {b for blocks in allocator.block_table.values() for b in blocks}
                holders |= {rid for rid, blocks in allocator.block_table.items() if blocks}
                spare = (cache.pool.count_free_blocks(allocator.index)
                         + len(allocator.ledger.cached_blocks))
                free += spare * allocator.bytes_per_block
                used += len(held) * allocator.bytes_per_block
        else:              # 5.17: one block manager shared by the layer groups
            manager = cache._block_manager
            held = {b for cm in cache.group_cache_managers for blocks in cm.block_table.values()
                    for b in blocks}
            holders = {rid for cm in cache.group_cache_managers
                       for rid, blocks in cm.block_table.items() if blocks}
            total, free, used = manager.num_blocks, manager.num_free_blocks, len(held)
        if free + used != total:
            raise InvariantViolation(f"transformers KV cache: {used} in use + {free} free or "
                                     f"cached != {total} (bytes in 5.24, blocks in 5.17)")
        return total, free, holders


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []
