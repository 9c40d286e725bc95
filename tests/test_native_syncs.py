"""sync_guard's native hook: host syncs made from native code, judged at CUDA's API boundary
(CUPTI callbacks). The judging logic runs anywhere; the hook itself needs a GPU."""
from __future__ import annotations

import ctypes
import logging

import pytest
import torch

import sync_guard
from sync_guard import _scope, native, pages

from cupti_calls import FakeCupti


def test_callback_names_lose_their_version_and_stream_suffixes():
    assert native.base_name("cudaMemcpy_ptds_v7000") == "cudaMemcpy"
    assert native.base_name("cudaDeviceSynchronize_v3020") == "cudaDeviceSynchronize"
    assert native.base_name("cuMemcpyDtoH_v2") == "cuMemcpyDtoH"
    assert native.base_name("cuStreamSynchronize_ptsz") == "cuStreamSynchronize"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA (and maybe CUPTI)")
def test_without_cupti_installing_fails_naming_libcupti(monkeypatch):
    monkeypatch.setattr(native, "library_candidates", lambda: ["libcupti.so.99"])
    with pytest.raises(native.NativeHookUnavailable, match="no libcupti could be loaded"):
        native.install()
    assert not native.installed()


def test_a_deferred_violation_is_raised_when_its_scope_exits():
    with pytest.raises(sync_guard.SyncViolation, match="cudaDeviceSynchronize .native."):
        with sync_guard.disallow():
            _scope.check_sync("cudaDeviceSynchronize (native)", deferred=True)
            reached = True   # the native caller was not interrupted
    assert reached
    with sync_guard.disallow():
        with sync_guard.allow("planted: the designed wait") as seen:
            _scope.check_sync("cudaDeviceSynchronize (native)", deferred=True)
    assert [r.allowed_by for r in seen] == ["planted: the designed wait"]


@pytest.fixture
def cupti():
    fake = FakeCupti({"cudaDeviceSynchronize": native.RUNTIME, "cuCtxSynchronize": native.DRIVER,
                      "cudaMemcpy": native.RUNTIME, "cuStreamSynchronize": native.DRIVER,
                      "cudaStreamSynchronize": native.RUNTIME, "cudaLaunchKernel": native.RUNTIME})
    yield fake
    fake.close()


def test_the_callback_judges_by_scope_once_per_call_and_skips_device_to_device(cupti):
    with sync_guard.disallow(), sync_guard.allow("record") as seen:
        # the runtime call and the driver call it makes: one report, the runtime's name
        cupti.call("cudaDeviceSynchronize", inner=lambda: cupti.call("cuCtxSynchronize"))
        cupti.call("cudaMemcpy", 0, 0, 64, 3)     # device to device: no sync
        cupti.call("cudaMemcpy", 0, 0, 64, 2)     # device to host
        cupti.call("cuStreamSynchronize", 0)
        cupti.call("cudaLaunchKernel")            # not watched
        with native.quiet():                      # judged in Python already
            cupti.call("cudaStreamSynchronize", 0)
    assert [r.op for r in seen] == ["cudaDeviceSynchronize (native)", "cudaMemcpy (native)",
                                    "cuStreamSynchronize (native)"]
    # recorded in C under a plain allow, named where the allowance ends (no Python call at
    # the sync: torch released the GIL around the wait)
    assert seen[0].frames[-1].name.startswith("test_the_callback_judges")
    assert not any("sync_guard" in f.filename for f in seen[0].frames)
    assert all(r.allowed_by == "record" for r in seen)


def test_a_judged_native_sync_names_the_frame_that_made_the_call(cupti):
    with pytest.raises(sync_guard.SyncViolation, match="cudaDeviceSynchronize .native.") as err:
        with sync_guard.disallow():
            cupti.call("cudaDeviceSynchronize")
    assert err.value.report.frames[-1].name == "_site"   # the fake caller


def test_under_a_plain_allow_no_python_runs_at_the_sync(cupti, monkeypatch):
    judged = []
    monkeypatch.setattr(cupti.hook, "_on_sync", lambda *a: judged.append(a))
    counting = native._JUDGE(cupti.hook._on_sync)   # kept alive while C holds it
    cupti.lib.sg_set_judge(ctypes.cast(counting, ctypes.c_void_p))
    with sync_guard.disallow():
        with sync_guard.allow("the designed wait") as seen:
            cupti.call("cudaDeviceSynchronize")
            cupti.call("cuStreamSynchronize", 0)
        with sync_guard.allow("first only", first_only=True):   # needs the judge: counted
            cupti.call("cudaDeviceSynchronize")
    assert [r.op for r in seen] == ["cudaDeviceSynchronize (native)",
                                    "cuStreamSynchronize (native)"]
    assert len(judged) == 1


def test_a_thread_without_a_scope_is_not_judged_and_costs_no_python_call(cupti, monkeypatch):
    calls = []
    monkeypatch.setattr(_scope, "check_sync", lambda *a, **k: calls.append(a))
    cupti.call("cudaDeviceSynchronize")
    assert calls == []
    with sync_guard.log():
        cupti.call("cudaDeviceSynchronize")
    assert len(calls) == 1
    cupti.call("cudaDeviceSynchronize")        # the scope closed: the C side knows
    assert len(calls) == 1


def test_a_broken_judge_is_logged_and_never_raises_into_native_code(cupti, caplog, monkeypatch):
    monkeypatch.setattr(_scope, "_internal_errors", [0])   # it logs the first one only
    pages.sync_names[:] = []                               # the name lookup fails
    with caplog.at_level(logging.ERROR, logger="sync_guard"), sync_guard.disallow():
        cupti.call("cudaDeviceSynchronize")
    assert "a native callback failed" in caplog.text


def test_an_exit_without_its_entry_leaves_driver_calls_judged(cupti):
    # the hook installed while a runtime call was in progress sees only that call's exit
    with sync_guard.disallow(), sync_guard.allow("record") as seen:
        cupti._site("cudaDeviceSynchronize", native.API_EXIT, (), 0)
        cupti.call("cuCtxSynchronize")
    assert [r.op for r in seen] == ["cuCtxSynchronize (native)"]


def test_the_callback_table_covers_syncs_and_the_copy_model():
    rows, names = native.callback_table({
        native.RUNTIME: [(1, "cudaMemcpyAsync_ptsz_v7000"), (2, "cudaStreamSynchronize_v3020"),
                         (3, "cudaLaunchKernel_v7000"), (4, "cudaFree_v3020")],
        native.DRIVER: [(5, "cuEventRecord"), (6, "cuMemcpyDtoH_v2")]})
    kinds = {cbid: (kind, names[sync] if sync >= 0 else None) for _, cbid, kind, sync, _ in rows}
    assert kinds == {1: (native.K_COPY_RT, None),
                     2: (native.K_STREAM_SYNC, "cudaStreamSynchronize"),
                     4: (native.K_OTHER_SYNC, "cudaFree"), 5: (native.K_EVENT_RECORD, None),
                     6: (native.K_OTHER_SYNC, "cuMemcpyDtoH")}


def test_sync_guard_native_is_validated(monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="SYNC_GUARD_NATIVE='maybe'"):
        native.requested_mode()
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert native.requested_mode() == "off"


# -- on a GPU ------------------------------------------------------------------------------------

def _cudart() -> ctypes.CDLL:
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    pytest.skip("no libcudart to call from ctypes")


@pytest.fixture
def hooked():
    torch.cuda.init()
    before = native.installed()
    watched = native.install()
    assert watched >= 10, watched
    yield
    if not before:
        native.uninstall()


@pytest.mark.gpu
def test_native_syncs_from_ctypes_are_reported_and_async_calls_are_not(hooked):
    cudart, cuda = _cudart(), ctypes.CDLL("libcuda.so.1")
    dev = torch.ones(1 << 20, device="cuda")
    host = torch.empty(1 << 20).pin_memory()
    other = torch.empty_like(dev)
    stream = torch.cuda.current_stream().cuda_stream
    nbytes = dev.numel() * 4
    with sync_guard.disallow(), sync_guard.allow("record") as seen:
        cudart.cudaDeviceSynchronize()
        cuda.cuCtxSynchronize()
        cudart.cudaMemcpy(ctypes.c_void_p(host.data_ptr()), ctypes.c_void_p(dev.data_ptr()),
                          ctypes.c_size_t(nbytes), 2)                  # device to host
        cudart.cudaMemcpy(ctypes.c_void_p(other.data_ptr()), ctypes.c_void_p(dev.data_ptr()),
                          ctypes.c_size_t(nbytes), 3)                  # device to device
        cudart.cudaMemcpyAsync(ctypes.c_void_p(host.data_ptr()), ctypes.c_void_p(dev.data_ptr()),
                               ctypes.c_size_t(nbytes), 2, ctypes.c_void_p(stream))
        cudart.cudaStreamSynchronize(ctypes.c_void_p(stream))
        dev.add_(1)                                                    # a kernel launch
    ops = [r.op for r in seen]
    assert ops == ["cudaDeviceSynchronize (native)", "cuCtxSynchronize (native)",
                   "cudaMemcpy (native)", "cudaStreamSynchronize (native)"], ops


@pytest.mark.gpu
def test_a_native_sync_under_disallow_fails_the_scope_and_a_python_sync_is_reported_once(hooked):
    cudart = _cudart()
    with pytest.raises(sync_guard.SyncViolation, match="cudaDeviceSynchronize .native."):
        with sync_guard.disallow():
            cudart.cudaDeviceSynchronize()
    with sync_guard.disallow(), sync_guard.allow("record") as seen:
        torch.cuda.synchronize()                  # one blocking call: the native hook's
        torch.ones(4, device="cuda").sum().item()  # judged by the deep mode, not again natively
    ops = sorted(r.op for r in seen)
    assert len(ops) == 2 and ops[1] == "cudaDeviceSynchronize (native)", ops
    assert "native" not in ops[0], ops


@pytest.mark.gpu
def test_cuda_profiling_under_the_hook_fails_saying_what_to_do_and_detection_goes_on(hooked):
    from torch.profiler import ProfilerActivity, profile
    with pytest.raises(native.NativeHookUnavailable, match="native.uninstall"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            torch.ones(4, device="cuda").add_(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:   # CPU activities: unaffected
        torch.ones(4, device="cuda").add_(1)
    assert any("add_" in event.name for event in prof.events())
    with pytest.raises(sync_guard.SyncViolation, match="cudaDeviceSynchronize .native."):
        with sync_guard.disallow():
            _cudart().cudaDeviceSynchronize()


PROFILE_FIRST = """
import logging, sys, torch
from torch.profiler import ProfilerActivity, profile
import sync_guard
from sync_guard import native
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    torch.ones(4, device="cuda").add_(1)
    torch.cuda.synchronize()
assert any(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
try:
    native.install()
except native.NativeHookUnavailable as exc:
    print("refused:", exc)
logging.basicConfig()
with sync_guard.light():   # SYNC_GUARD_NATIVE unset (auto): a warning, the Python checks go on
    pass
print("installed:", native.installed())
"""


@pytest.mark.gpu
def test_after_cuda_profiling_the_hook_is_refused_with_the_reason():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", PROFILE_FIRST], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: CUPTI allows one callback subscriber" in done.stdout
    assert "installed: False" in done.stdout
    assert "the native sync hook is off" in done.stderr
