"""Where the light mode's cost goes on CUDA: one engine, one process, the parts switched one by one.

``python -m lockstep.ci.guard_cost [--batch 1] [--repeats 9] [--out FILE.json]``

Decode TPOT (async engine, Llama-3.2-1B shape, bf16 random weights), the median of ``repeats``
runs per configuration, in this order:

* ``off``: no guard, the native hook not installed;
* ``off, hook installed``: what every CUDA call pays once the hook is subscribed;
* ``light, hook, pages off``: the light mode with the native hook, no page protected
  (``SYNC_GUARD_PAGES=0``);
* ``light, hook, pages 1/16`` and ``light, hook, pages``: page protection sampled, and on every
  guarded copy;
* ``light, no hook``: the hook uninstalled (the Python-level checks only).

Then the same guard work without the model (``synthetic``): a loop of steps that each do what
the engine's step does with the guard (two staging buffers written from numpy and copied with
their events, the reuse checks, two fences and a collect under ``allow``), one configuration
after another within each round, many rounds: the guard's host time per step in microseconds,
free of the model's noise.

Also: the CUPTI callbacks per decode step by function, and the calls into the Python judge per
step (a blocking call in a guarded thread outside a plain ``allow``). The host is recorded
(``ci/host.py``): these are host-time figures.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch


def _callback_names(counts: list[int]) -> dict[str, int]:
    from sync_guard import native
    name = ctypes.c_char_p()
    found = {}
    for domain in (native.DRIVER, native.RUNTIME):
        for cbid in range(native.MAX_CALLBACK_ID):
            n = counts[domain * native.MAX_CALLBACK_ID + cbid]
            if n and native._hook.lib.cuptiGetCallbackName(domain, cbid,
                                                           ctypes.byref(name)) == 0:
                found[name.value.decode()] = n
    return found


SYNTHETIC_STEPS = 400


def _synthetic_step_costs(rounds: int) -> dict:
    """Microseconds per synthetic step per configuration (median over rounds, and spread)."""
    import sync_guard
    from sync_guard import pages
    stream = torch.cuda.current_stream()
    buffers = [(sync_guard.staging_empty((4096,), dtype, name=f"synthetic {dtype}"),
                torch.zeros(4096, dtype=dtype, device="cuda"))
               for dtype in (torch.int64, torch.float32)]
    views = [host.numpy() for host, _ in buffers]
    out = torch.zeros(8, dtype=torch.int64, device="cuda")
    out_host = torch.empty(8, dtype=torch.int64, pin_memory=True)
    copied: list = [None, None]

    def step(n: int) -> None:
        for i, ((host, dev), view) in enumerate(zip(buffers, views)):
            sync_guard.buffer_reused(copied[i], "a synthetic staging buffer")
            view[:64] = n
            dev[:64].copy_(host[:64], non_blocking=True)
            copied[i] = torch.cuda.Event()
            copied[i].record(stream)
        out_host.copy_(out, non_blocking=True)
        collected = torch.cuda.Event()
        collected.record(stream)
        for event in copied:
            with sync_guard.allow("synthetic input-prep fence"):
                event.synchronize()
        with sync_guard.allow("synthetic collect"):
            collected.synchronize()

    def light_step(n: int) -> None:
        with sync_guard.light("log"):
            step(n)

    configs = {"off": (step, None), "light, pages off": (light_step, 0),
               "light, pages 1/16": (light_step, 16), "light, pages": (light_step, 1)}
    samples: dict[str, list[float]] = {label: [] for label in configs}
    for _ in range(rounds + 1):   # the first round warms up, not counted
        for label, (body, every) in configs.items():
            previous = pages.set_protect_every(every) if every is not None else None
            try:
                torch.cuda.synchronize()
                start = time.perf_counter()
                for n in range(SYNTHETIC_STEPS):
                    body(n)
                elapsed = (time.perf_counter() - start) / SYNTHETIC_STEPS * 1e6
            finally:
                if previous is not None:
                    pages.set_protect_every(previous)
            samples[label].append(elapsed)
    result = {}
    for label, values in samples.items():
        values = values[1:]
        median = statistics.median(values)
        result[label] = {"median_us": median, "spread": (max(values) - min(values)) / median}
    return result


def run_guard_cost(batch: int = 1, repeats: int = 9) -> dict:
    import sync_guard
    from sync_guard import native, pages
    from lockstep.engine import LLM
    from lockstep.engine.core import EngineCore

    from .bench import LLAMA_3_2_1B, engine_tpot, random_checkpoint, versions
    from .host import host_info
    original = EngineCore.step
    steps = [0]

    def light_step(engine):
        steps[0] += 1
        with sync_guard.light("log"):
            return original(engine)

    result = {"device": torch.cuda.get_device_name(), "batch": batch, "repeats": repeats,
              "host": host_info(), **versions(), "tpot_ms": {}}
    with random_checkpoint(LLAMA_3_2_1B, "cuda", torch.bfloat16, "lockstep-guard-cost-") as work:
        llm = LLM(model=str(work), device="cuda", dtype=torch.bfloat16, async_scheduling=True,
                  max_num_seqs=max(batch, 1), max_model_len=1024, max_num_batched_tokens=4096,
                  cuda_graph_sizes=(batch,))
        engine_tpot(llm, batch, 32, 160)   # warm-up

        def measure(label: str, step) -> None:
            EngineCore.step = step
            try:
                runs = [engine_tpot(llm, batch, 32, 160)[0] * 1e3 for _ in range(repeats)]
            finally:
                EngineCore.step = original
            median = statistics.median(runs)
            result["tpot_ms"][label] = {"median": median,
                                        "spread": (max(runs) - min(runs)) / median}
            print(f"{label:28} {median:.4f} ms  spread {(max(runs) - min(runs)) / median:.0%}",
                  flush=True)

        measure("off", original)
        native.install()
        lib = pages.library()
        size = 3 * native.MAX_CALLBACK_ID
        calls = (ctypes.c_uint64 * size).in_dll(lib, "sg_calls")
        judged = ctypes.c_uint64.in_dll(lib, "sg_judged")
        before, judged_before, steps[0] = list(calls), judged.value, 0
        measure("light, hook, pages", light_step)
        per_step = max(steps[0], 1)
        counts = _callback_names([a - b for a, b in zip(calls, before)])
        result["callbacks_per_step"] = {k: v / per_step for k, v in
                                        sorted(counts.items(), key=lambda kv: -kv[1])}
        result["judged_per_step"] = (judged.value - judged_before) / per_step
        measure("off, hook installed", original)
        every = pages.set_protect_every(0)
        measure("light, hook, pages off", light_step)
        pages.set_protect_every(16)
        measure("light, hook, pages 1/16", light_step)
        pages.set_protect_every(every)
        result["synthetic_us_per_step"] = _synthetic_step_costs(max(repeats, 5) * 3)
        native.uninstall()
        measure("light, no hook", light_step)
    off = result["tpot_ms"]["off"]["median"]
    print(f"\nover off ({result['device']}, batch {batch}, commit {result['commit']}):")
    for label, row in result["tpot_ms"].items():
        print(f"  {label:28} {row['median'] / off - 1:+.1%}")
    print(f"judged in Python per step: {result['judged_per_step']:.2f}; CUPTI callbacks per "
          f"step: {sum(result['callbacks_per_step'].values()):.1f}")
    for name, n in list(result["callbacks_per_step"].items())[:12]:
        print(f"  {name:40} {n:.2f}")
    synthetic = result["synthetic_us_per_step"]
    print(f"synthetic guarded step (no model), host microseconds per step, median of rounds, "
          f"the guard's cost over off and as a share of the engine's off TPOT ({off:.3f} ms):")
    for label, row in synthetic.items():
        extra = row["median_us"] - synthetic["off"]["median_us"]
        print(f"  {label:20} {row['median_us']:8.2f} us  spread {row['spread']:.0%}  "
              f"guard {extra:+7.2f} us = {extra / (off * 1e3):+.2%} of a step")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lockstep.ci.guard_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        print(f"--batch={args.batch} --repeats={args.repeats}: each must be at least 1",
              file=sys.stderr)
        return 2
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        print(f"--out={args.out!r}: its folder does not exist", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("guard_cost measures the native hook: it needs a CUDA device", file=sys.stderr)
        return 2
    logging.getLogger("sync_guard").setLevel(logging.ERROR)
    result = run_guard_cost(args.batch, args.repeats)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
