"""Interrupts and concurrent callers: a KeyboardInterrupt reaches the caller and leaves the
engine consistent and usable, or explicitly broken; a second caller gets an error at once.

The policy (``LLM.generate``): a first SIGINT in the main thread is delivered as
KeyboardInterrupt once the current step has finished, and the call aborts its own requests
before it leaves, so the engine is consistent and serves the next call exactly. A second SIGINT
interrupts at once; where that leaves the engine unknowable, it is marked broken and every
later call raises :class:`EngineBrokenError`. Real SIGINTs are sent by a SIGALRM handler armed
with ``signal.setitimer`` at random moments.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from lockstep.engine import LLM, SamplingParams
from lockstep.engine.core import EngineBrokenError
from lockstep.engine.model_runner import ModelRunner

TARGETS = [(False, "eager"), (True, "eager"), (False, "lazy"), (True, "lazy"),
           (False, "threaded"), (True, "threaded"), (False, "skewed"), (True, "skewed")]
PROMPTS = [[5 + i, 7, 11 + 3 * i, 2] for i in range(5)]
PARAMS = [SamplingParams(temperature=0.7, seed=i, max_tokens=24, ignore_eos=True,
                         presence_penalty=0.3 * (i % 2)) for i in range(5)]


def make_llm(async_scheduling: bool, policy: str, **kw) -> LLM:
    return LLM(model="oracle", device="sim", sim_policy=policy, async_scheduling=async_scheduling,
               block_size=4, num_kv_blocks=40, max_num_seqs=3, max_num_batched_tokens=16, **kw)


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return [o.token_ids for o in make_llm(False, "eager").generate(PROMPTS, PARAMS)]


def assert_idle(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats
    assert stats["num_running"] == stats["num_waiting"] == 0, stats
    assert not llm.engine.has_unfinished_requests()


def sigint_after(delay_s: float, count: int = 1, gap_s: float = 0.001) -> None:
    """Send ``count`` real SIGINTs to this process, the first ``delay_s`` from now and the
    others ``gap_s`` apart (a SIGALRM handler; two signals sent at once may be merged)."""
    left = [count]

    def on_alarm(signum, frame):
        left[0] -= 1
        if left[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, gap_s)
        os.kill(os.getpid(), signal.SIGINT)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, delay_s)


def disarm_sigints() -> None:
    """Cancel the timer; a SIGINT already on its way (a late second one) lands here."""
    while True:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
            time.sleep(0.005)
            return
        except KeyboardInterrupt:
            continue


def sigint_at_random_moments(async_scheduling: bool, policy: str, runs: int = 24) -> dict:
    """``runs`` generate calls, each sent one SIGINT at a random moment within one call's
    duration; after each, the engine must be consistent and give the reference tokens."""
    expected = [o.token_ids for o in make_llm(False, "eager").generate(PROMPTS, PARAMS)]
    llm = make_llm(async_scheduling, policy)
    llm.generate(PROMPTS, PARAMS)  # warm-up
    durations = []
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(PROMPTS, PARAMS)
        durations.append(time.perf_counter() - start)
    duration = sorted(durations)[1]
    rng = random.Random(f"{async_scheduling}{policy}")
    interrupted = 0
    for _ in range(runs):
        try:
            sigint_after(rng.uniform(1e-4, 0.8 * duration))  # inside the call, at a random point
            outs = llm.generate(PROMPTS, PARAMS)
            assert [o.token_ids for o in outs] == expected
        except KeyboardInterrupt:
            interrupted += 1
        disarm_sigints()
        assert llm.engine.broken is None
        assert_idle(llm)
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == expected
    assert_idle(llm)
    return {"interrupted": interrupted, "runs": runs}


def double_sigint(async_scheduling: bool, policy: str, runs: int = 12) -> dict:
    """Two SIGINTs back to back: the engine is consistent, or broken and says so."""
    expected = [o.token_ids for o in make_llm(False, "eager").generate(PROMPTS, PARAMS)]
    rng = random.Random(policy)
    outcomes = {"consistent": 0, "broken": 0}
    for _ in range(runs):
        llm = make_llm(async_scheduling, policy)
        try:
            try:
                sigint_after(rng.uniform(1e-4, 0.02), count=2)  # may fire before it returns
                llm.generate(PROMPTS * 4, PARAMS * 4)
                raise AssertionError("two SIGINTs did not interrupt generate")
            except KeyboardInterrupt:
                pass
            time.sleep(0.01)  # where the second lands when the first already ended the call
        except KeyboardInterrupt:
            pass
        disarm_sigints()
        if llm.engine.broken is None:
            outcomes["consistent"] += 1
            assert_idle(llm)
            assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == expected
        else:
            outcomes["broken"] += 1
            for call in (lambda: llm.generate(PROMPTS, PARAMS), llm.engine.step,
                         lambda: llm.engine.add_request("x", [1, 2], SamplingParams())):
                with pytest.raises(EngineBrokenError, match="Make a new LLM"):
                    call()
    return outcomes


def exit_while_device_works(async_scheduling: bool, policy: str) -> dict:
    """Leave the interpreter while the device still works: a worker inside a long torch call,
    another blocked on an event of a stream whose work will never run, queued work behind them
    (an engine abandoned, or broken by a second Ctrl-C, holds the same)."""
    llm = make_llm(async_scheduling, policy)
    device, started = llm.engine.device, threading.Event()

    def long_torch_work():
        started.set()
        a, end = torch.randn(128, 128), time.perf_counter() + 0.5
        while time.perf_counter() < end:  # torch releases the GIL inside each call
            a = torch.mm(a, a).clamp_(-1, 1)
    device.launch(device.copy, long_torch_work)
    device.wait(device.compute, device.record(device.copy))
    for _ in range(50):
        device.launch(device.compute, long_torch_work)
    assert started.wait(5)
    return {"exit_began": time.time()}


def in_a_fresh_process(scenario: str, async_scheduling: bool, policy: str) -> dict:
    """Signals go to a process's main thread (under xdist, not the one running the test). The
    process must also *exit* cleanly: no SIGABRT from a device thread at interpreter exit."""
    proc = subprocess.run([sys.executable, __file__, scenario, str(async_scheduling), policy],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    assert "terminate called" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("async_scheduling,policy", TARGETS)
def test_sigint_at_random_moments_leaves_the_engine_consistent(async_scheduling, policy):
    result = in_a_fresh_process("sigint", async_scheduling, policy)
    assert result["interrupted"] >= 8, f"only {result} runs were interrupted"


@pytest.mark.parametrize("async_scheduling,policy", TARGETS)
def test_a_second_sigint_interrupts_at_once_and_never_corrupts(async_scheduling, policy):
    outcomes = in_a_fresh_process("double", async_scheduling, policy)
    assert sum(outcomes.values()) == 12, outcomes


@pytest.mark.parametrize("attempt", range(6))
def test_the_process_exits_cleanly_after_double_sigints_on_the_threaded_device(attempt):
    """Before device workers were stopped at exit, about 1 process in 6 aborted here."""
    in_a_fresh_process("double", True, "threaded")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_process_exits_at_once_while_device_work_is_still_running(async_scheduling):
    """Deterministic: a threaded-device worker is inside torch when the interpreter exits
    (before the fix: SIGABRT every time), another is blocked on an event that will never
    complete, and 50 half-second items are queued: nobody waits for them."""
    result = in_a_fresh_process("exit-busy", async_scheduling, "threaded")
    assert time.time() - result["exit_began"] < 5  # the items alone would take 25 s


@pytest.mark.parametrize("async_scheduling,policy", TARGETS)
def test_a_keyboard_interrupt_raised_in_device_work_reaches_the_caller(monkeypatch, reference,
                                                                       async_scheduling, policy):
    """On threaded sim the device work runs in a worker thread, on lazy whenever the host
    waits: its KeyboardInterrupt must not become an "error" output; it reaches the caller, and
    the engine stays usable."""
    llm = make_llm(async_scheduling, policy)
    real, calls = ModelRunner._device_step, {"n": 0}

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args)
    monkeypatch.setattr(ModelRunner, "_device_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, PARAMS)
    assert llm.engine.broken is None
    assert_idle(llm)
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference


@pytest.mark.parametrize("async_scheduling,policy", [(False, "eager"), (True, "lazy")])
def test_an_interrupt_where_no_phase_can_clean_up_marks_the_engine_broken(monkeypatch,
                                                                          async_scheduling,
                                                                          policy):
    llm = make_llm(async_scheduling, policy)

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(type(llm.engine), "_pending_outputs_now", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, PARAMS)
    monkeypatch.undo()
    assert "KeyboardInterrupt" in llm.engine.broken
    for call in (lambda: llm.generate(PROMPTS, PARAMS), llm.engine.step, llm.engine.settle,
                 lambda: llm.engine.add_request("x", [1, 2], SamplingParams()),
                 lambda: llm.engine.abort_request("gen1-0")):
        with pytest.raises(EngineBrokenError, match="KeyboardInterrupt.*Make a new LLM"):
            call()


def calls_that_need_the_engine(llm: LLM, tmp_path) -> dict:
    engine = llm.engine
    return {"generate": lambda: llm.generate(PROMPTS, PARAMS), "step": engine.step,
            "add_request": lambda: engine.add_request("x", [1, 2], SamplingParams()),
            "abort_request": lambda: engine.abort_request("gen1-0"), "settle": engine.settle,
            "export_trace": lambda: llm.export_trace(str(tmp_path / "trace.json")),
            "device_spans": engine.timeline.device_spans,
            "busy_fraction": lambda: engine.timeline.busy_fraction(0, 1),
            "chrome_trace": engine.timeline.chrome_trace,
            "drop_outputs": lambda: engine.drop_outputs({"gen1-0"}),
            "put_back": lambda: engine.put_back([])}


@pytest.mark.parametrize("async_scheduling,policy", [(False, "eager"), (True, "eager"),
                                                     (True, "lazy")])
@pytest.mark.parametrize("where", ["abort_request", "settle", "drop_outputs"])
def test_a_second_interrupt_while_generate_abandons_its_requests_marks_the_engine_broken(
        monkeypatch, async_scheduling, policy, where):
    """The first Ctrl-C makes generate abort its own requests; a second one landing in that
    clean-up leaves outputs nobody takes, or an abort half done (before: the engine claimed to
    be usable with requests still unfinished, 1 double-SIGINT run in 50 on eager)."""
    llm = make_llm(async_scheduling, policy)
    engine, steps = llm.engine, {"n": 0}
    real_step = engine.step

    def first_interrupt():
        steps["n"] += 1
        if steps["n"] == 4:
            raise KeyboardInterrupt  # as delivered at generate's safe point
        return real_step()

    def second_interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "step", first_interrupt)
    monkeypatch.setattr(engine, where, second_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, PARAMS)
    monkeypatch.undo()
    assert "KeyboardInterrupt" in engine.broken and "abandoned" in engine.broken
    with pytest.raises(EngineBrokenError, match="Make a new LLM"):
        llm.generate(PROMPTS, PARAMS)


@pytest.mark.parametrize("async_scheduling,policy", TARGETS)
def test_a_second_thread_gets_a_clear_error_at_once(reference, tmp_path, async_scheduling,
                                                    policy):
    """Every call that needs the engine to itself (it changes state, or waits on the device)
    is refused at once beside a running step; the read-only counters are answered."""
    llm = make_llm(async_scheduling, policy)
    inside, release = threading.Event(), threading.Event()
    real = llm.engine._step

    def slow_step():
        if llm.engine.num_steps == 3:
            inside.set()
            release.wait(5)
        return real()
    llm.engine._step = slow_step
    results = {}
    worker = threading.Thread(target=lambda: results.update(out=llm.generate(PROMPTS, PARAMS)),
                              name="first-caller")
    worker.start()
    assert inside.wait(5)
    for name, call in calls_that_need_the_engine(llm, tmp_path).items():
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match="while LLM.generate is running in thread "
                                               "'first-caller'"):
            call()
        assert time.perf_counter() - start < 0.5, name  # at once, not after the other call
    assert llm.stats()["num_steps"] == 3 and llm.engine.has_unfinished_requests()
    release.set()
    worker.join(10)
    del llm.engine._step
    assert [o.token_ids for o in results["out"]] == reference
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference  # now it may
    assert_idle(llm)
    llm.export_trace(str(tmp_path / "after.json"))  # and from this thread, once it is idle
    trace = json.loads((tmp_path / "after.json").read_text())["traceEvents"]
    assert {e["args"]["step"] for e in trace if e.get("cat") == "device"} == \
        set(range(1, llm.engine.num_steps + 1))


@pytest.mark.parametrize("async_scheduling,policy", TARGETS)
def test_export_trace_hammered_from_a_second_thread_never_changes_a_token(reference, tmp_path,
                                                                          async_scheduling,
                                                                          policy):
    """Before: on sim lazy every request came back "length" with garbage ids (the exporter's
    device wait ran the step's queued work in its own thread, out of order); on threaded the
    exporter raised TypeError on events recorded after its wait."""
    llm = make_llm(async_scheduling, policy)
    done, seen = threading.Event(), {"refused": 0, "exported": 0, "other": []}

    def hammer():
        while not done.is_set():
            try:
                llm.export_trace(str(tmp_path / "trace.json"))
                seen["exported"] += 1
            except RuntimeError as exc:
                if "while LLM.generate is running" not in str(exc):
                    seen["other"].append(repr(exc))
                seen["refused"] += 1
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                seen["other"].append(repr(exc))
            time.sleep(0.002)  # let generate in between exports (it must retry, not starve)
    exporter = threading.Thread(target=hammer)
    exporter.start()
    generated = 0
    try:
        while generated < 3:
            try:
                outs = llm.generate(PROMPTS, PARAMS)
            except RuntimeError as exc:  # one caller at a time: the exporter was inside
                assert "while LLM.export_trace is running" in str(exc)
                continue
            assert [o.token_ids for o in outs] == reference
            generated += 1
    finally:
        done.set()
        exporter.join(10)
    assert not seen["other"], seen["other"][:3]
    assert seen["refused"] > 0
    assert_idle(llm)


@pytest.mark.parametrize("async_scheduling,policy", TARGETS)
def test_a_second_thread_waiting_on_the_device_never_reorders_its_work(reference,
                                                                       async_scheduling,
                                                                       policy):
    """Any thread may wait on a GPU; the device still runs each stream's work in order. On
    sim lazy the waiting thread runs queued work itself, so it must take turns with the
    engine's thread (before: items ran out of order, and a copy read an unwritten buffer)."""
    llm = make_llm(async_scheduling, policy)
    done, errors = threading.Event(), []

    def wait_on_the_device():
        while not done.is_set():
            try:
                llm.engine.device.synchronize()
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(repr(exc))
            time.sleep(0)
    waiter = threading.Thread(target=wait_on_the_device)
    waiter.start()
    try:
        for _ in range(3):
            assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference
    finally:
        done.set()
        waiter.join(10)
    assert not errors, errors[:3]


@pytest.mark.parametrize("async_scheduling,policy", TARGETS)
def test_generate_tracks_only_its_own_requests_and_hands_the_rest_back(reference,
                                                                       async_scheduling, policy):
    llm = make_llm(async_scheduling, policy)
    engine = llm.engine
    engine.add_request("mine", PROMPTS[1], PARAMS[1])
    engine.add_request("gen1-0", PROMPTS[2], PARAMS[2])  # an id generate's scheme would pick
    outs = llm.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outs] == reference
    assert not {o.request_id for o in outs} & {"mine", "gen1-0"}
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final["mine"].token_ids == reference[1]
    assert final["gen1-0"].token_ids == reference[2]
    assert_idle(llm)


@pytest.mark.parametrize("async_scheduling,policy", TARGETS)
def test_generate_adds_nothing_unless_every_prompt_and_parameter_is_valid(async_scheduling,
                                                                          policy):
    llm = make_llm(async_scheduling, policy)
    llm.engine.add_request("mine", PROMPTS[0], PARAMS[0])
    for prompts, params in (([PROMPTS[0], [1, 2], [1, 10**6]], PARAMS[:3]),
                            (PROMPTS[:2], [PARAMS[0], "greedy"]),
                            ([PROMPTS[0], [1, 2.5]], PARAMS[:2])):
        with pytest.raises(ValueError):
            llm.generate(prompts, params)
        assert set(llm.engine.scheduler.requests) == {"mine"}


if __name__ == "__main__":  # one scenario in this process: scenario, async, policy
    # Ctrl-C as a terminal delivers it, even when this process was started with SIGINT ignored
    # (a shell's background job): the scenarios are about Python's default handling
    signal.signal(signal.SIGINT, signal.default_int_handler)
    scenario, async_arg, policy_arg = sys.argv[1:]
    run_scenario = {"sigint": sigint_at_random_moments, "double": double_sigint,
                    "exit-busy": exit_while_device_works}[scenario]
    print(json.dumps(run_scenario(async_arg == "True", policy_arg)))
