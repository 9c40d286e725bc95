"""The step timeline exports a valid Chrome trace with host and device spans."""
from __future__ import annotations

import json

import pytest

from lockstep.engine import LLM, SamplingParams

TARGETS = [("sim", "lazy"), ("sim", "threaded"), pytest.param(("cuda", "eager"),
                                                                marks=pytest.mark.gpu)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_trace_file_is_a_chrome_trace_with_host_and_device_spans(tmp_path, target,
                                                                 async_scheduling):
    device, policy = target
    llm = LLM(model="oracle", device=device, sim_policy=policy if device == "sim" else None,
              async_scheduling=async_scheduling)
    llm.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=6))
    path = tmp_path / "trace.json"
    llm.export_trace(str(path))
    trace = json.loads(path.read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert all({"name", "ts", "dur", "pid", "tid"} <= e.keys() and e["dur"] >= 0 for e in spans)
    host = {e["name"] for e in spans if e["cat"] == "host"}
    assert host == {"schedule", "prepare", "launch", "collect"}
    device_steps = sorted(e["args"]["step"] for e in spans if e["cat"] == "device")
    assert device_steps == list(range(1, llm.stats()["num_steps"] + 1))
    for e in spans:
        if e["cat"] == "device":  # a step's device work ends after its launch began
            launch = next(h for h in spans if h["name"] == "launch"
                          and h["args"]["step"] == e["args"]["step"])
            assert e["ts"] + e["dur"] >= launch["ts"]


@pytest.mark.parametrize("timeline_steps", [0, 5])
def test_the_timeline_is_a_ring_over_the_last_steps(tmp_path, timeline_steps):
    llm = LLM(model="oracle", device="sim", sim_policy="lazy", async_scheduling=True,
              timeline_steps=timeline_steps)
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    path = tmp_path / "trace.json"
    llm.export_trace(str(path))
    spans = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    device_steps = sorted(e["args"]["step"] for e in spans if e["cat"] == "device")
    last = llm.stats()["num_steps"]
    assert device_steps == list(range(last - timeline_steps + 1, last + 1))
    host = [e for e in spans if e["cat"] == "host"]
    assert len(host) == 4 * timeline_steps  # schedule, prepare, launch, collect per step
    assert not host or last in {e["args"]["step"] for e in host}


@pytest.mark.parametrize("policy", ["eager", "lazy", "skewed"])
def test_a_sim_event_costs_no_kernel_object_unless_a_thread_blocks_on_it(policy):
    """Only the threaded policy's host waits block on another thread's progress."""
    import gc

    from lockstep.engine.sim import SimEvent
    llm = LLM(model="oracle", device="sim", sim_policy=policy, async_scheduling=True)
    llm.generate([[1, 2, 3]] * 3, SamplingParams(temperature=0, max_tokens=20))
    events = [o for o in gc.get_objects() if isinstance(o, SimEvent)]
    assert events and all(e._waiter is None for e in events)
