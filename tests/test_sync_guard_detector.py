"""The sync detector on the sim device (the CUDA rules are checked by the GPU sync corpus)."""
from __future__ import annotations

import os
import subprocess
import sys
import inspect
import threading

import pytest
import torch

import sync_guard
from lockstep.engine.sim import SimDevice


@pytest.fixture
def dev():
    return SimDevice("lazy")


@pytest.fixture
def x(dev):
    t = dev.zeros(4, dtype=torch.float32)
    t.add_(torch.tensor([0.0, 1.0, 0.0, 2.0]))
    return t


IMPLICIT_SYNCS = {
    "item": lambda x: x[1].item(),
    "bool": lambda x: bool(x[1]),
    "float": lambda x: float(x[1]),
    "tolist": lambda x: x.tolist(),
    "cpu": lambda x: x.cpu(),
    "numpy": lambda x: x.numpy(),
    "nonzero": lambda x: x.nonzero(),
    "boolean mask": lambda x: x[x > 0],
    "boolean mask assignment of a device value": lambda x: x.__setitem__(x > 0, x[0]),
    "unique": lambda x: torch.unique(x),
    "equal": lambda x: torch.equal(x, x),
    "masked_select": lambda x: torch.masked_select(x, x > 0),
    "repeat_interleave": lambda x: torch.repeat_interleave(x, (x > 0).long()),
    "print": lambda x: repr(x),
    "copy to host": lambda x: torch.empty(4).copy_(x),
}


@pytest.mark.parametrize("name", list(IMPLICIT_SYNCS))
def test_a_host_read_of_device_memory_raises_under_disallow(x, name):
    with pytest.raises(sync_guard.SyncViolation):
        with sync_guard.disallow():
            IMPLICIT_SYNCS[name](x)


NOT_SYNCS = {
    "elementwise": lambda x: x * 2 + 1,
    "reduction stays on the device": lambda x: x.sum(),
    "repeat_interleave with output_size": lambda x: torch.repeat_interleave(
        x, torch.ones(4, dtype=torch.long), output_size=4),
    "indexing with an integer index": lambda x: x[torch.tensor([0, 2])],
    "where with three arguments": lambda x: torch.where(x > 0, x, -x),
    "boolean mask fill with a python number": lambda x: x.__setitem__(x > 0, 0.0),
    "host-only work": lambda x: torch.arange(4).tolist(),
}


@pytest.mark.parametrize("name", list(NOT_SYNCS))
def test_device_side_work_is_not_a_sync(x, name):
    with sync_guard.disallow() as reports:
        NOT_SYNCS[name](x)
    assert reports == []


def test_explicit_waits_of_the_sim_device_are_syncs(dev):
    event = dev.record(dev.compute)
    with pytest.raises(sync_guard.SyncViolation, match="SimEvent.synchronize"):
        with sync_guard.disallow():
            event.synchronize()
    with pytest.raises(sync_guard.SyncViolation, match="SimStream.synchronize"):
        with sync_guard.disallow():
            dev.compute.synchronize()


def test_work_that_runs_as_the_device_is_not_a_host_sync(dev, x):
    out = dev.zeros(1, dtype=torch.float32)
    with sync_guard.disallow():
        dev.launch(dev.compute, lambda: out.fill_(x[1].item()))  # item() is device-side here
        done = dev.record(dev.compute)
    done.synchronize()
    assert out.tolist() == [1.0]


def test_log_records_without_raising_and_names_op_thread_and_user_frame(x):
    with sync_guard.log() as reports:
        line = inspect.currentframe().f_lineno + 1
        x.tolist()
    [report] = reports
    assert "tolist" in report.op
    assert report.thread == threading.current_thread().name
    assert report.frames[-1].name == "test_log_records_without_raising_and_names_op_thread_and_user_frame"
    assert report.frames[-1].filename == __file__  # the user's line, not the guard's
    assert report.frames[-1].lineno == line   # found from the frame's instruction, lazily
    assert f"line {line}" in str(report)


def test_allow_names_a_sync_and_first_only_allows_just_one(x):
    with sync_guard.disallow():
        with sync_guard.allow("reading the result", first_only=True) as allowed:
            x.tolist()
            with pytest.raises(sync_guard.SyncViolation):
                x.tolist()
    assert allowed[0].allowed_by == "reading the result"


def test_allow_without_first_only_allows_every_sync(x):
    with sync_guard.disallow():
        with sync_guard.allow("debug dump") as allowed:
            x.tolist()
            x.tolist()
    assert len(allowed) == 2


def test_allow_needs_a_reason():
    with pytest.raises(ValueError, match="reason"):
        sync_guard.allow("")


def test_works_as_a_decorator(x):
    @sync_guard.disallow()
    def read():
        return x.tolist()

    with pytest.raises(sync_guard.SyncViolation):
        read()


def test_another_threads_syncs_are_not_judged_by_this_threads_scope(x):
    errors = []

    def other():
        try:
            x.tolist()
        except Exception as exc:  # pragma: no cover - would be the bug
            errors.append(exc)

    with sync_guard.disallow() as reports:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert errors == [] and reports == []


def test_a_live_empty_device_tensor_does_not_make_empty_host_tensors_device_memory(dev):
    empty_on_device = dev.empty(0, 3, dtype=torch.float32)  # every empty storage has data_ptr 0
    with sync_guard.disallow():
        assert torch.empty(0, 3).tolist() == []
    with pytest.raises(sync_guard.SyncViolation):
        with sync_guard.disallow():
            dev.zeros(2, dtype=torch.float32).tolist()
    del empty_on_device


def test_nothing_is_checked_outside_a_scope(x):
    x.tolist()  # the default level is allow


def test_the_environment_variable_sets_the_default_level():
    code = ("import torch, sync_guard\n"
            "from lockstep.engine.sim import SimDevice\n"
            "x = SimDevice('eager').zeros(2, dtype=torch.float32)\n"
            "try:\n    torch.cuda.synchronize() if torch.cuda.is_available() else "
            "SimDevice('eager').compute.synchronize()\nexcept sync_guard.SyncViolation:\n"
            "    print('raised')\n")
    for value in ("disallow", "error"):  # the level, and its alias
        env = dict(os.environ, SYNC_GUARD=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == "raised", value


def test_a_bad_environment_level_is_an_error_at_first_use_not_at_import():
    bad = dict(os.environ, SYNC_GUARD="sometimes")
    code = "import sync_guard\nprint('imported')\nsync_guard.disallow()\n"
    failed = subprocess.run([sys.executable, "-c", code], env=bad, capture_output=True, text=True)
    assert failed.stdout.strip() == "imported" and failed.returncode != 0
    assert ("ValueError: SYNC_GUARD='sometimes' is not a sync_guard level; choose one of allow, "
            "log, disallow (aliases: off=allow, warn=log, error=disallow)") in failed.stderr


@pytest.mark.parametrize("alias, level", [("off", "allow"), ("warn", "log"),
                                          ("error", "disallow"), ("LOG", "log")])
def test_the_api_takes_the_same_levels_and_aliases(alias, level):
    assert sync_guard.Scope(alias, reason="why").level == level


def test_a_bad_api_level_lists_the_valid_ones():
    with pytest.raises(ValueError, match="level='strict' is not a sync_guard level; choose one "
                                         "of allow, log, disallow"):
        sync_guard.Scope("strict")


def test_an_armed_guard_leaves_other_libraries_results_unchanged(hf_checkpoint):
    """The guard's patches must be transparent: transformers computes its RoPE buffer at load
    (a patched ``torch.tensor`` once left it uninitialised)."""
    from transformers import AutoModelForCausalLM
    path = hf_checkpoint("llama")
    with sync_guard.log(), sync_guard.race_check():
        pass  # installs the patches
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rotary = next(m for name, m in model.named_modules() if name.endswith("rotary_emb"))
    fresh = type(rotary)(model.config)  # the same module built outside any loading machinery
    assert rotary.inv_freq.abs().sum() > 0
    torch.testing.assert_close(rotary.inv_freq, fresh.inv_freq)


def test_device_memory_stays_device_memory_after_a_view_of_it_dies(dev):
    buffer = dev.zeros(8, dtype=torch.float32)
    with sync_guard.disallow():
        view = buffer[:4]  # registered too (computed from device memory), on the same storage
        del view
    with pytest.raises(sync_guard.SyncViolation):
        with sync_guard.disallow():
            buffer.sum().item()


def test_as_device_lets_the_guard_see_syncs_in_cpu_only_code():
    x = sync_guard.as_device(torch.randn(4, 8))
    with sync_guard.disallow():
        n = x.argmax(-1)       # computed from device memory: device memory too
        with pytest.raises(sync_guard.SyncViolation, match="Tensor.item"):
            n.max().item()
    with sync_guard.disallow():
        torch.randn(4, 8).argmax(-1).max().item()   # plain host tensors: nothing to report
