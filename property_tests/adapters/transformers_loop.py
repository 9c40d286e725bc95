"""The one place that touches transformers' continuous-batching internals: its generation loop,
one body per ``step``, in the calling thread (:class:`Loop`), and the KV cache census the
adapter's invariants read. Tested on 5.17.0 and 5.24.0.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

import sync_guard

from ..invariants import InvariantViolation
from . import transformers_model as tiny

# the host waits transformers designs in: sync mode copies every batch in and out with blocking
# copies; async mode waits only for the D2H copy of the batch it updates
SYNC_MODE_WAITS = "transformers CB sync mode: blocking copies in and out of every batch"
ASYNC_UPDATE_WAIT = "transformers CB async: the update waits for its batch's D2H copy (d2h_over)"


class TransformersCrash(RuntimeError):
    """Transformers raised inside one iteration of its generation loop: the engine is broken."""


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

class Loop:
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
