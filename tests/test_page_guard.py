"""The page guard: staging buffers whose pages are protected while a copy is pending.

The copies, events and host waits are fed to sync_guard's real C model through the entry point
CUPTI calls (``cupti_calls.FakeCupti``); the protection, the fault and its report are real on
any Linux machine. The GPU half (real CUPTI, real DMA) is in the native corpus and the gpu tests.
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
import threading

import pytest
import torch

import sync_guard
from sync_guard import native, pages

from cupti_calls import NOT_READY, FakeCupti

RT, DRV = native.RUNTIME, native.DRIVER
STREAM, SIDE, EVENT, EARLY, LATER = 0x7100, 0x7200, 0x8100, 0x8200, 0x8300
H2D, D2H = 1, 2


@pytest.fixture
def cuda():
    fake = FakeCupti({name: RT for name in (
        "cudaMemcpyAsync", "cudaEventRecord", "cudaStreamWaitEvent", "cudaEventSynchronize",
        "cudaEventQuery", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventDestroy")}
        | {"cuMemcpyHtoDAsync": DRV})
    yield fake
    fake.close()
    pages.release_all()


@pytest.fixture
def buf():
    tensor = sync_guard.staging_empty((4096,), torch.float32, name="the test's staging buffer",
                                      pin_memory=False)
    return tensor.zero_()


def copy_from(cuda, buf, stream=STREAM, nbytes=None):
    cuda.call("cudaMemcpyAsync", 0xD0000000, buf.data_ptr(), nbytes or buf.nbytes, H2D, stream)


def copy_into(cuda, buf, stream=STREAM):
    cuda.call("cudaMemcpyAsync", buf.data_ptr(), 0xD0000000, buf.nbytes, D2H, stream)


def test_a_staging_buffer_owns_whole_pages(buf):
    page = pages.page_size()
    assert buf.data_ptr() % page == 0 and buf.shape == (4096,)
    assert pages.guarded(buf) and not pages.guarded(torch.empty(4))
    small = sync_guard.staging_empty(3, torch.int64, pin_memory=False)
    assert small.data_ptr() % page == 0 and small.numel() == 3


@pytest.mark.parametrize("write", ["numpy", "fill_", "setitem", "C memset"])
def test_a_write_to_a_pending_copys_source_is_a_race_whoever_makes_it(cuda, buf, write):
    with pytest.raises(sync_guard.BufferRace) as race:
        with sync_guard.light():
            copy_from(cuda, buf)
            if write == "numpy":
                buf.numpy()[7] = 1.0
            elif write == "fill_":
                buf.fill_(2.0)          # torch's CPU kernel, the GIL released
            elif write == "setitem":
                buf[7] = 3.0
            else:
                ctypes.memset(buf.data_ptr() + 28, 0, 4)
            reached = True              # the access completed: the process goes on
    assert reached
    text = str(race.value)
    assert "host write to the test's staging buffer" in text
    assert "host-to-device copy from it" in text and "thread 'MainThread'" in text
    assert "test_page_guard.py" in text and "test_a_write_to_a_pending" in text
    assert pages.counts() == (1, 0)     # still pending for the model; the pages are open


def test_reads_of_a_pending_source_are_fine_and_a_read_of_a_pending_destination_is_not(cuda, buf):
    with sync_guard.light():
        copy_from(cuda, buf)
        assert float(buf.sum()) == 0.0    # reading what the device reads
    with pytest.raises(sync_guard.BufferRace, match="host access to .* device-to-host copy"):
        with sync_guard.light():
            copy_into(cuda, buf)
            buf.numpy()[3]                 # the device may not have written it yet


@pytest.mark.parametrize("fence", ["event sync", "stream sync", "query true", "device sync",
                                   "side stream, waited transitively"])
def test_after_a_host_wait_covering_the_copy_the_buffer_is_free(cuda, buf, fence):
    with sync_guard.light(), sync_guard.allow("the fence"):
        stream = SIDE if "side" in fence else STREAM
        copy_from(cuda, buf, stream)
        cuda.call("cudaEventRecord", EVENT, stream)
        assert pages.counts() == (1, 1)
        if fence == "event sync":
            cuda.call("cudaEventSynchronize", EVENT)
        elif fence == "stream sync":
            cuda.call("cudaStreamSynchronize", STREAM)
        elif fence == "query true":
            cuda.call("cudaEventQuery", EVENT, result=NOT_READY)
            assert pages.counts() == (1, 1)           # not yet
            cuda.call("cudaEventQuery", EVENT)
        elif fence == "device sync":
            cuda.call("cudaDeviceSynchronize")
        else:
            cuda.call("cudaStreamWaitEvent", STREAM, EVENT, 0)
            cuda.call("cudaEventRecord", LATER, STREAM)
            cuda.call("cudaEventSynchronize", LATER)
        assert pages.counts() == (0, 0)
        buf.fill_(5.0)


@pytest.mark.parametrize("fence", ["wrong event", "wrong stream", "unrelated wait"])
def test_a_host_wait_that_does_not_cover_the_copy_leaves_it_pending(cuda, buf, fence):
    with pytest.raises(sync_guard.BufferRace):
        with sync_guard.light(), sync_guard.allow("the fence"):
            cuda.call("cudaEventRecord", EARLY, STREAM)
            copy_from(cuda, buf, SIDE if fence == "wrong stream" else STREAM)
            if fence == "wrong event":
                cuda.call("cudaEventSynchronize", EARLY)
            elif fence == "wrong stream":
                cuda.call("cudaStreamSynchronize", STREAM)
            else:
                cuda.call("cudaEventRecord", LATER, SIDE)
                cuda.call("cudaEventSynchronize", LATER)
            buf.numpy()[0] = 1.0


def test_only_the_pages_a_copy_touches_are_protected(cuda):
    page = pages.page_size()
    two = sync_guard.staging_empty(2 * page, torch.uint8, pin_memory=False)
    with sync_guard.light():
        copy_from(cuda, two, nbytes=page)      # the first page only
        two.numpy()[page + 1] = 1              # the second: free
    with pytest.raises(sync_guard.BufferRace, match=r"\(byte 5\)"):
        with sync_guard.light():
            copy_from(cuda, two, nbytes=page)
            two.numpy()[5] = 1


def test_a_driver_copy_inside_a_runtime_call_counts_once_and_a_direct_one_counts(cuda, buf):
    with sync_guard.light(), sync_guard.allow("the fence"):
        cuda.call("cudaMemcpyAsync", 0xD0000000, buf.data_ptr(), 64, H2D, STREAM,
                  inner=lambda: cuda.call("cuMemcpyHtoDAsync", 0xD0000000, buf.data_ptr(), 64,
                                          STREAM))
        assert pages.counts() == (1, 1)
        cuda.call("cuMemcpyHtoDAsync", 0xD0000000, buf.data_ptr(), 64, STREAM)
        assert pages.counts() == (2, 1)
        cuda.call("cudaDeviceSynchronize")
        assert pages.counts() == (0, 0)


def test_an_unguarded_thread_pays_no_protection_and_a_failed_copy_none(cuda, buf):
    copy_from(cuda, buf)                       # no scope: nothing protected
    assert pages.counts() == (0, 0)
    buf.fill_(1.0)
    with sync_guard.light():
        cuda.call("cudaMemcpyAsync", 0xD0000000, buf.data_ptr(), 64, H2D, STREAM, result=1)
        assert pages.counts() == (0, 0)        # the call failed: no copy is pending


def test_another_threads_write_is_reported_naming_that_thread(cuda, buf):
    wrote, done = threading.Event(), threading.Event()

    def writer():
        buf.numpy()[1] = 9.0
        wrote.set()
        done.wait(60)
    thread = threading.Thread(target=writer, name="the writer")
    try:
        with pytest.raises(sync_guard.BufferRace, match="by thread 'the writer'") as race:
            with sync_guard.light():
                copy_from(cuda, buf)
                thread.start()
                assert wrote.wait(60)
        assert "in writer" in str(race.value)
    finally:
        done.set()
        thread.join()


def test_log_level_logs_and_race_check_reports_too(cuda, buf, caplog):
    with sync_guard.light("log"):
        copy_from(cuda, buf)
        buf.numpy()[0] = 1.0
    assert "host write to the test's staging buffer" in caplog.text
    with sync_guard.race_check(level="log") as races:
        copy_from(cuda, buf)
        ctypes.memset(buf.data_ptr(), 0, 8)    # C: invisible to the deep mode's own checks
    assert len(races) == 1 and "seen by the page guard" in str(races[0])


def test_pages_are_opened_when_a_scope_fails_and_when_the_buffer_goes(cuda, buf):
    with pytest.raises(KeyboardInterrupt):
        with sync_guard.light():
            copy_from(cuda, buf)
            raise KeyboardInterrupt
    assert pages.counts() == (0, 0)
    buf.fill_(1.0)
    other = sync_guard.staging_empty(1024, pin_memory=False)
    with sync_guard.light():
        copy_from(cuda, other)
        assert pages.counts() == (1, 1)
        del other
        assert pages.counts() == (0, 0)


CRASH = """
import ctypes, faulthandler, sys, torch, sync_guard
sys.path.insert(0, "tests")
from cupti_calls import FakeCupti
faulthandler.enable()
cuda = FakeCupti({"cudaMemcpyAsync": 2})
buf = sync_guard.staging_empty(1024, pin_memory=False)
with sync_guard.light("log"):
    cuda.call("cudaMemcpyAsync", 0xD0000000, buf.data_ptr(), 4096, 1, 0x7100)
    buf.numpy()[0] = 1.0
print("survived the guarded fault", flush=True)
ctypes.string_at(8)   # a real crash, outside every guarded range
"""


def test_a_fault_outside_every_guarded_range_still_crashes_through_faulthandler():
    done = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, text=True,
                          timeout=120)
    assert "survived the guarded fault" in done.stdout
    assert done.returncode == -11, (done.returncode, done.stderr[-2000:])
    assert "Fatal Python error: Segmentation fault" in done.stderr


def test_sampled_protection_protects_one_copy_in_n_and_models_them_all(cuda, buf, monkeypatch):
    monkeypatch.setenv(pages.PAGES_ENV, "x")
    with pytest.raises(ValueError, match="SYNC_GUARD_PAGES='x'"):
        pages.protect_every_from_env()
    previous = pages.set_protect_every(2)
    try:
        protected = []
        with sync_guard.light(), sync_guard.allow("the fence"):
            for _ in range(4):
                copy_from(cuda, buf)
                protected.append(pages.counts()[1])
                cuda.call("cudaDeviceSynchronize")
                assert pages.counts() == (0, 0)
        assert sorted(protected) == [0, 0, 1, 1]
    finally:
        pages.set_protect_every(previous)


def test_sampling_counts_per_buffer_so_two_buffers_copied_each_step_are_both_protected(cuda,
                                                                                     buf):
    other = sync_guard.staging_empty((4096,), torch.float32, name="the second buffer",
                                     pin_memory=False).zero_()
    previous = pages.set_protect_every(2)
    try:
        protected = {"first": 0, "second": 0}
        with sync_guard.light(), sync_guard.allow("the fence"):
            for _ in range(4):   # a step copies from both: one sampling tick per thread would
                for name, tensor in (("first", buf), ("second", other)):   # pick one always
                    before = pages.counts()[1]
                    copy_from(cuda, tensor)
                    protected[name] += pages.counts()[1] - before
                cuda.call("cudaDeviceSynchronize")
        assert protected == {"first": 2, "second": 2}
    finally:
        pages.set_protect_every(previous)


def test_the_event_table_grows_past_its_first_size_without_losing_a_record(cuda, buf):
    live = [0x900000 + 16 * i for i in range(10000)]   # more live events than the first table
    with sync_guard.light(), sync_guard.allow("the fence"):
        copy_from(cuda, buf)
        for event in live:
            cuda.call("cudaEventRecord", event, STREAM)
        for event in live[::2]:
            cuda.call("cudaEventDestroy", event)
        assert pages.counts() == (1, 1)
        cuda.call("cudaEventSynchronize", live[-1])    # recorded after the copy, still known
        assert pages.counts() == (0, 0)
    assert ctypes.c_uint64.in_dll(pages.library(), "dropped").value == 0


def test_copies_on_as_many_streams_as_torch_pools_hand_out_are_all_tracked(cuda, buf):
    dropped = ctypes.c_uint64.in_dll(pages.library(), "dropped")
    before = dropped.value
    streams = [0x7000000 + 64 * i for i in range(140)]   # 4 priority pools of 32, and more
    with sync_guard.light(), sync_guard.allow("the fence"):
        for stream in streams:
            copy_from(cuda, buf, stream=stream)
            assert pages.counts() == (1, 1)
            cuda.call("cudaStreamSynchronize", stream)
            assert pages.counts() == (0, 0)
    assert dropped.value == before
