"""CUDA graphs for decode steps: the forward pass captured once per padded batch size.

A decode-only step (one token per row) copies its inputs into static buffers on the device and
replays the graph of the smallest captured batch size that fits. Padding rows write their KV to a
scratch block that no request owns, and read position 0, so they never touch real data. The block
table is sized for ``max_model_len``; attention masks every key past a row's position.
"""
from __future__ import annotations

import gc

import torch

from .input_batch import StepInputs
from .models.attention import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 257, 8))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    """Captured decode forward passes, one per batch size in ``capture_sizes``."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, sizes: list[int],
                 max_blocks_per_seq: int, block_size: int, scratch_block: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = sizes
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.kv_len = max_blocks_per_seq * block_size
        dev = kv_cache.device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block,
                                       dtype=torch.int64, device=dev)
        self._rows = torch.arange(n, device=dev)
        self._cols = torch.zeros(n, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:b], self.block_tables[:b], self._rows[:b],
                                 self._cols[:b], self.positions[:b, None], 1, self.kv_len)
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for b in self.sizes:  # warm-up: lazy initialisation outside the graph
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        # A collection during capture can free or query CUDA objects of other engines, which
        # invalidates the capture ("operation failed due to a previous error during capture").
        collecting = gc.isenabled()
        gc.disable()
        try:
            for b in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self.logits[b] = self._forward(b)
                self.graphs[b] = graph
        finally:
            if collecting:
                gc.enable()
        torch.cuda.synchronize()

    def fits(self, inputs: StepInputs, num_rows: int) -> bool:
        return inputs.attn.q_max == 1 and num_rows <= self.sizes[-1]

    def run(self, inputs: StepInputs, num_rows: int) -> torch.Tensor:
        """Replay the decode graph for ``num_rows`` rows; returns their logits ``[rows, V]``."""
        b = next(s for s in self.sizes if s >= num_rows)
        attn = inputs.attn
        self.input_ids[:num_rows].copy_(inputs.input_ids)
        self.positions[:num_rows].copy_(inputs.positions)
        self.slot_mapping[:num_rows].copy_(attn.slot_mapping)
        width = attn.block_tables.shape[1]
        self.block_tables[:num_rows, :width].copy_(attn.block_tables)
        # everything the graph reads is written for this step (nothing left from an earlier
        # one: the harness's poison check replays with the rest set to a sentinel)
        if width < self.block_tables.shape[1]:
            self.block_tables[:num_rows, width:].fill_(self.scratch_block)
        if b > num_rows:
            self.input_ids[num_rows:b].zero_()
            self.slot_mapping[num_rows:b].fill_(self.scratch_slot)
            self.positions[num_rows:b].zero_()
            self.block_tables[num_rows:b].fill_(self.scratch_block)
        self.graphs[b].replay()
        return self.logits[b][:num_rows]
