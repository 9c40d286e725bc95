"""``lockstep soak``: churn many requests through one engine, with aborts and faults, and watch
its memory.

Requests with random prompts and parameters arrive as others finish (``--concurrency`` in the
engine at a time, a tight KV cache, so preemption is common); about ``--abort-rate`` of them are
aborted at a random later step (often with a step in flight), and one step in ``--fault-every``
raises an injected fault in a random phase (schedule, input preparation, device work, collect,
output update). Printed: resident memory after 1,000 and after all requests, what ended how, and
whether anything is still held at the end, once the steps still in flight are collected
(blocks, slots, requests, steps). Exit 1 on a leak or a request that never ended. A benchmark,
not a test: it prints numbers.
"""
from __future__ import annotations

import gc
import json
import os
import random
import time
from contextlib import ExitStack
from unittest import mock

import torch

from lockstep.engine import SamplingParams
from lockstep.engine.config import EngineConfig
from lockstep.engine.core import EngineCore
from lockstep.engine.input_batch import InputBatch
from lockstep.engine.model_runner import ModelRunner, PendingOutput
from lockstep.engine.scheduler import Scheduler

PHASES = ((Scheduler, "schedule"), (InputBatch, "prepare"), (ModelRunner, "_device_step"),
          (PendingOutput, "get_output"), (Scheduler, "update_from_output"))


STALL_STEPS = 2000


class SoakFault(RuntimeError):
    """The fault the soak injects."""


def rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _random_request(rng: random.Random) -> tuple[list[int], SamplingParams]:
    prompt = [rng.randrange(1, 512) for _ in range(rng.randint(1, 24))]
    return prompt, SamplingParams(
        temperature=rng.choice([0.0, 0.7, 1.0]), seed=rng.choice([None, rng.randrange(10**6)]),
        max_tokens=rng.randint(1, 16), min_tokens=rng.choice([0, 0, 1]),
        ignore_eos=rng.random() < 0.5, presence_penalty=rng.choice([0.0, 0.4]),
        repetition_penalty=rng.choice([1.0, 1.1]), logprobs=rng.choice([None, None, 0, 3]))


def _faulting(rng: random.Random, every: int, counts: dict):
    """Patches for PHASES: each call fails with probability 1 / (every * len(PHASES))."""
    def wrap(real):
        def faulty(*args, **kwargs):
            if every and rng.random() < 1 / (every * len(PHASES)):
                counts["faults"] += 1
                raise SoakFault("injected by lockstep soak")
            return real(*args, **kwargs)
        return faulty
    return [mock.patch.object(owner, name, wrap(getattr(owner, name))) for owner, name in PHASES]


def run_soak(requests: int = 10_000, device: str = "sim", policy: str = "lazy",
             async_scheduling: bool = True, concurrency: int = 16, abort_rate: float = 0.2,
             fault_every: int = 200, seed: int = 0, max_steps: int | None = None,
             stall_steps: int = STALL_STEPS) -> dict:
    """``max_steps`` (default: 50 per request, plus 1,000) bounds the run; so does
    ``stall_steps``, calls of ``step()`` in a row in which no request finished while some were live:
    an engine that never drains (a request that lost its last token, say) ends the soak with
    ``stalled`` set, instead of spinning forever."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    core = EngineCore(EngineConfig(
        model="oracle", device=device, sim_policy=policy if device == "sim" else None,
        async_scheduling=async_scheduling, block_size=4, num_kv_blocks=20, max_num_seqs=8,
        max_num_batched_tokens=64, max_model_len=64, seed=seed))
    counts = {"faults": 0, "stop": 0, "length": 0, "abort": 0, "error": 0}
    live: dict[str, int] = {}  # request id -> the step at which to abort it (or -1)
    added = finished = 0
    rss = {}
    start = time.perf_counter()
    limit = max_steps if max_steps is not None else 50 * requests + 1000
    stalled, last_progress, calls = None, 0, 0   # calls: step() calls (an engine that stopped
    # launching does not advance num_steps)
    with ExitStack() as stack:
        for patch in _faulting(rng, fault_every, counts):
            stack.enter_context(patch)
        while finished < requests:
            while len(live) < concurrency and added < requests:
                rid = f"soak-{added}"
                core.add_request(rid, *_random_request(rng))
                live[rid] = core.num_steps + rng.randint(0, 12) if rng.random() < abort_rate \
                    else -1
                added += 1
            for rid, at in list(live.items()):
                if at == core.num_steps:
                    core.abort_request(rid)
            calls += 1
            for out in core.step():
                if out.finished and out.request_id in live:
                    del live[out.request_id]
                    counts[out.finish_reason] += 1
                    finished += 1
                    last_progress = calls
                    if finished == 1000:
                        rss["1k"] = rss_bytes()
            if calls - last_progress > stall_steps:
                stalled = (f"no request finished in {stall_steps} calls of step() (engine step "
                           f"{core.num_steps}); live: {sorted(live)[:8]}")
                break
            if calls > limit:
                stalled = f"past the step bound {limit} with {requests - finished} unfinished"
                break
    # async: the last step launched may still be in flight for requests that have finished;
    # collect it (launching nothing) so that what is held below is what stays held
    if stalled is None:
        core.settle()
    rss[f"{requests // 1000}k"] = rss_bytes()
    held = {"blocks": core.kv.pool.num_blocks - core.kv.num_free_blocks,
            "requests": len(core.scheduler.requests), "in_flight": len(core._in_flight),
            "slots": len(set(core.runner.input_batch.slot_of) - set(core.scheduler._freed))}
    return {"date": time.strftime("%Y-%m-%d"), "device": device, "policy": policy,
            "async": async_scheduling, "requests": requests, "steps": core.num_steps,
            "preemptions": core.scheduler.num_preemptions, "ended": counts, "held": held,
            "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()}, "stalled": stalled,
            "seconds": round(time.perf_counter() - start, 1)}


def print_soak(result: dict) -> int:
    print(json.dumps(result))
    rss = list(result["rss_mib"].values())
    growth = rss[-1] - rss[0] if len(rss) > 1 else 0.0
    print(f"\n{result['date']} soak: {result['requests']} requests, {result['steps']} steps, "
          f"{result['preemptions']} preemptions, ended {result['ended']} "
          f"({result['device']}/{result['policy']}, {'async' if result['async'] else 'sync'})")
    print(f"RSS: " + ", ".join(f"{k} {v} MiB" for k, v in result["rss_mib"].items())
          + f"; growth {growth:+.1f} MiB; still held at the end: {result['held']}")
    if result.get("stalled"):
        print(f"STALLED: {result['stalled']}")
        return 1
    leaked = any(result["held"].values())
    return 1 if leaked else 0
