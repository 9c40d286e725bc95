"""The sim device behaves like a GPU where it matters: lag, stale reads, racy staging writes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lockstep.engine.sim import SimDevice


def test_lazy_host_read_before_waiting_sees_stale_data():
    dev = SimDevice("lazy")
    src = torch.full((4,), 7)
    dst = torch.zeros(4, dtype=torch.int64)
    dev.copy_async(dst, src, dev.copy)
    done = dev.record(dev.copy)
    assert dst.tolist() == [0, 0, 0, 0] and not done.query()
    done.synchronize()
    assert dst.tolist() == [7, 7, 7, 7] and done.query()


def test_lazy_host_write_to_staging_buffer_before_its_copy_ran_reaches_the_device():
    dev = SimDevice("lazy")
    buf = dev.host_buffer(4, torch.int64)
    [staged] = buf.stage([np.arange(4)])
    buf.host_np[:] = 99  # rewrite without the fence: the pending copy reads the new values
    dev.synchronize()
    assert staged.tolist() == [99, 99, 99, 99]


def test_fence_makes_the_staged_values_reach_the_device_before_the_rewrite():
    dev = SimDevice("lazy")
    buf = dev.host_buffer(4, torch.int64)
    [staged] = buf.stage([np.arange(4)])
    buf.fence()
    buf.host_np[:] = 99
    dev.synchronize()
    assert staged.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("policy", ["lazy", "threaded"])
def test_a_stream_waiting_on_an_event_runs_after_the_other_streams_work(policy):
    dev = SimDevice(policy, seed=3)
    order: list[str] = []
    dev.launch(dev.compute, lambda: order.append("compute"))
    dev.wait(dev.copy, dev.record(dev.compute))
    dev.launch(dev.copy, lambda: order.append("copy"))
    dev.record(dev.copy).synchronize()
    assert order == ["compute", "copy"]


def test_eager_runs_work_at_once():
    dev = SimDevice("eager")
    ran: list[int] = []
    dev.launch(dev.compute, lambda: ran.append(1))
    assert ran == [1]


def test_threaded_work_runs_off_the_host_thread_and_in_stream_order():
    import threading
    dev = SimDevice("threaded", seed=1)
    seen: list[tuple[int, str]] = []
    for i in range(20):
        dev.launch(dev.compute, lambda i=i: seen.append((i, threading.current_thread().name)))
    dev.synchronize()
    assert [i for i, _ in seen] == list(range(20))
    assert all(name == "sim-compute" for _, name in seen)


@pytest.mark.parametrize("policy", ["lazy", "threaded"])
def test_device_work_failure_surfaces_at_the_next_host_wait(policy):
    dev = SimDevice(policy)
    dev.launch(dev.compute, lambda: 1 / 0)
    with pytest.raises((RuntimeError, ZeroDivisionError)):
        dev.synchronize()


def _within(seconds: float, call) -> BaseException | None:
    """Run ``call`` in a thread; fail if it is still waiting after ``seconds``, else what it
    raised (None if nothing)."""
    import threading
    raised: list[BaseException | None] = [None]

    def run():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised[0] = exc
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the wait never ended"
    return raised[0]


def test_an_interrupt_inside_an_eager_event_completion_still_completes_it(monkeypatch):
    """Before: a SIGINT in the host thread inside the completion left the event pending, and the
    skewed policy's copy stream then waited on it forever (a hang after a double Ctrl-C)."""
    import lockstep.engine.sim as sim
    device = SimDevice("skewed")
    real, calls = sim.time.perf_counter_ns, {"n": 0}

    def interrupted():
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real()
    monkeypatch.setattr(sim.time, "perf_counter_ns", interrupted)
    event = device.record(device.compute)   # eager: completes (or is cut short) at once
    monkeypatch.setattr(sim.time, "perf_counter_ns", real)
    assert event.is_done()
    device.wait(device.copy, event)
    # the interrupt reaches the host at its next wait, as device work's would; then all is well
    assert isinstance(_within(5, device.copy.synchronize), KeyboardInterrupt)
    assert _within(5, device.copy.synchronize) is None


@pytest.mark.parametrize("policy", ["eager", "lazy"])
def test_a_wait_that_can_never_end_is_an_error_not_a_hang(policy):
    device = SimDevice(policy)
    orphan = sim_event_never_enqueued(device)
    error = _within(5, orphan.synchronize)
    assert isinstance(error, RuntimeError) and "can never complete" in str(error)


def sim_event_never_enqueued(device: SimDevice):
    """An event whose completing item is gone (as when an interrupt cut it short)."""
    from lockstep.engine.sim import SimEvent
    return SimEvent(device.compute)
