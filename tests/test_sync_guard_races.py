"""The pinned-buffer race checker on the sim device (the CUDA path is covered by ``gpu`` tests).

The tests report each copy, event record, stream wait and host wait to the checker by hand, next
to the sim device operation it stands for, and silence the sim's own reports (``hooks.on_*``),
so every report here is the explicit one the test makes, whether or not ``engine/sim.py`` is
wired to the checker. One test at the end uses the sim device's own reports where it makes them.
"""
from __future__ import annotations

import inspect
import threading

import pytest
import torch

from lockstep.engine.sim import SimDevice
from sync_guard import hooks, races
from sync_guard.races import BufferRace, race_check


@pytest.fixture
def dev(monkeypatch):
    """A lazy sim device whose own reports to the checker are silenced (see the module doc)."""
    for name in ("on_copy", "on_record", "on_wait", "on_host_wait", "on_event_query"):
        monkeypatch.setattr(hooks, name, lambda *args, **kwargs: None)
    return SimDevice("lazy")


def copy(dev, dst, src, stream):
    dev.copy_async(dst, src, stream)
    races.copy_enqueued(dst, src, stream)


def record(dev, stream):
    event = dev.record(stream)
    races.event_recorded(event, stream)
    return event


def wait(dev, stream, event):
    dev.wait(stream, event)
    races.stream_waited(stream, event)


def host_wait(event):
    event.synchronize()  # lazy: the queued device work runs now, as device work
    races.host_waited(event=event)


def h2d(dev, src):
    """An H2D copy of ``src`` on the compute stream and the event recorded after it."""
    copy(dev, dev.zeros(src.numel(), dtype=src.dtype), src, dev.compute)
    return record(dev, dev.compute)


def d2h(dev, dst):
    """A D2H copy into ``dst`` on the copy stream and the event recorded after it."""
    src = dev.zeros(dst.numel(), dtype=dst.dtype)
    src.fill_(3)
    copy(dev, dst, src, dev.copy)
    return record(dev, dev.copy)


# A host write to the source of a pending host-to-device copy.

def test_a_torch_op_writing_a_pending_h2d_source_raises(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        with pytest.raises(BufferRace, match="host write"):
            src.fill_(5)


def test_an_indexing_write_to_a_pending_h2d_source_raises(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        with pytest.raises(BufferRace):
            src[2] = 7


def test_an_out_argument_naming_a_pending_h2d_source_raises(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        with pytest.raises(BufferRace):
            torch.add(torch.ones(8, dtype=torch.int64), 1, out=src)


def test_a_host_read_of_a_pending_h2d_source_is_fine(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        assert src.sum().item() == 28
        assert src.tolist() == list(range(8))


def test_a_write_after_the_host_waited_for_the_copy_is_fine(dev):
    src = torch.arange(8)
    with race_check():
        host_wait(h2d(dev, src))
        src.fill_(5)


def test_a_write_to_a_region_no_pending_copy_reads_is_fine(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src[:4])
        src[4:].fill_(5)
        with pytest.raises(BufferRace):
            src[3:5].fill_(5)


# Writes through a numpy view, which torch never sees: the digest notices them.

def test_a_numpy_write_to_a_pending_h2d_source_raises_at_the_host_wait(dev):
    src = torch.arange(8)
    with race_check():
        event = h2d(dev, src)
        src.numpy()[3] = 9
        with pytest.raises(BufferRace, match="changed while"):
            host_wait(event)


def test_a_numpy_write_to_a_pending_h2d_source_raises_at_the_next_overlapping_copy(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        src.numpy()[3] = 9
        with pytest.raises(BufferRace, match="overlapping"):
            h2d(dev, src[2:6])


def test_a_numpy_write_never_waited_for_raises_when_the_check_ends(dev):
    src = torch.arange(8)
    with pytest.raises(BufferRace, match="exit of race_check"):
        with race_check():
            h2d(dev, src)
            src.numpy()[3] = 9


def test_a_numpy_write_after_the_host_waited_is_fine(dev):
    src = torch.arange(8)
    with race_check():
        event = h2d(dev, src)
        view = src.numpy()
        host_wait(event)
        view[3] = 9
        h2d(dev, src)


# Host access to the destination of a pending device-to-host copy.

@pytest.mark.parametrize("read", {
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.numpy(),
    "item": lambda t: t[0].item(),
    "sum": lambda t: t.sum(),
    "repr": repr,
}.items(), ids=lambda item: item[0])
def test_a_host_read_of_a_pending_d2h_destination_raises(dev, read):
    dst = torch.zeros(4, dtype=torch.int64)
    with race_check():
        d2h(dev, dst)
        with pytest.raises(BufferRace, match="host read"):
            read[1](dst)


def test_allocating_like_a_pending_d2h_destination_is_not_a_read(dev):
    dst = torch.zeros(4, dtype=torch.int64)
    with race_check():
        d2h(dev, dst)
        assert torch.empty_like(dst).shape == dst[1:].new_zeros(4).shape


def test_a_host_write_to_a_pending_d2h_destination_raises(dev):
    dst = torch.zeros(4, dtype=torch.int64)
    with race_check():
        d2h(dev, dst)
        with pytest.raises(BufferRace, match="host write"):
            dst.zero_()


def test_a_d2h_destination_reads_the_copied_values_after_the_host_waited(dev):
    dst = torch.zeros(4, dtype=torch.int64)
    with race_check():
        host_wait(d2h(dev, dst))
        assert dst.tolist() == [3, 3, 3, 3]


# Happens-before across streams and kinds of wait.

def test_waiting_on_a_stream_that_waited_on_the_copy_event_completes_the_copy(dev):
    src = torch.arange(8)
    with race_check():
        copied = h2d(dev, src)
        wait(dev, dev.copy, copied)
        host_wait(record(dev, dev.copy))
        src.fill_(5)


def test_waiting_on_an_event_recorded_before_the_copy_leaves_it_pending(dev):
    src = torch.arange(8)
    with race_check():
        earlier = record(dev, dev.compute)
        h2d(dev, src)
        host_wait(earlier)
        with pytest.raises(BufferRace):
            src.fill_(5)


def test_waiting_on_an_unrelated_stream_leaves_the_copy_pending(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        host_wait(record(dev, dev.copy))
        with pytest.raises(BufferRace):
            src.fill_(5)


def test_a_host_wait_on_the_stream_completes_its_copies(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        races.host_waited(stream=dev.compute)
        src.fill_(5)


def test_a_whole_device_wait_completes_every_copy(dev):
    src, dst = torch.arange(8), torch.zeros(4, dtype=torch.int64)
    with race_check():
        h2d(dev, src)
        d2h(dev, dst)
        races.host_waited()
        src.fill_(5)
        dst.tolist()


# Scope: who is judged, and what a report says.

def test_the_checker_is_off_outside_race_check(dev):
    src = torch.arange(8)
    h2d(dev, src)
    src.fill_(5)
    with race_check():
        src.fill_(6)  # the copy was enqueued while unarmed: unknown, so not pending


def test_a_thread_that_did_not_arm_the_checker_is_not_judged(dev):
    src, dst = torch.zeros(8, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    errors: list[BaseException] = []

    def touch() -> None:
        try:
            src.fill_(0)  # a write that leaves the bytes (and the digest) as they were
            dst.tolist()
        except BaseException as exc:
            errors.append(exc)

    with race_check():
        h2d(dev, src)
        d2h(dev, dst)
        worker = threading.Thread(target=touch)
        worker.start()
        worker.join()
    assert errors == []


def test_nested_scopes_share_the_pending_copies(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        with race_check():
            with pytest.raises(BufferRace):
                src.fill_(5)


def test_race_check_works_as_a_decorator(dev):
    src = torch.arange(8)

    @race_check()
    def stage_then_overwrite() -> None:
        h2d(dev, src)
        src.fill_(5)

    with pytest.raises(BufferRace):
        stage_then_overwrite()


def test_a_report_names_the_buffer_both_sites_and_the_thread(dev):
    src = torch.arange(8)
    with race_check():
        h2d(dev, src)
        with pytest.raises(BufferRace) as info:
            src.fill_(5)
    message = str(info.value)
    name = "test_a_report_names_the_buffer_both_sites_and_the_thread"
    assert message.count(name) == 2, message
    assert "in h2d" in message and "src.fill_(5)" in message
    assert "shape=(8,) dtype=torch.int64" in message and f"{src.data_ptr():#x}" in message
    assert repr(threading.current_thread().name) in message
    assert info.value.copy_site and info.value.access_site


def test_a_negative_widening_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="widen_ms=-1"):
        race_check(widen_ms=-1)


@pytest.mark.skipif("hooks.on_copy" not in inspect.getsource(SimDevice.copy_async),
                    reason="engine/sim.py does not report its copies to the checker yet")
def test_the_sim_devices_own_reports_drive_the_checker():
    dev = SimDevice("lazy")
    src = torch.arange(8)
    with race_check():
        dev.copy_async(dev.zeros(8, dtype=torch.int64), src, dev.compute)
        copied = dev.record(dev.compute)
        with pytest.raises(BufferRace):
            src.fill_(5)
        copied.synchronize()
        src.fill_(5)


# The CUDA path: plain torch code, no device layer.

@pytest.mark.gpu
def test_cuda_a_write_to_a_pinned_source_before_its_event_completes_raises():
    src = torch.arange(1 << 20, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    with race_check(widen_ms=50):
        dst.copy_(src, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        with pytest.raises(BufferRace):
            src.fill_(5)
        copied.synchronize()
        src.fill_(5)


@pytest.mark.gpu
def test_cuda_a_read_of_a_pinned_destination_before_a_stream_wait_raises():
    x = torch.arange(16, device="cuda")
    host = torch.empty(16, dtype=torch.int64, pin_memory=True)
    with race_check():
        host.copy_(x, non_blocking=True)
        with pytest.raises(BufferRace):
            host.tolist()
        torch.cuda.current_stream().synchronize()
        assert host.tolist() == list(range(16))


def test_race_check_at_level_log_records_and_does_not_raise():
    dev = SimDevice("lazy")
    host, target = torch.zeros(4), dev.zeros(4, dtype=torch.float32)
    with race_check(level="log") as found:
        dev.copy_async(target, host, dev.compute)
        host.fill_(1.0)    # the copy has not read it yet
    assert len(found) == 1 and "host write" in str(found[0])
    with pytest.raises(ValueError, match="checks nothing"):
        race_check(level="allow")
