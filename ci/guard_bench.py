"""``lockstep guard-bench``: what an armed sync_guard costs the engine's decode step.

The same engine and workload run with every ``EngineCore.step`` plain, then as
``pytest -m nosync`` runs it: the race checker armed throughout and each step inside
``sync_guard.disallow()``. Reported per mode: decode TPOT (from the difference of two generation lengths) and the
host time per step, guard off vs on.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

import sync_guard
from lockstep.engine import LLM
from lockstep.engine.core import EngineCore
from lockstep.engine.models.default import random_llama_weights, write_checkpoint

from .bench import LLAMA_3_2_1B, TINY, engine_tpot


class _GuardedSteps:
    """As under ``pytest -m nosync``: the race checker throughout, each step under ``disallow``."""

    def __enter__(self):
        self.original = EngineCore.step
        self.races = sync_guard.race_check()
        self.races.__enter__()

        def step(engine):
            with sync_guard.disallow():
                return self.original(engine)
        EngineCore.step = step

    def __exit__(self, *exc):
        EngineCore.step = self.original
        self.races.__exit__(*exc)


def run_guard_bench(device: str = "cuda", batch_sizes: tuple[int, ...] = (1, 8),
                    shape: str = "llama-3.2-1b", short: int = 32, long: int = 160,
                    repeats: int = 3, out: str | None = None) -> dict:
    config = LLAMA_3_2_1B if shape == "llama-3.2-1b" else TINY
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    workdir = Path(tempfile.mkdtemp(prefix="lockstep-guard-bench-"))
    write_checkpoint(workdir, config, random_llama_weights(config, 0, std=0.02, device=device,
                                                           dtype=dtype))
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "shape": shape, "rows": []}
    for mode in ("async", "sync"):
        llm = LLM(model=str(workdir), device=device, dtype=dtype,
                  async_scheduling=mode == "async", max_num_seqs=max(batch_sizes),
                  max_model_len=1024, max_num_batched_tokens=4096,
                  cuda_graph_sizes=batch_sizes if device == "cuda" else None)
        for batch in batch_sizes:
            row = {"mode": mode, "batch": batch}
            for guard in ("off", "on"):  # alternate, best of ``repeats``: drift hits both alike
                best = None
                for _ in range(repeats):
                    if guard == "on":
                        with _GuardedSteps():
                            tpot, _, host = engine_tpot(llm, batch, short, long)
                    else:
                        tpot, _, host = engine_tpot(llm, batch, short, long)
                    if best is None or tpot < best[0]:
                        best = (tpot, host)
                row[f"tpot_ms_guard_{guard}"] = best[0] * 1e3
                row[f"host_ms_guard_{guard}"] = sum(best[1].values())
            row["overhead"] = row["tpot_ms_guard_on"] / row["tpot_ms_guard_off"] - 1
            results["rows"].append(row)
            print(json.dumps(row))
    print(f"\n{results['date']} {results['device']} ({shape}): armed sync_guard vs off")
    print("| mode | batch | TPOT off ms | TPOT armed ms | overhead | host ms/step off | armed |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['mode']} | {r['batch']} | {r['tpot_ms_guard_off']:.3f} "
              f"| {r['tpot_ms_guard_on']:.3f} | {r['overhead']:+.1%} "
              f"| {r['host_ms_guard_off']:.3f} | {r['host_ms_guard_on']:.3f} |")
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
    return results
