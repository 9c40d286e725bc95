"""``lockstep guard-bench``: what each sync_guard mode costs the engine's decode step.

The same engine and workload run with ``EngineCore.step`` plain and under each mode:

* ``light``: the always-on mode, each step inside ``sync_guard.light()``;
* ``deep``: as ``pytest -m nosync`` runs it (N = 1): the race checker armed throughout and each
  step inside ``sync_guard.disallow()``;
* ``sampled``: the deep mode on one step in ``sync_guard._sampled.DEFAULT_EVERY``
  (``sync_guard.sampled``);
* ``light_pages16``: the light mode with page protection sampled, one guarded copy in 16
  (``SYNC_GUARD_PAGES=16``).

Per engine mode and batch size: decode TPOT (from the difference of two generation lengths),
the median of ``repeats`` runs alternating the modes within one process, its spread (max - min
over the median), and the overhead over plain measured in the same phase: the median of the
per-round ratios (each guarded run over the plain run of its own round, so drift of the host
between rounds cancels), with the quartiles of those ratios. The JSON and the
report record the host (:mod:`lockstep.ci.host`: CPU model, cores, a calibration figure) and the
versions, since a guard's cost is host time and differs from host to host.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import sync_guard
from sync_guard import pages
from lockstep.engine import LLM
from lockstep.engine.core import EngineCore

from .bench import LLAMA_3_2_1B, TINY, engine_tpot, random_checkpoint, summary, versions
from .host import describe, host_info

# light leaves torch's process-wide sync check on (see sync_guard._light): the deep modes are
# measured first, in a process where it was never armed, then light against its own "off".
PHASES = (("off", "deep", "sampled"), ("off", "light", "light_pages16"))


class _Reports(logging.Handler):
    """What the guard reported while measuring (level "log"), per mode: counted, not shown."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "off"
        self.seen: dict[str, list[str]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.setdefault(self.mode, []).append(record.getMessage())


_reports = _Reports()


@contextmanager
def guarded_steps(mode: str):
    _reports.mode = mode
    original = EngineCore.step
    if mode == "off":
        yield
        return
    # at level "log": the cost of judging is the same, and a report (the native hook sees the
    # attention backend's first-step cudaFree, say) must not end the measurement
    every = None
    if mode in ("light", "light_pages16"):
        if mode == "light_pages16" and torch.cuda.is_available():
            every = pages.set_protect_every(16)

        def step(engine):
            with sync_guard.light("log"):
                return original(engine)
    elif mode == "sampled":
        step = sync_guard.sampled(original, level="log")
    else:
        races = sync_guard.race_check(level="log")
        races.__enter__()

        def step(engine):
            with sync_guard.log():
                return original(engine)
    EngineCore.step = step
    try:
        yield
    finally:
        EngineCore.step = original
        if mode == "deep":
            races.__exit__(None, None, None)
        if every is not None:
            pages.set_protect_every(every)


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def run_guard_bench(device: str = "cuda", batch_sizes: tuple[int, ...] = (1, 8),
                    shape: str = "llama-3.2-1b", short: int = 32, long: int = 160,
                    repeats: int = 5, out: str | None = None) -> dict:
    config = LLAMA_3_2_1B if shape == "llama-3.2-1b" else TINY
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logger = logging.getLogger("sync_guard")
    logger.addHandler(_reports)   # counted into the results, not shown, for this run only
    propagate, logger.propagate = logger.propagate, False
    _reports.seen.clear()
    try:
        with random_checkpoint(config, device, dtype, "lockstep-guard-bench-") as workdir:
            return _run(workdir, device, dtype, batch_sizes, shape, short, long, repeats, out)
    finally:
        logger.removeHandler(_reports)
        logger.propagate = propagate


def _run(workdir: Path, device: str, dtype: torch.dtype, batch_sizes: tuple[int, ...],
         shape: str, short: int, long: int, repeats: int, out: str | None) -> dict:
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "shape": shape, "repeats": repeats,
               "host": host_info(), **versions(), "rows": []}
    llms = {engine_mode: LLM(model=str(workdir), device=device, dtype=dtype,
                             async_scheduling=engine_mode == "async",
                             max_num_seqs=max(batch_sizes), max_model_len=1024,
                             max_num_batched_tokens=4096,
                             cuda_graph_sizes=batch_sizes if device == "cuda" else None)
            for engine_mode in ("async", "sync")}
    rows = {(m, b): {"mode": m, "batch": b} for m in llms for b in batch_sizes}
    for phase in PHASES:
        for (engine_mode, batch), row in rows.items():
            samples: dict[str, list[float]] = {mode: [] for mode in phase}
            for _ in range(repeats):  # alternate the modes: drift hits all alike
                for mode in phase:
                    with guarded_steps(mode):
                        samples[mode].append(engine_tpot(llms[engine_mode], batch, short,
                                                         long)[0])
            stats = {mode: summary(values) for mode, values in samples.items()}
            off = "off" if phase is PHASES[0] else "off_light_phase"
            row[f"tpot_ms_{off}"], row[f"spread_{off}"] = (stats["off"]["median_ms"],
                                                           stats["off"]["spread"])
            for mode in phase[1:]:
                row[f"tpot_ms_{mode}"], row[f"spread_{mode}"] = (stats[mode]["median_ms"],
                                                                 stats[mode]["spread"])
                # over this phase's own "off", round by round
                ratios = sorted(g / o - 1 for g, o in zip(samples[mode], samples["off"]))
                row[f"overhead_{mode}"] = statistics.median(ratios)
                row[f"overhead_{mode}_quartiles"] = _quartiles(ratios)
    for row in rows.values():
        results["rows"].append(row)
        print(json.dumps(row))
    results["reports"] = {mode: {"count": len(seen), "first": seen[0][:2000]}
                          for mode, seen in _reports.seen.items()}
    for mode, seen in results["reports"].items():
        print(f"reports under {mode}: {seen['count']}; first: {seen['first'][:600]}")
    print(f"\n{results['date']} {results['device']} ({shape}, commit {results['commit']}, "
          f"torch {results['torch']}): decode TPOT per sync_guard mode, median of {repeats} "
          f"alternated repetitions ± spread (overhead: median of the per-round ratios over the "
          f"phase's own off, with their quartiles)")
    print(describe(results["host"]))
    print("| engine | batch | off ms | deep (N=1) ms | sampled (N=16) ms | off ms, 2nd phase "
          "| light ms | light, pages 1/16 ms |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(r: dict, m: str) -> str:
        overhead = ""
        if f"overhead_{m}" in r:
            low, high = r[f"overhead_{m}_quartiles"]
            overhead = f" ({r[f'overhead_{m}']:+.1%}, {low:+.1%}..{high:+.1%})"
        return f"{r[f'tpot_ms_{m}']:.3f} ± {r[f'spread_{m}']:.0%}{overhead}"
    for r in results["rows"]:
        cells = [cell(r, m) for m in ("off", "deep", "sampled", "off_light_phase", "light",
                                      "light_pages16")]
        print(f"| {r['mode']} | {r['batch']} | {' | '.join(cells)} |")
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results
