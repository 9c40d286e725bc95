"""The native corpus: syncs made from native code, and host accesses to pending staging buffers
made from numpy and C, each judged against ground truth on a CUDA GPU.

``python -m lockstep.ci.native_corpus [--out FILE.json]``

* **Syncs** from ctypes (the CUDA runtime and driver, called directly) and from a C++ extension
  built here with ``torch.utils.cpp_extension`` (``cudaStreamSynchronize``, ``cudaMemcpy``, a
  C++ ``item()``, ``cudaFree``; and calls that do not block: async copies, queries, a kernel
  launch, a device-to-device ``cudaMemcpy``). Ground truth is the sync corpus's timing oracle
  (``ci/sync_corpus.py``: a device sleep queued ahead, the call timed on the host); the deep
  mode (``log()``) and the light mode (``light("log")``) must agree with it on every scored one.
* **Races** on page-owning pinned staging buffers (``sync_guard.staging_empty``): a pending
  host-to-device copy's source written by numpy, ``ctypes.memset``, the C++ extension's
  ``memset``, torch's ``fill_``; a pending device-to-host copy's destination read by numpy,
  ``ctypes.string_at``, the extension, ``tolist``; the copy issued by torch or by the extension.
  Ground truth by construction: no fence is a race, ``event.synchronize()`` after the copy is
  not. Both the light mode and the deep mode (``race_check``) are scored.

Exit status 0 only when every scored row agrees in both modes.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from .race_corpus import race_verdict
from .sync_corpus import Snippet, _yn, run_snippet, sleep_cycles, summarize, unguarded

N = 1 << 16
CPP_SOURCE = r"""
#include <torch/extension.h>
#include <cuda_runtime.h>
#include <cstring>

static void check(cudaError_t status) { TORCH_CHECK(status == cudaSuccess, cudaGetErrorString(status)); }
void stream_sync(int64_t stream) { check(cudaStreamSynchronize((cudaStream_t)stream)); }
void device_sync() { check(cudaDeviceSynchronize()); }
void memcpy_d2h(int64_t dst, int64_t src, int64_t n) {
  check(cudaMemcpy((void *)dst, (const void *)src, n, cudaMemcpyDeviceToHost)); }
void memcpy_d2d(int64_t dst, int64_t src, int64_t n) {
  check(cudaMemcpy((void *)dst, (const void *)src, n, cudaMemcpyDeviceToDevice)); }
void copy_async(int64_t dst, int64_t src, int64_t n, int64_t stream) {
  check(cudaMemcpyAsync((void *)dst, (const void *)src, n, cudaMemcpyDefault, (cudaStream_t)stream)); }
void free_device() { void *p = nullptr; check(cudaMalloc(&p, 1 << 20)); check(cudaFree(p)); }
double item(torch::Tensor t) { return t.sum().item<double>(); }
void add_one(torch::Tensor t) { t.add_(1); }
void host_write(int64_t ptr, int64_t n, int64_t value) { std::memset((void *)ptr, (int)value, n); }
double host_read(int64_t ptr) { return *(volatile float *)ptr; }
"""
_FUNCTIONS = ["stream_sync", "device_sync", "memcpy_d2h", "memcpy_d2d", "copy_async",
              "free_device", "item", "add_one", "host_write", "host_read"]
_libs: dict[str, object] = {}


def extension():
    """The corpus's C++ extension, built once per process (ninja, the host compiler, CUDA's
    headers and runtime)."""
    if "ext" not in _libs:
        from torch.utils.cpp_extension import load_inline
        _libs["ext"] = load_inline("lockstep_native_corpus", CPP_SOURCE, functions=_FUNCTIONS,
                                   with_cuda=True, extra_ldflags=["-lcudart"], verbose=False)
    return _libs["ext"]


def cudart() -> ctypes.CDLL:
    if "cudart" not in _libs:
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                _libs["cudart"] = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise OSError("no libcudart to call through ctypes")
    return _libs["cudart"]


def driver() -> ctypes.CDLL:
    if "cuda" not in _libs:
        _libs["cuda"] = ctypes.CDLL("libcuda.so.1")
    return _libs["cuda"]


def _p(value: int) -> ctypes.c_void_p:
    return ctypes.c_void_p(value)


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


_events: list = []


def _event_after() -> torch.cuda.Event:
    """An event recorded now, kept alive (a temporary's handle would be destroyed before the
    native call uses it)."""
    event = torch.cuda.Event()
    event.record()
    _events.append(event)
    del _events[:-8]
    return event


_buffers = SimpleNamespace()


def _ctx_extra(_c: SimpleNamespace) -> SimpleNamespace:
    """The snippets' own buffers, allocated once before any timing (allocating pinned memory
    inside a timed call would time the allocation)."""
    if not hasattr(_buffers, "host_out"):
        _buffers.host_out = torch.empty(N, pin_memory=True)
        _buffers.pageable_out = torch.empty(N)
        _buffers.dev_in = torch.ones(N, device="cuda")
        _buffers.dev_out = torch.empty(N, device="cuda")
        torch.cuda.synchronize()
    return _buffers


def _bytes(c) -> ctypes.c_size_t:
    return ctypes.c_size_t(N * 4)


def _rt(fn: Callable) -> Callable:
    return lambda c: fn(cudart(), _ctx_extra(c))


def _drv(fn: Callable) -> Callable:
    return lambda c: fn(driver(), _ctx_extra(c))


def _ext(fn: Callable) -> Callable:
    return lambda c: fn(extension(), _ctx_extra(c))


def _free(rt, c) -> None:
    pointer = ctypes.c_void_p()
    rt.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(1 << 20))
    rt.cudaFree(pointer)


SYNCS = [
    Snippet("rt_cudaDeviceSynchronize", _rt(lambda rt, c: rt.cudaDeviceSynchronize()), True,
            "native"),
    Snippet("rt_cudaStreamSynchronize",
            _rt(lambda rt, c: rt.cudaStreamSynchronize(_p(_stream()))), True, "native"),
    Snippet("rt_cudaEventSynchronize",
            _rt(lambda rt, c: rt.cudaEventSynchronize(_p(_event_after().cuda_event))), True,
            "native"),
    Snippet("rt_cudaMemcpy_d2h", _rt(lambda rt, c: rt.cudaMemcpy(
        _p(c.host_out.data_ptr()), _p(c.dev_in.data_ptr()), _bytes(c), 2)), True, "native"),
    Snippet("rt_cudaMemcpy_d2d", _rt(lambda rt, c: rt.cudaMemcpy(
        _p(c.dev_out.data_ptr()), _p(c.dev_in.data_ptr()), _bytes(c), 3)), False, "native"),
    Snippet("rt_cudaMemcpyAsync_d2h_pinned", _rt(lambda rt, c: rt.cudaMemcpyAsync(
        _p(c.host_out.data_ptr()), _p(c.dev_in.data_ptr()), _bytes(c), 2, _p(_stream()))),
        False, "native"),
    Snippet("rt_cudaMemcpyAsync_then_stream_sync", _rt(lambda rt, c: (
        rt.cudaMemcpyAsync(_p(c.host_out.data_ptr()), _p(c.dev_in.data_ptr()), _bytes(c), 2,
                           _p(_stream())), rt.cudaStreamSynchronize(_p(_stream())))), True,
        "native"),
    Snippet("rt_cudaMemcpyAsync_d2h_pageable", _rt(lambda rt, c: rt.cudaMemcpyAsync(
        _p(c.pageable_out.data_ptr()), _p(c.dev_in.data_ptr()), _bytes(c), 2, _p(_stream()))),
        True, "native", informative=True,
        note="a silent sync: an async call the runtime completes synchronously; the native "
             "hook judges blocking functions, not where an async one lands"),
    Snippet("rt_cudaEventQuery", _rt(lambda rt, c: rt.cudaEventQuery(
        _p(_event_after().cuda_event))), False, "native"),
    Snippet("rt_cudaStreamQuery", _rt(lambda rt, c: rt.cudaStreamQuery(_p(_stream()))), False,
            "native"),
    Snippet("rt_cudaMalloc_cudaFree", _rt(_free), True, "native"),
    Snippet("drv_cuCtxSynchronize", _drv(lambda cu, c: cu.cuCtxSynchronize()), True, "native"),
    Snippet("drv_cuStreamSynchronize", _drv(lambda cu, c: cu.cuStreamSynchronize(
        _p(_stream()))), True, "native"),
    Snippet("drv_cuEventSynchronize", _drv(lambda cu, c: cu.cuEventSynchronize(
        _p(_event_after().cuda_event))), True, "native"),
    Snippet("drv_cuMemcpyDtoH", _drv(lambda cu, c: cu.cuMemcpyDtoH_v2(
        _p(c.host_out.data_ptr()), ctypes.c_uint64(c.dev_in.data_ptr()), _bytes(c))), True,
        "native"),
    Snippet("drv_cuMemcpyDtoHAsync", _drv(lambda cu, c: cu.cuMemcpyDtoHAsync_v2(
        _p(c.host_out.data_ptr()), ctypes.c_uint64(c.dev_in.data_ptr()), _bytes(c),
        _p(_stream()))), False, "native"),
    Snippet("ext_cudaStreamSynchronize", _ext(lambda e, c: e.stream_sync(_stream())), True,
            "native"),
    Snippet("ext_cudaDeviceSynchronize", _ext(lambda e, c: e.device_sync()), True, "native"),
    Snippet("ext_cudaMemcpy_d2h", _ext(lambda e, c: e.memcpy_d2h(
        c.host_out.data_ptr(), c.dev_in.data_ptr(), N * 4)), True, "native"),
    Snippet("ext_cudaMemcpy_d2d", _ext(lambda e, c: e.memcpy_d2d(
        c.dev_out.data_ptr(), c.dev_in.data_ptr(), N * 4)), False, "native"),
    Snippet("ext_item", _ext(lambda e, c: e.item(c.dev_in)), True, "native"),
    Snippet("ext_cudaFree", _ext(lambda e, c: e.free_device()), True, "native"),
    Snippet("ext_kernel_launch", _ext(lambda e, c: e.add_one(c.dev_out)), False, "native"),
    Snippet("ext_cudaMemcpyAsync_h2d", _ext(lambda e, c: e.copy_async(
        c.dev_out.data_ptr(), c.host_out.data_ptr(), N * 4, _stream())), False, "native"),
]


# ---------------------------------------------------------------- races

OLD, NEW = 1.0, 7.0
AT = 3
WRITES = {
    "numpy": lambda buf: buf.numpy().__setitem__(AT, NEW),
    "ctypes_memset": lambda buf: ctypes.memset(buf.data_ptr() + 4 * AT, 0x40, 4),
    "ext_memset": lambda buf: extension().host_write(buf.data_ptr() + 4 * AT, 4, 0x40),
    "fill": lambda buf: buf.fill_(NEW),
}
READS = {
    "numpy": lambda out: float(out.numpy()[AT]),
    "ctypes_string_at": lambda out: ctypes.c_float.from_buffer_copy(
        ctypes.string_at(out.data_ptr() + 4 * AT, 4)).value,
    "ext_read": lambda out: extension().host_read(out.data_ptr() + 4 * AT),
    "tolist": lambda out: out.tolist()[AT],
}


@dataclass(frozen=True)
class NativeRace:
    direction: str       # "h2d": a write to the pending copy's source; "d2h": an early read
    access: str          # a key of WRITES or READS
    fenced: bool         # event.synchronize() on an event after the copy, before the access
    copier: str = "torch"  # "torch": Tensor.copy_(non_blocking=True); "ext": cudaMemcpyAsync in C++

    @property
    def name(self) -> str:
        return f"{self.direction}_{self.copier}_{self.access}_{'fenced' if self.fenced else 'none'}"


RACES = ([NativeRace("h2d", w, f) for w in WRITES for f in (False, True)]
         + [NativeRace("d2h", r, f) for r in READS for f in (False, True)]
         + [NativeRace("h2d", "numpy", f, "ext") for f in (False, True)]
         + [NativeRace("d2h", "ctypes_string_at", f, "ext") for f in (False, True)])


def _race_body(sc: NativeRace, cycles: int):
    """(body, observe): body runs the scenario; observe() -> corruption seen (no guard)."""
    import sync_guard
    host = sync_guard.staging_empty(N, torch.float32, name=f"the {sc.direction} staging buffer")
    dev = torch.full((N,), OLD if sc.direction == "h2d" else NEW, device="cuda")
    host.fill_(OLD)
    torch.cuda.synchronize()
    seen: list[float] = []

    def body() -> None:
        torch.cuda._sleep(cycles)
        src, dst = (host, dev) if sc.direction == "h2d" else (dev, host)
        if sc.copier == "torch":
            dst.copy_(src, non_blocking=True)
        else:
            extension().copy_async(dst.data_ptr(), src.data_ptr(), N * 4, _stream())
        event = torch.cuda.Event()
        event.record()
        if sc.fenced:
            with sync_guard.allow("the scenario's fence"):
                event.synchronize()
        if sc.direction == "h2d":
            WRITES[sc.access](host)
        else:
            seen.append(READS[sc.access](host))
        with sync_guard.allow("the scenario's end"):
            event.synchronize()

    def observe() -> bool:
        if sc.direction == "h2d":
            return float(dev[AT].item()) != OLD
        return seen[-1] != NEW
    return body, observe


def run_race(sc: NativeRace, cycles: int) -> dict:
    import sync_guard
    row = {"name": sc.name, "racy": not sc.fenced, "corruption_observed": None, "light": None,
           "deep": None, "light_report": None, "deep_report": None, "error": None}
    try:
        body, observe = _race_body(sc, cycles)
        body()
        torch.cuda.synchronize()
        row["corruption_observed"] = observe()
        body, _ = _race_body(sc, cycles)
        row["light"], row["light_report"] = race_verdict(body, sync_guard.light)
        torch.cuda.synchronize()
        body, _ = _race_body(sc, cycles)
        row["deep"], row["deep_report"] = race_verdict(body, sync_guard.race_check)
    except Exception as exc:  # noqa: BLE001 - a crash under the guard is a finding
        row["error"] = repr(exc)
    torch.cuda.synchronize()
    return row


def summarize_races(rows: list[dict]) -> dict:
    def wrong(mode: str) -> list[str]:
        return [r["name"] for r in rows if r["error"] or r[mode] != r["racy"]]
    return {"scored": len(rows), "light_mismatches": wrong("light"),
            "deep_mismatches": wrong("deep"),
            "errors": {r["name"]: r["error"] for r in rows if r["error"]},
            "racy_without_corruption": [r["name"] for r in rows
                                        if r["racy"] and not r["corruption_observed"]],
            "fenced_with_corruption": [r["name"] for r in rows
                                       if not r["racy"] and r["corruption_observed"]],
            "ok": not wrong("light") and not wrong("deep")}


def run_native_corpus(sleep_ms: float = 50.0, widen_ms: float = 20.0) -> dict:
    from sync_guard import native
    native.install()   # the hook under test: an error here says why it cannot run
    extension()        # built before any timing
    _ctx_extra(SimpleNamespace())
    with unguarded():
        syncs = [run_snippet(s, sleep_ms) for s in SYNCS]
        cycles = sleep_cycles(widen_ms)
        races = [run_race(sc, cycles) for sc in RACES]
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "sleep_ms": sleep_ms, "widen_ms": widen_ms,
            "syncs": syncs, "sync_summary": summarize(syncs),
            "races": races, "race_summary": summarize_races(races)}


def print_native_report(result: dict) -> None:
    print(f"\nnative corpus on {result['device']} (torch {result['torch']})")
    print(f"{'sync snippet':38} {'oracle':6} {'deep':6} {'light':6} {'torch':6} ops")
    for r in result["syncs"]:
        flag = " (informative)" if r["informative"] else (
            " !!" if r["guard"] != r["oracle"] or r["light"] != r["oracle"] else "")
        ops = ", ".join(dict.fromkeys(r["light_ops"] + r["guard_ops"]))
        err = f" ERROR {r['error']}" if r["error"] else ""
        print(f"{r['name']:38} {_yn(r['oracle']):6} {_yn(r['guard']):6} {_yn(r['light']):6} "
              f"{_yn(r['torch_debug']):6} {ops}{flag}{err}")
    s = result["sync_summary"]
    print(f"syncs: deep {s['correct']}/{s['scored']}, light {s['light_correct']}/{s['scored']}; "
          f"mismatches deep {s['mismatches']} light {s['light_mismatches']}; torch's own check "
          f"misses {s['torch_debug_misses']}")
    print(f"\n{'race scenario':38} {'truth':6} {'light':6} {'deep':6} {'corrupted':9} report")
    for r in result["races"]:
        flag = " !!" if r["light"] != r["racy"] or r["deep"] != r["racy"] else ""
        err = f" ERROR {r['error']}" if r["error"] else ""
        print(f"{r['name']:38} {'race' if r['racy'] else 'clean':6} "
              f"{_yn(r['light']).replace('sync', 'race'):6} "
              f"{_yn(r['deep']).replace('sync', 'race'):6} {str(r['corruption_observed']):9} "
              f"{(r['light_report'] or '')[:80]}{flag}{err}")
    s = result["race_summary"]
    print(f"races: {s['scored']} scored; light mismatches {s['light_mismatches']}, deep "
          f"mismatches {s['deep_mismatches']}; racy without corruption "
          f"{s['racy_without_corruption']}, fenced with corruption {s['fenced_with_corruption']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lockstep.ci.native_corpus",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("the native corpus needs a CUDA device", file=sys.stderr)
        return 2
    logging.getLogger("sync_guard").setLevel(logging.ERROR)
    result = run_native_corpus()
    print_native_report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["sync_summary"]["ok"] and result["race_summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
