"""sync_guard's native hook: host syncs made from native code, judged at CUDA's API boundary
(CUPTI callbacks). The judging logic runs anywhere; the hook itself needs a GPU."""
from __future__ import annotations

import ctypes
import logging

import pytest
import torch

import sync_guard
from sync_guard import _scope, native


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


class FakeCall:
    """A CUPTI callback made by hand: (domain, site, name, params) through ``_Hook._on_call``."""

    def __init__(self) -> None:
        self.hook = object.__new__(native._Hook)
        self.hook.names = {}
        self.keep = []

    def __call__(self, domain: int, site: int, name: str, kind: int | None = None,
                 correlation: int = 0) -> None:
        params = None
        if kind is not None:
            raw = (ctypes.c_int * 16)()
            ctypes.c_int.from_address(ctypes.addressof(raw) + native.KIND_OFFSET[name]).value = kind
            self.keep.append(raw)
            params = ctypes.addressof(raw)
        data = native.CallbackData(site, name.encode(), params, None, None, None, 0, None,
                                   correlation)
        self.keep.append(data)
        self.hook._on_call(None, domain, 0, ctypes.addressof(data))

    def blocking(self, domain: int, name: str, kind: int | None = None,
                 inner: tuple | None = None) -> None:
        self.calls = getattr(self, "calls", 0) + 2   # CUPTI's correlation ids of the two calls
        self(domain, native.API_ENTER, name, kind, self.calls)
        if inner:
            self(inner[0], native.API_ENTER, inner[1], None, self.calls + 1)
            self(inner[0], native.API_EXIT, inner[1], None, self.calls + 1)
        self(domain, native.API_EXIT, name, kind, self.calls)


def test_the_callback_judges_by_scope_once_per_call_and_skips_device_to_device():
    call = FakeCall()
    with sync_guard.disallow(), sync_guard.allow("record") as seen:
        # the runtime call and the driver call it makes: one report, the runtime's name
        call.blocking(native.RUNTIME, "cudaDeviceSynchronize",
                      inner=(native.DRIVER, "cuCtxSynchronize"))
        call.blocking(native.RUNTIME, "cudaMemcpy", kind=3)     # device to device: no sync
        call.blocking(native.RUNTIME, "cudaMemcpy", kind=2)     # device to host
        call.blocking(native.DRIVER, "cuStreamSynchronize")
        with native.quiet():                                    # judged in Python already
            call.blocking(native.RUNTIME, "cudaStreamSynchronize")
    assert [r.op for r in seen] == ["cudaDeviceSynchronize (native)", "cudaMemcpy (native)",
                                    "cuStreamSynchronize (native)"]
    # the user's frames end at the one that made the native call (here, the fake caller)
    assert seen[0].frames[-1].name == "__call__"
    assert not any("sync_guard" in f.filename for f in seen[0].frames)


def test_a_broken_callback_is_logged_and_never_raises_into_native_code(caplog, monkeypatch):
    monkeypatch.setattr(_scope, "_internal_errors", [0])   # it logs the first one only
    hook = object.__new__(native._Hook)
    hook.names = {}
    data = native.CallbackData(native.API_ENTER, None)   # no function name: the lookup fails
    with caplog.at_level(logging.ERROR, logger="sync_guard"), sync_guard.disallow():
        hook._on_call(None, native.DRIVER, 0, ctypes.addressof(data))
    assert "a native callback failed" in caplog.text


def test_an_exit_without_its_entry_leaves_driver_calls_judged():
    # the hook installed while a runtime call was in progress sees only that call's exit
    call = FakeCall()
    with sync_guard.disallow(), sync_guard.allow("record") as seen:
        call(native.RUNTIME, native.API_EXIT, "cudaDeviceSynchronize", None, 99)
        call.blocking(native.DRIVER, "cuCtxSynchronize")
    assert [r.op for r in seen] == ["cuCtxSynchronize (native)"]


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
    watched = native.install()
    assert watched >= 10, watched
    yield
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
        torch.cuda.synchronize()
        torch.ones(4, device="cuda").sum().item()
    assert len(seen) == 2 and "native" not in seen[0].op, [r.op for r in seen]
