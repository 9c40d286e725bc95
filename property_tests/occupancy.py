"""Occupancy: async scheduling must not run smaller batches than sync at request turnover.

A request whose last token is in flight ("retiring") needs no more rows; if it still held its
place among ``max_num_seqs``, the async engine would admit late at every turnover and run more,
smaller steps than the sync engine for the same tokens (vLLM #45257, TensorRT-LLM #18457,
SGLang #30295). Tokens stay right, so only the rows per step show it.

The rule compares an async run with the sync run of the same workload: no more device steps
than sync (+1: the collect of the last step may take an extra call), and at every step index
at least as many rows. It applies where what async does not know yet cannot matter: every
request ends by length (a stop the host learns a step late costs async a row by design), no
aborts, forced preemptions or reused ids (a client re-adds an id once it saw the request end,
which async reports a step later), no preemption in either run, and a KV cache that holds
every request at once (a retiring request keeps its blocks until its last step is collected).
"""
from __future__ import annotations

from .driver import RunRecord
from .workload import Workload


def occupancy_applies(workload: Workload, sync: RunRecord, run: RunRecord) -> bool:
    if "rows_per_step" not in sync.stats or "rows_per_step" not in run.stats:
        return False   # an engine that does not report its rows
    if workload.aborts or workload.preempt_steps:
        return False
    ids = [r.request_id for r in workload.requests]
    if len(set(ids)) < len(ids):   # a reused id is added once the client saw the last one end
        return False
    if any(r.finish_reason != "length" for r in sync.results.values()):
        return False
    if sync.stats.get("num_preemptions") or run.stats.get("num_preemptions"):
        return False
    spec = workload.engine
    if spec.num_kv_blocks is not None:
        need = sum(-(-(len(r.prompt) + r.params.max_tokens) // spec.block_size)
                   for r in workload.requests)
        if need > spec.num_kv_blocks:
            return False
    return True


def occupancy_errors(sync_rows: list[int], async_rows: list[int]) -> list[str]:
    """What breaks the rule, given the rows of each launched step of both runs."""
    problems = []
    if len(async_rows) > len(sync_rows) + 1:
        problems.append(f"async ran {len(async_rows)} device steps, sync {len(sync_rows)} "
                        f"(+1 allowed)")
    fewer = [i for i, (s, a) in enumerate(zip(sync_rows, async_rows)) if a < s]
    if fewer:
        i = fewer[0]
        problems.append(f"async step {i + 1} ran {async_rows[i]} rows where sync ran "
                        f"{sync_rows[i]} (rows per step: sync {sync_rows[:12]}, async "
                        f"{async_rows[:12]})")
    return problems
