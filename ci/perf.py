"""The gate's performance check on a GPU, against a stored, noise-aware baseline.

One measurement builds the Llama-3.2-1B-shaped random bf16 checkpoint of ``lockstep bench``,
measures the HBM floor (weight bytes over the copy bandwidth measured in the same run), and
then ``REPS`` times, alternating, the batch-1 decode TPOT of the sync and the async engine. Two
ratios come out of each repetition, and their medians are judged:

* ``async_over_floor``: async TPOT / HBM floor (lower is better);
* ``async_speedup``: sync TPOT / async TPOT (higher is better).

The baseline (``ci/baselines/perf.json``, keyed by device name) holds each ratio's median and
its noise: the spread (max - min over median) of the medians of ``ROUNDS`` measurements taken
when the baseline was recorded. The check fails when a median is worse than the baseline by
more than ``max(MIN_TOLERANCE, NOISE_FACTOR * noise)``. ``docs/benchmarks.md`` records the
numbers and the measured noise.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

BASELINES = Path(__file__).parent / "baselines" / "perf.json"
REPS = 5
ROUNDS = 3
SHORT, LONG = 16, 80
MIN_TOLERANCE = 0.05
NOISE_FACTOR = 3.0
METRICS = {"async_over_floor": "lower", "async_speedup": "higher"}


def measure(reps: int = REPS) -> dict:
    from .bench import LLAMA_3_2_1B, random_checkpoint
    with random_checkpoint(LLAMA_3_2_1B, "cuda", torch.bfloat16, "lockstep-perf-") as workdir:
        return _measure(workdir, reps)


def _measure(workdir: Path, reps: int) -> dict:
    from lockstep.engine import LLM

    from .bench import copy_bandwidth, engine_tpot
    floor_ms = (workdir / "model.safetensors").stat().st_size / copy_bandwidth("cuda") * 1e3
    engines = {mode: LLM(model=str(workdir), device="cuda", dtype=torch.bfloat16,
                         async_scheduling=mode == "async", max_num_seqs=1, max_model_len=256,
                         cuda_graph_sizes=(1,)) for mode in ("sync", "async")}
    tpot: dict[str, list[float]] = {"sync": [], "async": []}
    for _ in range(reps):
        for mode, llm in engines.items():
            tpot[mode].append(engine_tpot(llm, 1, SHORT, LONG)[0] * 1e3)
    return {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
            "hbm_floor_ms": floor_ms, "sync_tpot_ms": tpot["sync"], "async_tpot_ms": tpot["async"],
            "async_over_floor": [a / floor_ms for a in tpot["async"]],
            "async_speedup": [s / a for s, a in zip(tpot["sync"], tpot["async"])]}


def _medians(m: dict) -> dict[str, float]:
    return {k: statistics.median(m[k]) for k in METRICS}


def record_baseline(path: Path = BASELINES) -> dict:
    """Measure ``ROUNDS`` times and store each ratio's median and noise for this device."""
    rounds = [measure() for _ in range(ROUNDS)]
    meds = [_medians(r) for r in rounds]
    entry = {"date": rounds[0]["date"], "rounds": ROUNDS, "reps": REPS,
             "hbm_floor_ms": statistics.median(r["hbm_floor_ms"] for r in rounds)}
    for k in METRICS:
        values = [m[k] for m in meds]
        mid = statistics.median(values)
        entry[k] = {"median": mid, "noise": (max(values) - min(values)) / mid,
                    "rounds": values}
    data = json.loads(path.read_text()) if path.exists() else {}
    data[rounds[0]["device"]] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return entry


def judge(current: dict[str, float], base: dict) -> list[str]:
    """The ratios worse than the baseline beyond its tolerance."""
    problems = []
    for k, better in METRICS.items():
        ref = base[k]["median"]
        tol = max(MIN_TOLERANCE, NOISE_FACTOR * base[k]["noise"])
        worse = current[k] > ref * (1 + tol) if better == "lower" else current[k] < ref * (1 - tol)
        if worse:
            problems.append(f"{k} {current[k]:.3f} vs baseline {ref:.3f} (tolerance {tol:.1%})")
    return problems


def check_against_baseline(path: Path = BASELINES) -> str:
    device = torch.cuda.get_device_name()
    data = json.loads(path.read_text()) if path.exists() else {}
    if device not in data:
        raise AssertionError(f"no stored performance baseline for {device!r} in {path.name}; "
                             f"record one with "
                             f"`lockstep gate --device cuda --record-perf-baseline`")
    current = _medians(measure())
    problems = judge(current, data[device])
    summary = ", ".join(f"{k} {v:.3f} (baseline {data[device][k]['median']:.3f})"
                        for k, v in current.items())
    assert not problems, "performance regression: " + "; ".join(problems)
    return f"batch 1, median of {REPS}: {summary}"
