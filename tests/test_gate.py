"""``lockstep gate``: exit codes, JSON and JUnit output, watchdogs, short failure reports, and
the targeted workloads reaching the states they are named for."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from lockstep.ci import targeted
from lockstep.ci.gate import GateOptions, run_gate
from lockstep.ci.zoo import INJECTIONS
from lockstep.property_tests.differential import run_differential
from lockstep.property_tests.engine_under_test import Mode

torch.set_num_threads(1)
LAZY = (Mode(True, "sim", "lazy"),)


@pytest.fixture(autouse=True)
def replays(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCKSTEP_REPLAY_DIR", str(tmp_path / "replays"))
    return tmp_path / "replays"


def gate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lockstep", "gate", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_usage_error_before_any_check():
    proc = gate_cli("--device", "cuda")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--device=cuda but no CUDA device" in proc.stderr
    assert "PASS" not in proc.stdout and "FAIL" not in proc.stdout


@pytest.mark.parametrize("args, says", [
    (("--model", "/no/such/checkpoint"), "--model='/no/such/checkpoint': no such directory"),
    (("--only", "targeted,bogus"), "--only=bogus: unknown checks"),
    (("--device", "tpu"), "--device='tpu': choose cpu or cuda"),
])
def test_bad_options_are_usage_errors_before_any_check(args, says):
    proc = gate_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr
    assert "PASS" not in proc.stdout and "FAIL" not in proc.stdout


def test_a_model_folder_without_weights_is_a_usage_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert run_gate(GateOptions(model=str(tmp_path))) == 2


def test_a_clean_check_passes_with_json_and_junit(tmp_path, capsys):
    paths = tmp_path / "gate.json", tmp_path / "gate.xml"
    code = run_gate(GateOptions(only=("targeted", "generate"), json_path=str(paths[0]),
                                junit_path=str(paths[1])))
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(paths[0].read_text())
    assert data["passed"] is True and data["exit_code"] == 0
    assert [c["name"] for c in data["checks"]] == ["targeted", "generate"]
    assert all(c["status"] == "pass" and c["seconds"] > 0 for c in data["checks"])
    suite = ET.parse(paths[1]).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert [case.get("name") for case in suite.iter("testcase")] == ["targeted", "generate"]
    assert not list(suite.iter("failure"))
    assert out.count("PASS") == 2 and "gate: passed (2/2)" in out


def test_a_regression_fails_with_its_detector_replay_and_exit_1(monkeypatch, tmp_path, capsys,
                                                                replays):
    INJECTIONS["fence_removed"].apply(monkeypatch)
    paths = tmp_path / "gate.json", tmp_path / "gate.xml"
    code = run_gate(GateOptions(only=("targeted", "generate"), json_path=str(paths[0]),
                                junit_path=str(paths[1])))
    out = capsys.readouterr().out
    assert code == 1
    checks = json.loads(paths[0].read_text())["checks"]
    assert checks[0]["status"] == "fail" and checks[0]["detector"] == "sync_guard (race)"
    assert "BufferRace" in checks[0]["message"]
    replay = checks[0]["replay"]
    assert replay and replay.startswith(str(replays)), replay
    failure = ET.parse(paths[1]).getroot().find("testsuite/testcase/failure")
    assert failure.get("type") == "sync_guard (race)"
    assert f"replay: lockstep replay {replay}" in failure.text
    # one line per check, the short message and the replay, no engine traceback
    assert "Traceback" not in out and f"replay: lockstep replay {replay}" in out
    assert len(out.splitlines()) < 30, out


def test_a_hang_becomes_a_failure_naming_the_check_and_step(monkeypatch, capsys):
    INJECTIONS["collect_polls_instead_of_waiting"].apply(monkeypatch)
    code = run_gate(GateOptions(only=("targeted",), stall_s=2))
    out = capsys.readouterr().out
    assert code == 1
    assert "caught by watchdog" in out
    assert "check 'targeted' hung: no engine step began or ended for 2 s" in out
    assert "inside step" in out and "of run async sim/lazy" in out
    assert "in get_output" in out or "_get_output_polling" in out


def test_checks_after_a_hang_are_skipped_not_timed(monkeypatch, capsys, tmp_path):
    INJECTIONS["collect_polls_instead_of_waiting"].apply(monkeypatch)
    junit = tmp_path / "gate.xml"
    code = run_gate(GateOptions(only=("targeted", "generate"), stall_s=2,
                                junit_path=str(junit)))
    out = capsys.readouterr().out
    assert code == 1
    assert "SKIPPED  generate" in out and "not run: check 'targeted' hung" in out, out
    assert "gate: FAILED (0/1)" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1" and suite.get("skipped") == "1"


def test_stop_ids_are_reached_with_a_step_in_flight():
    report = run_differential(targeted.stops_in_flight(), LAZY)
    for key, result in report.runs["sync sim/eager"].results.items():
        assert result.finish_reason == "stop" and len(result.token_ids) == 4, (key, result)


@pytest.mark.parametrize("name, stat", [("tight_cache", "num_preemptions"),
                                        ("forced_preemption", "num_preemptions")])
def test_preemption_workloads_preempt(name, stat):
    report = run_differential(targeted.TARGETED[name](), LAZY)
    assert report.stat(stat) > 0


def test_the_reuse_and_abort_workloads_reuse_and_abort_live_requests():
    reused = run_differential(targeted.reused_ids(), LAZY)
    ids = [r.request_id for r in targeted.reused_ids().requests]
    assert len(set(ids)) < len(ids)
    assert reused.runs["async sim/lazy"].results[("u0", 0)].finish_reason == "stop"
    aborted = run_differential(targeted.aborts(), LAZY)
    assert len(aborted.runs["async sim/lazy"].aborted) >= 4


def test_the_mixed_batch_chunks_a_prefill_and_the_slot_workload_reuses_slots(monkeypatch):
    from lockstep.engine.input_batch import InputBatch
    from lockstep.engine.scheduler import Scheduler
    partial, owners = [], {}
    schedule_row, slot_for = Scheduler._schedule_row, InputBatch._slot_for

    def recording_row(self, req, num_new, is_new):
        row = schedule_row(self, req, num_new, is_new)
        if not row.samples:
            partial.append(req.request_id)
        return row

    def recording_slot(self, rid):
        slot = slot_for(self, rid)
        owners.setdefault(slot, set()).add(rid)
        return slot
    monkeypatch.setattr(Scheduler, "_schedule_row", recording_row)
    monkeypatch.setattr(InputBatch, "_slot_for", recording_slot)
    run_differential(targeted.mixed_batch(), LAZY)
    assert "chunked" in partial, partial    # its 23-token prefill took more than one step
    owners.clear()
    run_differential(targeted.slot_reuse(), LAZY)
    assert any(len(rids) > 1 for rids in owners.values()), owners


def test_model_applies_to_the_checks_that_take_one(hf_checkpoint, capsys):
    path = hf_checkpoint("qwen2")   # vocab 256: the gate reads it from config.json
    assert run_gate(GateOptions(model=path, only=("generate", "property-model"))) == 0
    out = capsys.readouterr().out
    assert f"model={path}" in out and out.count(f"(model {path})") == 2, out


def test_quick_keeps_the_fast_checks_with_fewer_examples(capsys):
    from lockstep.ci.gate import selected
    assert [c.name for c in selected(GateOptions(quick=True))] == ["targeted", "generate",
                                                                    "property", "faults"]
    assert [c.name for c in selected(GateOptions())] == ["targeted", "generate", "property",
                                                          "machine", "faults", "property-model"]
