"""The sync corpus: small torch snippets, each judged by a timing oracle, sync_guard and torch.

``python -m lockstep.ci.sync_corpus [--out FILE.json] [--no-races] [--no-syncs]`` on a CUDA GPU.

Ground truth (the oracle): ``torch.cuda._sleep`` worth ``SLEEP_MS`` is queued on the current stream,
then the snippet is called and timed on the host. It *syncs* when the call took more than half the
sleep: the host waited for the device. Each snippet is warmed up once, then measured twice; the two
must agree. ``expected`` is what we believe; where the oracle disagrees, the oracle wins and the
row is listed (our belief was wrong).

Verdicts compared with the oracle:
* sync_guard: the snippet (after a fresh sleep) inside ``sync_guard.log()``; a sync = any report.
* torch's own sync debug mode (``set_sync_debug_mode("warn")``, process-global: fine in this
  offline script, never in the library); its misses are the true syncs it did not warn about.

Exit status 0 only when sync_guard matches the oracle on every scored snippet (and, when the race
corpus in ``ci/race_corpus.py`` runs too, on every scored race scenario).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

SLEEP_MS = 50.0
N = 1024

_cycles_per_ms: float | None = None
_side: "torch.cuda.Stream | None" = None


# ---------------------------------------------------------------- device helpers

def cycles_per_ms() -> float:
    """``torch.cuda._sleep`` cycles per millisecond on this GPU (measured once with CUDA events)."""
    global _cycles_per_ms
    if _cycles_per_ms is None:
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        probe, rates = 20_000_000, []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(probe)
            end.record()
            end.synchronize()
            rates.append(probe / start.elapsed_time(end))
        _cycles_per_ms = statistics.median(rates)
    return _cycles_per_ms


def sleep_cycles(ms: float) -> int:
    return int(ms * cycles_per_ms())


def unguarded() -> contextlib.AbstractContextManager:
    """Where the corpus itself syncs (oracle, setup, torch's debug mode): never trip a ``SYNC_GUARD``
    default level. A no-op unless that environment variable names a level other than ``allow``."""
    if os.environ.get("SYNC_GUARD", "allow").strip().lower() in ("", "allow"):
        return contextlib.nullcontext()
    import sync_guard
    return sync_guard.allow("the sync/race corpus measuring ground truth")


def side_stream() -> "torch.cuda.Stream":
    global _side
    if _side is None:
        _side = torch.cuda.Stream()
    return _side


# ---------------------------------------------------------------- snippets

@dataclass(frozen=True)
class Snippet:
    name: str
    fn: Callable[[SimpleNamespace], Any]
    expected: bool      # what we believe: does the calling thread wait for the device?
    category: str       # implicit | explicit | silent | none
    informative: bool = False  # reported, not scored: the truth is arguable or driver-dependent
    optional: bool = False     # skipped where this torch build lacks it
    note: str = ""


class Deferred:
    """What a snippet leaves to finish (joining a thread) after its timed call."""

    def __init__(self, finish: Callable[[], None]) -> None:
        self.finish = finish


def _finish(result: Any) -> None:
    if isinstance(result, Deferred):
        result.finish()


def make_ctx() -> SimpleNamespace:
    """Fresh CUDA tensors, pinned and pageable host tensors, a side stream, a completed event."""
    x = torch.randn(N, device="cuda")
    c = SimpleNamespace(
        x=x, y=x.clone(), x_mut=x.clone(), mask=x > 0,
        small=torch.arange(8, device="cuda", dtype=torch.float32),
        scalar=x[0].clone(),
        scalar_int=torch.full((), 3, dtype=torch.int64, device="cuda"),
        scalar_bool=torch.ones((), dtype=torch.bool, device="cuda"),
        cuda_scalar=torch.zeros((), device="cuda"),
        ints=torch.randint(0, 16, (N,), device="cuda"),
        repeats=torch.full((8,), 2, dtype=torch.int64, device="cuda"),
        idx=torch.randint(0, N, (16,), device="cuda"),
        m=torch.randn(64, 64, device="cuda"),
        probs=torch.softmax(torch.randn(4, 32, device="cuda"), -1),
        dev_buf=torch.zeros(N, device="cuda"),
        pinned=torch.zeros(N, pin_memory=True),
        pinned_f64=torch.zeros(N, dtype=torch.float64, pin_memory=True),
        pinned_2d=torch.zeros(N, 2, pin_memory=True),
        pageable=torch.zeros(N),
        side=side_stream(),
        done_event=torch.cuda.Event(),
    )
    c.done_event.record()
    torch.cuda.synchronize()
    return c


def _recorded_event() -> "torch.cuda.Event":
    event = torch.cuda.Event()
    event.record()  # on the current stream, after the oracle's sleep
    return event


def _setitem_mask_tensor(c):
    c.x_mut[c.mask] = c.cuda_scalar  # a CUDA value: index_put_ -> the mask goes through nonzero


def _setitem_mask_scalar(c):
    c.x_mut[c.mask] = 0  # a Python scalar: becomes a CPU value -> index_put_ dispatches masked_fill_


def _empty_cache(c):
    block = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
    del block  # a free cached block, so empty_cache has something to cudaFree
    torch.cuda.empty_cache()


def _other_thread_item(c):
    worker = threading.Thread(target=c.scalar.item, name="sync-corpus-other-thread")
    worker.start()
    return Deferred(worker.join)  # joined after the timed call (oracle) / inside the scope (guard)


S = Snippet
SNIPPETS: list[Snippet] = [
    # implicit syncs: the op needs a device value on the host
    S("item", lambda c: c.scalar.item(), True, "implicit"),
    S("tolist", lambda c: c.small.tolist(), True, "implicit"),
    S("cpu", lambda c: c.x.cpu(), True, "implicit"),
    S("bool", lambda c: bool(c.scalar_bool), True, "implicit"),
    S("int", lambda c: int(c.scalar_int), True, "implicit"),
    S("float", lambda c: float(c.scalar), True, "implicit"),
    S("nonzero", lambda c: c.x.nonzero(), True, "implicit"),
    S("where_1arg", lambda c: torch.where(c.mask), True, "implicit"),
    S("bool_mask_index", lambda c: c.x[c.mask], True, "implicit"),
    S("bool_mask_setitem_tensor", _setitem_mask_tensor, True, "implicit"),
    S("masked_select", lambda c: torch.masked_select(c.x, c.mask), True, "implicit"),
    S("unique", lambda c: torch.unique(c.ints), True, "implicit"),
    S("bincount", lambda c: torch.bincount(c.ints), True, "implicit",
      note="nbins from max().item()"),
    S("repeat_interleave", lambda c: torch.repeat_interleave(c.small, c.repeats), True, "implicit"),
    S("multinomial", lambda c: torch.multinomial(c.probs, 1), True, "implicit",
      note="validity check of probs through .item()"),
    S("tensor_literal_cuda", lambda c: torch.tensor([1, 2, 3], device="cuda"), True, "implicit"),
    S("equal", lambda c: torch.equal(c.x, c.y), True, "implicit"),
    S("str", lambda c: str(c.small), True, "implicit"),
    S("repr", lambda c: repr(c.small), True, "implicit"),
    S("to_cpu_blocking", lambda c: c.x.to("cpu"), True, "implicit"),
    S("copy_d2h_blocking_pageable", lambda c: c.pageable.copy_(c.x), True, "implicit"),
    S("copy_d2h_blocking_pinned", lambda c: c.pinned.copy_(c.x), True, "implicit"),
    S("copy_h2d_blocking_pageable", lambda c: c.dev_buf.copy_(c.pageable), True, "implicit"),
    S("copy_h2d_blocking_pinned", lambda c: c.dev_buf.copy_(c.pinned), True, "implicit"),
    # explicit syncs
    S("cuda_synchronize", lambda c: torch.cuda.synchronize(), True, "explicit"),
    S("stream_synchronize", lambda c: torch.cuda.current_stream().synchronize(), True, "explicit"),
    S("event_synchronize", lambda c: _recorded_event().synchronize(), True, "explicit"),
    S("empty_cache", _empty_cache, True, "explicit"),
    # silent syncs: asked to be non-blocking, waits anyway
    S("d2h_nonblocking_pageable", lambda c: c.pageable.copy_(c.x, non_blocking=True), True,
      "silent", note="cudaMemcpyAsync into pageable memory returns after the copy"),
    S("d2h_nonblocking_strided_pinned",
      lambda c: c.pinned_2d[:, 0].copy_(c.x, non_blocking=True), True, "silent",
      note="strided dst: copied through a pageable temporary (empty_like does not pin)"),
    # not syncs: must not be flagged
    S("d2h_nonblocking_zero_size",
      lambda c: torch.empty(0, pin_memory=True).copy_(c.x[:0], non_blocking=True), False,
      "silent", note="an empty 'pinned' tensor reports is_pinned() False; nothing moves"),
    S("elementwise", lambda c: c.x * 2 + 1, False, "none"),
    S("matmul", lambda c: c.m @ c.m, False, "none"),
    S("reduction_argmax", lambda c: c.x.argmax(), False, "none"),
    S("topk", lambda c: torch.topk(c.x, 8), False, "none"),
    S("arange_cuda", lambda c: torch.arange(N, device="cuda"), False, "none"),
    S("empty_cuda", lambda c: torch.empty(N, device="cuda"), False, "none"),
    S("masked_fill", lambda c: c.x.masked_fill(c.mask, 0.0), False, "none"),
    S("bool_mask_setitem_scalar", _setitem_mask_scalar, False, "none",
      note="THPVariable_setitem makes a CPU value for CUDA self; canDispatchToMaskedFill"),
    S("int_tensor_index", lambda c: c.x[c.idx], False, "none"),
    S("where_3arg", lambda c: torch.where(c.mask, c.x, c.y), False, "none"),
    S("repeat_interleave_output_size",
      lambda c: torch.repeat_interleave(c.small, c.repeats, output_size=16), False, "none"),
    S("nonzero_static", lambda c: torch.nonzero_static(c.x, size=16), False, "none",
      optional=True),
    S("d2h_nonblocking_pinned", lambda c: c.pinned.copy_(c.x, non_blocking=True), False, "none"),
    S("d2h_nonblocking_pinned_f64", lambda c: c.pinned_f64.copy_(c.x, non_blocking=True), False,
      "none", note="dtype converted on the GPU, then an async copy into contiguous pinned"),
    S("to_cpu_nonblocking", lambda c: c.x.to("cpu", non_blocking=True), False, "none",
      note="_to_copy pins the result when non_blocking"),
    S("to_cpu_nonblocking_f64", lambda c: c.x.to("cpu", torch.float64, non_blocking=True), False,
      "none"),
    S("h2d_nonblocking_pinned", lambda c: c.dev_buf.copy_(c.pinned, non_blocking=True), False,
      "none"),
    S("cuda_of_cuda_tensor", lambda c: c.x.cuda(), False, "none"),
    S("event_record", lambda c: _recorded_event(), False, "none"),
    S("stream_wait_event", lambda c: c.side.wait_event(_recorded_event()), False, "none"),
    S("stream_wait_stream", lambda c: c.side.wait_stream(torch.cuda.current_stream()), False,
      "none"),
    S("event_query", lambda c: _recorded_event().query(), False, "none"),
    S("current_stream", lambda c: torch.cuda.current_stream(), False, "none"),
    S("other_thread_item", _other_thread_item, False, "none",
      note="another thread waits; this one does not (joined outside the timed call)"),
    # informative: reported, not scored
    S("h2d_nonblocking_pageable", lambda c: c.dev_buf.copy_(c.pageable, non_blocking=True), False,
      "silent", informative=True, note="CUDA: 'might be synchronous'; small copies are staged"),
    S("h2d_nonblocking_strided_pinned",
      lambda c: c.dev_buf.copy_(c.pinned_2d[:, 0], non_blocking=True), False, "silent",
      informative=True, note="source made contiguous in a pageable temporary first"),
    S("idle_side_stream_synchronize", lambda c: c.side.synchronize(), False, "explicit",
      informative=True, note="a sync API that has nothing to wait for"),
    S("completed_event_synchronize", lambda c: c.done_event.synchronize(), False, "explicit",
      informative=True, note="a sync API on an event that already completed"),
]
del S


# ---------------------------------------------------------------- the passes

def _prepared(cycles: int) -> SimpleNamespace:
    ctx = make_ctx()
    torch.cuda._sleep(cycles)
    return ctx


def oracle_ms(snippet: Snippet, cycles: int) -> float:
    """Host milliseconds the snippet's call took with ``cycles`` of device sleep queued ahead."""
    ctx = _prepared(cycles)
    start = time.perf_counter()
    result = snippet.fn(ctx)
    elapsed = (time.perf_counter() - start) * 1e3
    _finish(result)
    torch.cuda.synchronize()
    return elapsed


def guard_verdict(snippet: Snippet, cycles: int) -> list[str]:
    """The ops sync_guard reports for the snippet in the calling thread."""
    import sync_guard
    ctx = _prepared(cycles)
    try:
        with sync_guard.log() as reports:
            _finish(snippet.fn(ctx))
    finally:
        torch.cuda.synchronize()
    return [report.op for report in reports]


def light_verdict(snippet: Snippet, cycles: int) -> list[str]:
    """The ops sync_guard's always-on mode (``light``) reports for the snippet."""
    import sync_guard
    ctx = _prepared(cycles)
    try:
        with sync_guard.light("log") as reports:
            _finish(snippet.fn(ctx))
    finally:
        torch.cuda.synchronize()
    return [report.op for report in reports]


def torch_debug_warnings(snippet: Snippet, cycles: int) -> int:
    """Warnings from torch's sync debug mode (process-global) while the snippet runs."""
    from sync_guard._light import torch_warnings_shown
    ctx = _prepared(cycles)
    previous = torch.cuda.get_sync_debug_mode()  # sync_guard.light keeps torch armed at "warn"
    _set_debug_mode("warn")  # outside the recording: its "prototype ... synchronizing" notice
    try:
        with warnings.catch_warnings(record=True) as caught, torch_warnings_shown():
            warnings.simplefilter("always")
            _finish(snippet.fn(ctx))
    finally:
        _set_debug_mode(previous)
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) and "prototype" not in str(w.message)
               for w in caught)


def _set_debug_mode(mode) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.cuda.set_sync_debug_mode(mode)


def run_snippet(snippet: Snippet, sleep_ms: float = SLEEP_MS) -> dict:
    cycles, threshold = sleep_cycles(sleep_ms), sleep_ms / 2
    row = {"name": snippet.name, "category": snippet.category, "expected": snippet.expected,
           "informative": snippet.informative, "note": snippet.note, "skipped": False,
           "error": None, "oracle": None, "oracle_ms": [], "guard": None, "guard_ops": [],
           "light": None, "light_ops": [],
           "torch_debug": None, "torch_debug_warnings": None}
    try:
        oracle_ms(snippet, cycles)  # warm-up: lazy init, kernel loading, allocator growth
    except Exception as exc:  # noqa: BLE001 - recorded, reported
        torch.cuda.synchronize()
        if snippet.optional:  # e.g. nonzero_static without a CUDA kernel in this build
            row.update(skipped=True, note=f"unavailable: {exc!r}")
        else:
            row["error"] = repr(exc)
        return row
    try:
        for _ in range(2):  # two measurements must agree; one more pair if they do not
            times = [oracle_ms(snippet, cycles), oracle_ms(snippet, cycles)]
            row["oracle_ms"] += [round(t, 3) for t in times]
            if (times[0] > threshold) == (times[1] > threshold):
                row["oracle"] = times[0] > threshold
                break
        row["guard_ops"] = guard_verdict(snippet, cycles)
        row["guard"] = bool(row["guard_ops"])
        row["light_ops"] = light_verdict(snippet, cycles)
        row["light"] = bool(row["light_ops"])
        row["torch_debug_warnings"] = torch_debug_warnings(snippet, cycles)
        row["torch_debug"] = row["torch_debug_warnings"] > 0
    except Exception as exc:  # noqa: BLE001 - a crash under the guard is a finding, not an abort
        row["error"] = repr(exc)
        torch.cuda.synchronize()
    return row


def summarize(rows: list[dict]) -> dict:
    ran = [r for r in rows if not r["skipped"]]
    scored = [r for r in ran if not r["informative"]]
    correct = [r for r in scored
               if r["error"] is None and r["oracle"] is not None and r["guard"] == r["oracle"]]
    return {
        "scored": len(scored), "correct": len(correct), "ran": len(ran),
        "skipped": [r["name"] for r in rows if r["skipped"]],
        "mismatches": [r["name"] for r in scored if r not in correct],
        "light_correct": sum(r["error"] is None and r["light"] == r["oracle"] for r in scored),
        "light_mismatches": [r["name"] for r in scored
                             if r["error"] is None and r["light"] != r["oracle"]],
        "unstable_oracle": [r["name"] for r in ran if r["error"] is None and r["oracle"] is None],
        "errors": {r["name"]: r["error"] for r in ran if r["error"]},
        "wrong_beliefs": [r["name"] for r in ran
                          if r["oracle"] is not None and r["oracle"] != r["expected"]],
        "true_syncs": [r["name"] for r in ran if r["oracle"] is True],
        "torch_debug_misses": [r["name"] for r in ran
                               if r["oracle"] is True and r["torch_debug"] is False],
        "torch_debug_false_positives": [r["name"] for r in ran
                                        if r["oracle"] is False and r["torch_debug"] is True],
        "ok": bool(scored) and len(correct) == len(scored) and all(
            r["error"] is None and r["light"] == r["oracle"] for r in scored),  # both modes
    }


def run_sync_corpus(sleep_ms: float = SLEEP_MS, names: list[str] | None = None) -> dict:
    """Every snippet (or those in ``names``) through the oracle, sync_guard and torch debug mode."""
    snippets = [s for s in SNIPPETS if names is None or s.name in names]
    with unguarded():  # the guard pass opens its own ``log()`` scope inside
        rows = [run_snippet(s, sleep_ms) for s in snippets]
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "sleep_ms": sleep_ms, "cycles_per_ms": cycles_per_ms(), "snippets": rows,
            "summary": summarize(rows)}


# ---------------------------------------------------------------- report

def _yn(value: bool | None) -> str:
    return {True: "sync", False: "-", None: "?"}[value]


def print_sync_report(result: dict) -> None:
    print(f"\nsync corpus on {result['device']} (torch {result['torch']}), "
          f"sleep {result['sleep_ms']} ms = {result['cycles_per_ms'] * result['sleep_ms']:.3g} "
          "cycles")
    print(f"{'snippet':34} {'category':9} {'expected':8} {'oracle':6} {'ms':>15} {'guard':6} "
          f"{'torch':6} guard ops")
    for r in result["snippets"]:
        if r["skipped"]:
            print(f"{r['name']:34} skipped: {r['note']}")
            continue
        flag = "" if r["informative"] else (" !!" if r["guard"] != r["oracle"] else "")
        flag += " (informative)" if r["informative"] else ""
        flag += " [belief wrong]" if r["oracle"] is not None and r["oracle"] != r["expected"] else ""
        ms = "/".join(f"{t:.1f}" for t in r["oracle_ms"][-2:])
        ops = ", ".join(dict.fromkeys(r["guard_ops"])) or ""
        err = f" ERROR {r['error']}" if r["error"] else ""
        print(f"{r['name']:34} {r['category']:9} {_yn(r['expected']):8} {_yn(r['oracle']):6} "
              f"{ms:>15} {_yn(r['guard']):6} {_yn(r['torch_debug']):6} {ops}{flag}{err}")
    s = result["summary"]
    print(f"guard accuracy: {s['correct']}/{s['scored']}")
    print(f"always-on (light) accuracy: {s['light_correct']}/{s['scored']}; mismatches: "
          f"{s['light_mismatches']}")
    print(f"guard mismatches: {s['mismatches']}")
    print(f"oracle disagrees with expected (belief was wrong): {s['wrong_beliefs']}")
    print(f"torch debug mode misses: {s['torch_debug_misses']}")
    print(f"torch debug mode false positives: {s['torch_debug_false_positives']}")
    if s["unstable_oracle"] or s["errors"] or s["skipped"]:
        print(f"unstable oracle: {s['unstable_oracle']}; errors: {s['errors']}; "
              f"skipped: {s['skipped']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lockstep.ci.sync_corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--races", action="store_true", help="run the race corpus (the default)")
    parser.add_argument("--no-races", action="store_true", help="skip the race corpus")
    parser.add_argument("--no-syncs", action="store_true", help="skip the sync corpus")
    parser.add_argument("--sleep-ms", type=float, default=SLEEP_MS)
    parser.add_argument("--widen-ms", type=float, default=20.0, help="race corpus device delay")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the sync corpus needs a CUDA device", file=sys.stderr)
        return 2
    logging.getLogger("sync_guard").setLevel(logging.ERROR)  # the table says it all
    out, ok = {}, True
    if not args.no_syncs:
        out["syncs"] = run_sync_corpus(args.sleep_ms)
        print_sync_report(out["syncs"])
        ok &= out["syncs"]["summary"]["ok"]
    if args.races or not args.no_races:
        from .race_corpus import print_race_report, run_race_corpus
        out["races"] = run_race_corpus(args.widen_ms)
        print_race_report(out["races"])
        ok &= out["races"]["summary"]["ok"]
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
