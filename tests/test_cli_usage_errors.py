"""Every command checks its arguments and environment before any work: a usage error is exit
status 2 and one line ``lockstep CMD: ...`` naming the option (or the workload's field) and its
value, never a traceback, never a run. And the soak judges leaks on a settled engine."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from lockstep.ci.cli import main
from lockstep.engine import SamplingParams
from lockstep.engine.kv_cache import KVCacheManager
from lockstep.property_tests.replay import check_runnable
from lockstep.property_tests.strategies import workloads
from lockstep.property_tests.workload import EngineSpec, RequestSpec, Workload

torch.set_num_threads(1)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

WORKLOAD = Workload(EngineSpec(block_size=2, num_kv_blocks=26, max_num_batched_tokens=5),
                    tuple(RequestSpec(f"r{i}", tuple(range(1, i + 2)),
                                      SamplingParams(temperature=0, max_tokens=2))
                          for i in range(3)))

# what each command would run first, were its options accepted
WORK = {"soak": ("lockstep.ci.soak", "run_soak"),
        "guard-bench": ("lockstep.ci.guard_bench", "run_guard_bench"),
        "bench": ("lockstep.ci.bench", "run_bench"),
        "zoo": ("lockstep.ci.zoo.runner", "run_worker"),
        "gate": ("lockstep.ci.gate", "run_check"),
        "replay": ("lockstep.property_tests.replay", "check_workload")}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any command gets as far as its work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command started its work despite a usage error")
    for module, name in WORK.values():
        monkeypatch.setattr(f"{module}.{name}", refuse)


def usage_line(capsys, stream: str) -> str:
    """The one line a usage error prints, on ``stream``; nothing else is printed."""
    captured = capsys.readouterr()
    lines = getattr(captured, stream).splitlines()
    other = captured.err if stream == "out" else captured.out
    assert len(lines) == 1 and not other.strip(), captured
    assert "Traceback" not in lines[0]
    return lines[0]


def saved(tmp_path, change=None, text: str | None = None) -> str:
    """WORKLOAD as a file, its JSON changed in place by ``change`` (or ``text`` as the file)."""
    data = WORKLOAD.to_dict()
    if change is not None:
        change(data)
    path = tmp_path / "w.json"
    path.write_text(json.dumps(data) if text is None else text)
    return str(path)


# -- replay: files and workloads it cannot run -----------------------------------------------

def test_replay_of_a_directory_exits_2_naming_it(tmp_path, capsys, no_work):
    assert main(["replay", str(tmp_path)]) == 2
    assert usage_line(capsys, "err") == \
        f"lockstep replay: FILE={str(tmp_path)!r} cannot be read: Is a directory"


@pytest.mark.parametrize("text, says", [("[]", "got list []"), ("3", "got int 3"),
                                        ('"w"', "got str 'w'")])
def test_replay_of_json_that_is_not_an_object_exits_2(tmp_path, capsys, no_work, text, says):
    path = saved(tmp_path, text=text)
    assert main(["replay", path]) == 2
    assert usage_line(capsys, "err") == \
        f"lockstep replay: FILE={path!r}: a workload is a JSON object, {says}"


def _set(*keys_and_value):
    *keys, last, value = keys_and_value

    def change(data):
        for key in keys:
            data = data[key]
        data[last] = value
    return change


@pytest.mark.parametrize("change, says", [
    (_set("requests", 2, "prompt", [1, 70000]),
     "requests[2].prompt[1]=70000 is outside the vocabulary [0, 512)"),
    (_set("requests", 1, "prompt", []), "requests[1].prompt is empty"),
    (_set("engine", "block_size", 0), "engine.block_size must be a positive int, got 0"),
    (_set("requests", 0, "params", "max_tokens", 300),
     "requests[0].params.max_tokens=300 with a 1-token prompt exceeds max_model_len=256"),
    (_set("requests", 1, "params", "stop_token_ids", [600]),
     "requests[1].params.stop_token_ids contains 600, outside the vocabulary [0, 512)"),
], ids=["vocabulary", "empty-prompt", "block-size-0", "max-tokens", "stop-id"])
def test_replay_of_a_workload_the_engine_refuses_exits_2_before_any_run(tmp_path, capsys,
                                                                         no_work, change, says):
    path = saved(tmp_path, change)
    assert main(["replay", path]) == 2
    assert usage_line(capsys, "err") == f"lockstep replay: FILE={path!r}: {says}"


ABORT = {"step": 1, "request_id": "r0", "occurrence": 0}
INVALID = [
    (_set("aborts", [{**ABORT, "request_id": "x"}]), "aborts[0].request_id='x' names no request"),
    (_set("aborts", [ABORT, {**ABORT, "step": -3}]), "aborts[1].step=-3 must be an int >= 0"),
    (_set("aborts", [{**ABORT, "occurrence": 1}]),
     "aborts[0].occurrence=1 but only 1 request(s) use the id 'r0' (occurrences count from 0)"),
    (_set("requests", 1, "arrival", -1), "requests[1].arrival=-1 must be an int >= 0"),
    (_set("preempt_steps", [2, -1]), "preempt_steps[1]=-1 must be an int >= 0"),
    (_set("requests", 0, "request_id", ""), "requests[0].request_id='' must be a non-empty string"),
]
INVALID_IDS = ["abort-unknown-id", "abort-negative-step", "abort-occurrence", "arrival",
               "preempt-step", "empty-id"]


@pytest.mark.parametrize("change, says", INVALID, ids=INVALID_IDS)
def test_loading_an_invalid_workload_raises_naming_the_field(change, says):
    data = WORKLOAD.to_dict()
    change(data)
    with pytest.raises(ValueError) as info:
        Workload.from_dict(data)
    assert str(info.value) == says


@pytest.mark.parametrize("change, says", INVALID[:2], ids=INVALID_IDS[:2])
def test_replay_of_an_invalid_workload_exits_2(tmp_path, capsys, no_work, change, says):
    path = saved(tmp_path, change)
    assert main(["replay", path]) == 2
    assert usage_line(capsys, "err") == f"lockstep replay: FILE={path!r}: {says}"


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_the_strategies_generate_only_valid_runnable_workloads(workload):
    Workload.from_json(workload.to_json())  # validates
    check_runnable(workload)


# -- --device cuda without CUDA, and numeric options -----------------------------------------

@no_cuda
@pytest.mark.parametrize("command, stream", [
    (["soak"], "err"), (["guard-bench"], "err"), (["bench"], "err"), (["zoo"], "err"),
    (["replay", "FILE"], "err")])
def test_device_cuda_without_cuda_exits_2_before_any_work(tmp_path, capsys, no_work, command,
                                                          stream):
    args = [saved(tmp_path) if a == "FILE" else a for a in command]
    assert main([*args, "--device", "cuda"]) == 2
    assert usage_line(capsys, stream) == \
        f"lockstep {command[0]}: --device cuda but no CUDA device is available"


@no_cuda
def test_gate_device_cuda_without_cuda_exits_2_before_any_check(capsys, no_work):
    assert main(["gate", "--device", "cuda"]) == 2
    assert usage_line(capsys, "err") == \
        "lockstep gate: --device=cuda but no CUDA device is available on this machine"


@pytest.mark.parametrize("args, says", [
    (["--requests", "-5"], "--requests must be at least 1, got -5"),
    (["--requests", "0"], "--requests must be at least 1, got 0"),
    (["--abort-rate", "7"], "--abort-rate must be in [0, 1], got 7.0"),
    (["--abort-rate", "-0.1"], "--abort-rate must be in [0, 1], got -0.1"),
    (["--abort-rate", "nan"], "--abort-rate must be in [0, 1], got nan"),
    (["--fault-every", "-3"], "--fault-every must be 0 (no faults) or more, got -3"),
    (["--max-steps", "0"], "--max-steps must be at least 1, got 0")])
def test_soak_refuses_out_of_range_options(capsys, no_work, args, says):
    assert main(["soak", *args]) == 2
    assert usage_line(capsys, "err") == f"lockstep soak: {says}"


@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_zoo_refuses_fewer_than_one_job(capsys, no_work, jobs):
    assert main(["zoo", "--jobs", jobs]) == 2
    assert usage_line(capsys, "err") == f"lockstep zoo: --jobs must be at least 1, got {jobs}"


def test_guard_bench_refuses_an_out_file_in_a_missing_folder(tmp_path, capsys, no_work):
    out = tmp_path / "missing" / "r.json"
    assert main(["guard-bench", "--device", "cpu", "--shape", "tiny", "--out", str(out)]) == 2
    assert usage_line(capsys, "err") == \
        f"lockstep guard-bench: --out {out}: the folder {out.parent} does not exist"


@no_cuda
def test_soak_device_cuda_end_to_end_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "lockstep", "soak", "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == "lockstep soak: --device cuda but no CUDA device is available\n"
    assert proc.stdout == ""


def test_replay_of_a_directory_end_to_end_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lockstep", "replay", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == f"lockstep replay: FILE={str(tmp_path)!r} cannot be read: " \
        "Is a directory\n"
    assert not proc.stdout


# -- soak: what is held is judged on a settled engine ------------------------------------------

def soak_result(capsys) -> dict:
    return json.loads(capsys.readouterr().out.splitlines()[0])


def test_soak_with_a_step_still_in_flight_at_the_end_reports_nothing_held(capsys):
    # async: when the last request finishes, the step launched after it is still in flight
    assert main(["soak", "--requests", "10", "--fault-every", "0", "--seed", "0"]) == 0
    assert soak_result(capsys)["held"] == {"blocks": 0, "requests": 0, "in_flight": 0,
                                           "slots": 0}


def test_soak_still_reports_a_real_leak(capsys, monkeypatch):
    monkeypatch.setattr(KVCacheManager, "free", lambda self, request_id: None)
    assert main(["soak", "--requests", "1", "--fault-every", "0", "--abort-rate", "0"]) == 1
    held = soak_result(capsys)["held"]
    assert held["blocks"] > 0 and held["in_flight"] == 0, held


def test_soak_stops_an_engine_that_never_drains_and_says_so(capsys):
    from lockstep.ci.soak import print_soak, run_soak
    from lockstep.ci.zoo import INJECTIONS, Patcher
    patch = Patcher()
    INJECTIONS["launch_failure_drops_steps_in_flight"].apply(patch)
    try:   # faults often: some launch fails with another request's last token in flight
        result = run_soak(requests=300, fault_every=5, stall_steps=300)
    finally:
        patch.undo()
    assert result["stalled"] and "no request finished in 300 calls" in result["stalled"]
    assert print_soak(result) == 1
    assert "STALLED: no request finished" in capsys.readouterr().out
    assert run_soak(requests=300, fault_every=5, stall_steps=300)["stalled"] is None


def test_soak_stops_at_its_step_bound(capsys):
    assert main(["soak", "--requests", "50", "--fault-every", "0", "--max-steps", "5"]) == 1
    assert "past the step bound 5" in soak_result(capsys)["stalled"]


def test_guard_bench_refuses_fewer_than_one_repeat(capsys, no_work):
    assert main(["guard-bench", "--device", "cpu", "--shape", "tiny", "--repeats", "0"]) == 2
    assert usage_line(capsys, "err") == "lockstep guard-bench: --repeats=0: at least 1"


@pytest.mark.parametrize("args, says", [
    (["--batch", "0"], "--batch=0 --repeats=9: each must be at least 1"),
    (["--repeats", "0"], "--batch=1 --repeats=0: each must be at least 1"),
    (["--out", "/no/such/folder/x.json"], "--out='/no/such/folder/x.json': its folder does not"),
])
def test_guard_cost_refuses_bad_options_before_any_work(capsys, args, says):
    from lockstep.ci.guard_cost import main as guard_cost
    assert guard_cost(args) == 2
    assert says in capsys.readouterr().err


@no_cuda
@pytest.mark.parametrize("module", ["guard_cost", "native_corpus"])
def test_the_native_tools_without_cuda_exit_2_saying_so(capsys, module):
    import importlib
    assert importlib.import_module(f"lockstep.ci.{module}").main([]) == 2
    assert "CUDA device" in capsys.readouterr().err
