"""The guard's cheaper modes: ``light()`` (always-on) and ``sampled()`` (deep on one step in N)."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch

import sync_guard
from lockstep.engine import LLM, SamplingParams
from lockstep.engine.input_batch import InputBatch
from lockstep.engine.sim import SimDevice
from sync_guard._light import TORCH_SYNC_MESSAGE

PROMPTS = [[5, 6, 7], [8, 9], [1, 2, 3, 4]]


def generate(policy: str, async_scheduling: bool = True):
    llm = LLM(model="oracle", device="sim", sim_policy=policy, async_scheduling=async_scheduling)
    return llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, logprobs=0))


def torch_sync_warning() -> None:
    """What torch's C++ sync check issues (as a Python warning) when a thread syncs."""
    warnings.warn(f"{TORCH_SYNC_MESSAGE}", UserWarning)


@pytest.mark.parametrize("policy", ["eager", "lazy", "threaded", "skewed"])
def test_the_clean_engine_runs_under_the_light_guard(policy):
    with sync_guard.light():
        outs = generate(policy)
    assert all(len(o.token_ids) == 6 for o in outs)


def test_light_catches_an_explicit_sync():
    dev = SimDevice("lazy")
    with pytest.raises(sync_guard.SyncViolation, match="SimStream.synchronize"):
        with sync_guard.light():
            dev.compute.synchronize()


def test_light_checks_a_staging_buffer_at_its_reuse(monkeypatch):
    monkeypatch.setattr(InputBatch, "fence", lambda self: None)
    with pytest.raises(sync_guard.BufferRace, match="host rewrite of a staging buffer while its "
                                                     "last copy"):
        with sync_guard.light():
            generate("lazy")


@pytest.fixture
def python_checks(monkeypatch):
    """The light mode's fallback where the native hook is not installed (CPU, or no CUPTI):
    torch's own check, routed per thread. Where the hook is installed, it judges instead."""
    from sync_guard import native
    monkeypatch.setattr(native, "installed", lambda: False)


def test_torchs_check_is_routed_to_the_thread_that_synced_even_under_warning_capture(
        python_checks):
    # this test runs under pytest's own warning capture (catch_warnings(record=True))
    for _ in range(2):  # the same call site twice: each one is judged, not just the first
        with pytest.raises(sync_guard.SyncViolation, match="torch's sync check"):
            with sync_guard.light():
                torch_sync_warning()
    seen = []

    def other_thread():  # not guarded: its sync is its own business, and is not shown either
        with warnings.catch_warnings(record=True) as caught:
            torch_sync_warning()
        seen.extend(caught)
    with sync_guard.light():
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen == []
    with pytest.warns(UserWarning, match="an unrelated warning"):  # everything else passes
        with sync_guard.light():
            warnings.warn("an unrelated warning", UserWarning)


def test_light_at_level_log_records_instead_of_raising(python_checks):
    dev = SimDevice("lazy")
    with sync_guard.light("log") as reports:
        dev.compute.synchronize()
        torch_sync_warning()
    assert [r.op for r in reports] == ["SimStream.synchronize",
                                       "a synchronizing CUDA operation (torch's sync check)"]


def test_sampled_guards_calls_k_and_k_plus_1_of_every_n():
    x = sync_guard.as_device(torch.zeros(3))
    calls = []

    def step(read: bool) -> None:
        calls.append(read)
        if read:
            x.tolist()
    guarded = sync_guard.sampled(step, every=4)
    guarded(False)
    with pytest.raises(sync_guard.SyncViolation):
        guarded(True)          # call 1: guarded
    guarded(True)              # call 2: plain
    guarded(True)              # call 3: plain
    with pytest.raises(sync_guard.SyncViolation):
        guarded(True)          # call 4: guarded again
    assert len(calls) == 5
    with pytest.raises(ValueError, match="every=1"):
        sync_guard.sampled(step, every=1)


def test_sampled_sees_a_race_across_the_two_guarded_steps(monkeypatch):
    monkeypatch.setattr(InputBatch, "fence", lambda self: None)
    from lockstep.engine.core import EngineCore
    monkeypatch.setattr(EngineCore, "step", sync_guard.sampled(EngineCore.step, every=4))
    with pytest.raises(sync_guard.BufferRace):
        generate("lazy")


def test_the_detector_and_the_race_checker_share_one_dispatch_mode():
    """Each pushed Python dispatch mode costs every op a Python call: the deep mode pushes one
    for both checkers, and pops it when the last of them closes."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as stack
    x = sync_guard.as_device(torch.ones(3))
    with sync_guard.race_check():
        with sync_guard.disallow():
            assert len(stack()) == 1
            with pytest.raises(sync_guard.SyncViolation, match="Tensor.item"):
                (x + 1).max().item()
        assert len(stack()) == 1  # the race checker still judges this thread's ops
        host = torch.zeros(3)
        assert float(host.sum()) == 0.0  # no scope: no sync judged
    assert stack() == []


def test_ones_own_staging_buffer_is_checked_at_its_reuse_point():
    """``sync_guard.buffer_reused`` is public: user code calls it where it rewrites a buffer."""
    dev = SimDevice("lazy")  # a copy runs only when the host waits: pending until then
    staging, target = torch.ones(4), dev.zeros(4, dtype=torch.float32)
    dev.copy_async(target, staging, dev.copy)
    copied = dev.record(dev.copy)
    with sync_guard.light(), pytest.raises(sync_guard.BufferRace, match="my staging buffer"):
        sync_guard.buffer_reused(copied, "my staging buffer")
    copied.synchronize()  # the fence
    with sync_guard.light():
        sync_guard.buffer_reused(copied, "my staging buffer")
    assert target.tolist() == [1.0] * 4
