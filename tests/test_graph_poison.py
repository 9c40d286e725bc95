"""The CUDA-graph poison check fires on a step that leaves part of the static buffers unwritten,
and passes the engine (GPU only)."""
from __future__ import annotations

import pytest
import torch

from lockstep.ci.graph_poison import check_graph_poison
from lockstep.engine.cuda_graphs import DecodeGraphs
from lockstep.property_tests.invariants import InvariantViolation

pytestmark = pytest.mark.gpu


def _run_without_padding_resets(self, inputs, num_rows):
    """The copy-in as it was before the check: real rows only (padding rows keep stale data)."""
    b = next(s for s in self.sizes if s >= num_rows)
    attn = inputs.attn
    self.input_ids[:num_rows].copy_(inputs.input_ids)
    self.positions[:num_rows].copy_(inputs.positions)
    self.slot_mapping[:num_rows].copy_(attn.slot_mapping)
    self.block_tables[:num_rows, :attn.block_tables.shape[1]].copy_(attn.block_tables)
    self.graphs[b].replay()
    return self.logits[b][:num_rows]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_engine_writes_every_region_its_graphs_read(hf_checkpoint):
    summary = check_graph_poison(hf_checkpoint("llama"))
    assert "no stale region read; tokens = eager" in summary


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_that_leaves_padding_rows_stale_is_caught_before_the_replay(hf_checkpoint,
                                                                          monkeypatch):
    monkeypatch.setattr(DecodeGraphs, "run", _run_without_padding_resets)
    with pytest.raises(InvariantViolation, match="still hold the sentinel"):
        check_graph_poison(hf_checkpoint("llama"))
