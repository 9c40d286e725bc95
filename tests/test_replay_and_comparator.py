"""``lockstep replay`` reproduces saved failures; the comparator's messages say where and what."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import lockstep
from lockstep.ci.cli import main
from lockstep.engine import SamplingParams
from lockstep.engine.scheduler import Scheduler
from lockstep.property_tests.comparator import Divergence, compare_runs
from lockstep.property_tests.driver import RequestResult, RunRecord
from lockstep.property_tests.workload import EngineSpec, RequestSpec, Workload

torch.set_num_threads(1)

WORKLOAD = Workload(EngineSpec(block_size=2, num_kv_blocks=26, max_num_batched_tokens=5),
                    (RequestSpec("r0", (1,), SamplingParams(temperature=0.5, max_tokens=1)),))


def schedule_one_token_past_max_tokens(monkeypatch):
    def tokens_to_schedule(self, req):  # `>` where `>=` belongs: one step too many
        if len(req.output_token_ids) + req.num_placeholders > req.sampling_params.max_tokens:
            return 0
        return req.num_tokens_with_placeholders - req.num_computed_tokens
    monkeypatch.setattr(Scheduler, "_tokens_to_schedule", tokens_to_schedule)


def as_saved(workload: Workload) -> Workload:
    """A failure's file records the engine it ran on and its adapter's version."""
    return dataclasses.replace(workload, engine_under_test="lockstep",
                               adapter_version=lockstep.__version__)


def test_replay_passes_on_the_clean_engine(tmp_path, capsys):
    path = WORKLOAD.save(tmp_path / "w.json")
    assert main(["replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert "async sim/lazy: 1 requests equal" in out and "replay: passed" in out


def test_replay_reproduces_a_saved_failure_with_the_comparators_message(tmp_path, capsys,
                                                                        monkeypatch):
    path = WORKLOAD.save(tmp_path / "w.json")
    schedule_one_token_past_max_tokens(monkeypatch)
    assert main(["replay", str(path), "--policy", "lazy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  InvariantViolation: r0: scheduled to 2 computed tokens, past prompt + " \
           "max_tokens - 1 = 1" in out
    assert f"replay: lockstep replay {path}" in out
    assert Workload.load(path) == as_saved(WORKLOAD)


@pytest.mark.parametrize("content, says", [(None, "does not exist"),
                                           ("{not json", "is not a workload file"),
                                           ('{"format": "x"}', "format='x'")])
def test_replay_of_a_bad_file_exits_2_naming_it(tmp_path, capsys, content, says):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    assert main(["replay", str(path)]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_replay_on_cuda_without_a_gpu_exits_2_at_once(tmp_path, capsys):
    assert main(["replay", str(WORKLOAD.save(tmp_path / "w.json")), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def _record(name, tokens, finish="length", logprobs=None):
    return RunRecord(name, {("r0", 0): RequestResult(tokens, finish, logprobs)})


def test_the_divergence_message_names_request_position_tokens_logprobs_engine_and_replay():
    lp_ref = [{5: -1.0}, {6: -1.0}, {7: -0.5, 9: -2.0}]
    lp_got = [{5: -1.0}, {6: -1.0}, {9: -0.4, 7: -2.5}]
    ref = _record("sync sim/eager", [5, 6, 7], logprobs=lp_ref)
    got = _record("async sim/lazy", [5, 6, 9], logprobs=lp_got)
    with pytest.raises(Divergence) as info:
        compare_runs(ref, got, WORKLOAD, exact=True, replay="replays/x.json")
    lines = str(info.value).splitlines()
    assert lines[0] == ("async sim/lazy diverges from sync sim/eager: request 'r0'#0, output "
                        "position 2 (ids differ)")
    assert "5 6 [7]" in lines[1] and "finish=length" in lines[1]
    assert "5 6 [9]" in lines[2]
    assert "logprobs at 2 in sync sim/eager: 7: -0.5000, 9: -2.0000" in lines[3]
    assert lines[-2].startswith("  engine: model='oracle', block_size=2")
    assert lines[-1] == "  replay: lockstep replay replays/x.json"
    assert len(lines) <= 8


def test_float_runs_accept_a_near_tie_and_count_it_but_not_a_wide_gap():
    ref = _record("sync", [5, 7], logprobs=[{5: -1.0, 8: -3.0}, {7: -1.00, 9: -1.10}])
    tie = _record("async", [5, 9], logprobs=[{5: -1.0, 8: -3.0}, {9: -1.02, 7: -1.05}])
    assert compare_runs(ref, tie, WORKLOAD, exact=False).near_ties == ["'r0'#0 at 1"]
    gap = _record("async", [5, 9], logprobs=[{5: -1.0, 8: -3.0}, {9: -0.5, 7: -1.5}])
    with pytest.raises(Divergence, match="ids differ"):
        compare_runs(ref, gap, WORKLOAD, exact=False)
    with pytest.raises(Divergence, match="ids differ"):
        compare_runs(ref, tie, WORKLOAD, exact=True)


def test_an_aborted_stream_must_be_a_prefix_of_the_reference():
    ref = _record("sync", [5, 6, 7])
    assert compare_runs(ref, _record("async", [5, 6], "abort"), WORKLOAD, exact=True).compared
    with pytest.raises(Divergence, match="ids differ"):
        compare_runs(ref, _record("async", [5, 8], "abort"), WORKLOAD, exact=True)
    with pytest.raises(Divergence, match="longer stream belongs to the aborted run"):
        compare_runs(_record("sync", [5], "stop"), _record("async", [5, 6], "abort"), WORKLOAD,
                     exact=True)


def test_a_request_that_failed_with_an_error_is_always_a_failure():
    with pytest.raises(Divergence, match="failed: boom"):
        compare_runs(_record("sync", [5]), RunRecord("async", {("r0", 0): RequestResult(
            [], "error", None, "boom")}), WORKLOAD, exact=True)


def test_an_engine_crash_is_a_failure_with_a_replay_file_that_names_the_run(tmp_path,
                                                                            monkeypatch):
    from lockstep.property_tests import PropertyFailure, check_workload

    def crash(self, out, sampled, logprobs):
        raise AssertionError("r0: negative placeholders")
    monkeypatch.setattr(Scheduler, "update_from_output", crash)
    with pytest.raises(PropertyFailure) as info:
        check_workload(WORKLOAD, replay_to=tmp_path / "crash.json")
    message = str(info.value)  # the engine contains it: the request ends with "error"
    assert message.startswith("Divergence: sync sim/eager: request 'r0'#0 failed: step 1 "
                              "failed in collect: AssertionError: r0: negative placeholders")
    assert "replay: lockstep replay" in message
    assert Workload.load(tmp_path / "crash.json") == as_saved(WORKLOAD)


def test_a_missing_logprobs_entry_is_reported_not_a_crash():
    ref = _record("sync", [5, 7], logprobs=[{5: -1.0}, None])
    got = _record("async", [5, 9], logprobs=[{5: -1.0}, None])
    with pytest.raises(Divergence, match="ids differ"):
        compare_runs(ref, got, WORKLOAD, exact=False)
