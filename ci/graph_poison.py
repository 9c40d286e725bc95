"""CUDA-graph static buffers: poison, let the engine fill them, and look before the replay.

A captured decode graph reads fixed device buffers (input ids, positions, slot mapping, block
tables) for its whole padded batch. Whatever the engine does not write for a step is left from
an earlier one: a padding row's stale slot can write KV into a live block, a stale id or block
feeds a kernel data it was not given. The check (after TensorRT-LLM#18207's poison-then-replay
test): before each step's copy-in, every static buffer is filled with a sentinel no real value
takes; just before the replay, the region the graph will read (``[:b]`` for batch size ``b``)
must hold no sentinel. A violation is reported before the graph runs, so a sentinel never
reaches a kernel. On the GPU only (the simulated device has no graphs).
"""
from __future__ import annotations

import dataclasses

import torch

import sync_guard
from lockstep.engine import LLM, SamplingParams
from lockstep.property_tests.invariants import InvariantViolation

SENTINEL = -(2 ** 40)   # no token id, position, KV slot or block number
BUFFERS = ("input_ids", "positions", "slot_mapping", "block_tables")


@dataclasses.dataclass
class PoisonReport:
    replays: int = 0
    padded: int = 0   # replays whose batch was padded (rows the step does not own)
    sizes: set = dataclasses.field(default_factory=set)
    # the engine contains a failed step (its requests end "error"), so a violation raised inside
    # the launch is also kept here for the check to raise after the run
    violations: list = dataclasses.field(default_factory=list)


class _CheckedGraph:
    """Stands in for one captured graph: looks at the static buffers, then replays."""

    def __init__(self, graphs, b: int, report: PoisonReport) -> None:
        self.graphs, self.b, self.graph, self.report = graphs, b, graphs.graphs[b], report

    def replay(self) -> None:
        with sync_guard.allow("the poison check reads the static buffers"):
            stale = [name for name in BUFFERS
                     if bool((getattr(self.graphs, name)[:self.b] == SENTINEL).any())]
        if stale:
            message = (f"CUDA graph of batch size {self.b}: {', '.join(stale)} still hold the "
                       f"sentinel in the region the graph reads: the step did not write them "
                       f"(stale values from an earlier step would be read)")
            self.report.violations.append(message)
            raise InvariantViolation(message)
        self.report.replays += 1
        self.report.sizes.add(self.b)
        self.graph.replay()


def poisoned(llm: LLM) -> PoisonReport:
    """Instrument ``llm``'s decode graphs (it must have them: CUDA, not enforce_eager)."""
    graphs = llm.engine.runner.graphs
    if graphs is None:
        raise RuntimeError("the engine captured no CUDA graphs (not CUDA, or enforce_eager)")
    report = PoisonReport()
    for b in list(graphs.graphs):
        graphs.graphs[b] = _CheckedGraph(graphs, b, report)
    run = graphs.run

    def poisoned_run(inputs, num_rows: int):
        for name in BUFFERS:
            getattr(graphs, name).fill_(SENTINEL)
        b = next(s for s in graphs.sizes if s >= num_rows)
        report.padded += b > num_rows
        return run(inputs, num_rows)
    graphs.run = poisoned_run
    return report


def check_graph_poison(model: str | None) -> str:
    """Generate with staggered lengths (the batch shrinks step by step through every captured
    size, with padding) on poisoned graphs; the tokens must equal the eager engine's."""
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True)
              for i in range(8)]
    prompts = [[(11 * i + 7 * j) % 200 + 3 for j in range(4 + 3 * i)] for i in range(8)]
    kwargs = dict(model=model, device="cuda", dtype=torch.float32, max_num_seqs=8,
                  block_size=4, max_model_len=128)
    graphed = LLM(cuda_graph_sizes=(1, 2, 4, 8), **kwargs)
    report = poisoned(graphed)
    outs = graphed.generate(prompts, params)
    if report.violations:
        raise InvariantViolation(report.violations[0])
    errored = [o.request_id for o in outs if o.finish_reason == "error"]
    if errored:
        raise InvariantViolation(f"graphed decode ended {errored} with an error")
    eager = LLM(enforce_eager=True, **kwargs).generate(prompts, params)
    differ = [o.request_id for o, e in zip(outs, eager) if o.token_ids != e.token_ids]
    if differ:
        raise InvariantViolation(f"graphed decode differs from eager for {differ}")
    if report.padded == 0 or len(report.sizes) < 3:
        raise AssertionError(f"the workload did not exercise padded replays: {report}")
    return (f"{report.replays} replays on poisoned static buffers ({report.padded} padded, "
            f"sizes {sorted(report.sizes)}): no stale region read; tokens = eager")
