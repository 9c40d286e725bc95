"""The transformers adapter drives transformers' continuous batching one batch per step, and its
batched streams equal each request's stream alone."""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("transformers", reason="the transformers adapter needs it")

from lockstep.engine import SamplingParams  # noqa: E402
from lockstep.property_tests import (AbortSpec, EngineHang, EngineSpec,  # noqa: E402
                                     InvariantViolation, Mode, RequestSpec, Workload,
                                     resolve_engine)
from lockstep.property_tests.adapters import EngineSpecError  # noqa: E402
from lockstep.property_tests.adapters.transformers_cb import (  # noqa: E402
    TransformersCrash, check_environment, transformers_engine)
from lockstep.property_tests.driver import drive  # noqa: E402

try:
    check_environment()
except RuntimeError as exc:
    pytest.skip(f"transformers adapter: {exc}", allow_module_level=True)

torch.set_num_threads(1)
SYNC_CPU = Mode(False, "cpu")
SPEC = EngineSpec(model="oracle", block_size=4, num_kv_blocks=48, max_num_batched_tokens=16,
                  max_num_seqs=4, max_model_len=128, seed=0)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def prompt(i: int, length: int) -> tuple[int, ...]:
    return tuple((37 * i + 11 * j) % 500 + 1 for j in range(length))


# staggered arrivals, prompts longer than the 16-token budget (chunked prefills), mixed lengths
REQUESTS = tuple(RequestSpec(f"r{i}", prompt(i, 3 + 5 * i), greedy(4 + 2 * i), arrival=i // 2)
                 for i in range(5))


def run(workload: Workload, mode: Mode = SYNC_CPU, name: str = "batched", guard: bool = True):
    engine = transformers_engine(workload.engine, mode)
    return drive(workload, engine, name, engine.eos_token_ids, guard)


def alone(request: RequestSpec, spec: EngineSpec = SPEC, mode: Mode = SYNC_CPU):
    solo = Workload(spec, (RequestSpec(request.request_id, request.prompt, request.params),))
    return run(solo, mode, "solo").results[(request.request_id, 0)]


class Recording:
    """An engine wrapper that keeps every output it hands the driver."""

    def __init__(self, engine) -> None:
        self.engine, self.seen = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        outputs = self.engine.step()
        self.seen += [(o.request_id, list(o.token_ids), o.finish_reason) for o in outputs]
        return outputs


def test_the_engine_name_resolves_to_the_adapter():
    assert resolve_engine("transformers") is transformers_engine


def test_batched_requests_equal_each_request_alone():
    batched = run(Workload(SPEC, REQUESTS))
    for request in REQUESTS:
        got, ref = batched.results[(request.request_id, 0)], alone(request)
        assert (got.token_ids, got.finish_reason) == (ref.token_ids, ref.finish_reason), \
            request.request_id


def test_max_tokens_is_respected_and_each_request_ends_once_with_nothing_after():
    engine = Recording(transformers_engine(SPEC, SYNC_CPU))
    record = drive(Workload(SPEC, REQUESTS), engine, "batched", engine.eos_token_ids)
    for request in REQUESTS:
        mine = [s for s in engine.seen if s[0] == request.request_id]
        finals = [i for i, s in enumerate(mine) if s[2] is not None]
        assert finals == [len(mine) - 1], f"{request.request_id}: {mine}"
        result = record.results[(request.request_id, 0)]
        assert len(result.token_ids) <= request.params.max_tokens
        if result.finish_reason == "length":
            assert len(result.token_ids) == request.params.max_tokens


def test_a_stop_id_ends_the_request_with_stop_including_the_stop_id():
    free = alone(REQUESTS[2])
    stop = free.token_ids[2]
    request = RequestSpec("s", REQUESTS[2].prompt, greedy(12, stop_token_ids=(stop,)))
    got = run(Workload(SPEC, (request,))).results[("s", 0)]
    end = free.token_ids.index(stop) + 1
    assert (got.token_ids, got.finish_reason) == (free.token_ids[:end], "stop")


def test_an_abort_ends_a_live_request_with_abort_and_spares_the_others():
    workload = Workload(SPEC, REQUESTS, aborts=(AbortSpec(step=3, request_id="r1"),))
    record = run(workload)
    assert ("r1", 0) in record.aborted
    aborted = record.results[("r1", 0)]
    assert aborted.finish_reason == "abort"
    assert aborted.token_ids == alone(REQUESTS[1]).token_ids[:len(aborted.token_ids)]
    for request in REQUESTS[2:]:
        assert record.results[(request.request_id, 0)].token_ids == alone(request).token_ids


def test_a_second_abort_before_the_next_step_finds_nothing_to_end():
    engine = transformers_engine(SPEC, SYNC_CPU)
    engine.add("a", list(prompt(0, 5)), greedy(4), 0)
    assert engine.abort("a") and not engine.abort("a")
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("a", "abort")]
    assert not engine.has_unfinished()


def test_an_id_is_reused_once_its_request_finished():
    again = RequestSpec("r0", prompt(9, 6), greedy(5), arrival=1)
    record = run(Workload(SPEC, (REQUESTS[0], again)))
    assert record.results[("r0", 1)].token_ids == alone(again).token_ids


def test_block_sizes_under_four_run_as_pages_of_four_with_the_same_capacity():
    engine = transformers_engine(EngineSpec(block_size=1, num_kv_blocks=41), SYNC_CPU)
    assert (engine.page_size, engine.num_pages) == (4, 11)


def test_options_transformers_cannot_honour_per_request_are_refused_by_name():
    engine = transformers_engine(SPEC, SYNC_CPU)
    with pytest.raises(ValueError, match="params.temperature"):
        engine.add("a", [1, 2], SamplingParams(temperature=0.7, max_tokens=2), 0)
    with pytest.raises(ValueError, match="prompt.1.=600"):
        engine.add("a", [1, 600], greedy(2), 0)
    with pytest.raises(ValueError, match="max_model_len=128"):
        engine.add("a", [1] * 120, greedy(9), 0)


def test_the_invariant_check_sees_a_request_transformers_lost():
    engine = transformers_engine(SPEC, SYNC_CPU)
    engine.add("a", list(prompt(0, 5)), greedy(4), 0)
    engine.step()
    engine.check_invariants()
    engine._loop.processor.scheduler.active_requests.pop("a")
    with pytest.raises(InvariantViolation, match="unfinished requests are"):
        engine.check_invariants()


@pytest.mark.parametrize("version", ["5.16.0", "5.25.0", "6.0.0.dev0"])
def test_the_version_check_refuses_an_unsupported_transformers(monkeypatch, version):
    # importing a model class can put a fresh module object in sys.modules: patch the current one
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", version)
    with pytest.raises(RuntimeError, match=f"transformers {version} is installed"):
        check_environment()
    with pytest.raises(EngineSpecError, match=version):
        resolve_engine("transformers")


# Known transformers bugs (5.17.0 and 5.24.0): each test states the behaviour that should hold.

@pytest.mark.xfail(strict=True, raises=EngineHang,
                   reason="transformers bug: an abort after an offload leaves new requests "
                          "blocked (block_new_requests) with nothing left to finish")
def test_an_abort_after_a_soft_reset_leaves_the_reset_request_to_finish():
    # each request fits the 8 blocks alone, not both: r0 is soft-reset (recomputed later) and
    # transformers holds waiting requests back until a request *finishes*; r1 is aborted
    # instead, so r0 waits forever on an empty cache
    spec = EngineSpec(block_size=4, num_kv_blocks=8, max_num_batched_tokens=64, max_num_seqs=4)
    requests = (RequestSpec("r0", (5, 6, 7), greedy(26)),
                RequestSpec("r1", (8, 9, 10), greedy(24), arrival=1))
    record = run(Workload(spec, requests, aborts=(AbortSpec(step=20, request_id="r1"),)),
                 guard=False)
    assert record.results[("r0", 0)].finish_reason == "length"


@pytest.mark.xfail(strict=True, raises=TransformersCrash,
                   reason="transformers bug: queued additions are applied before queued "
                          "cancellations, by id, so a cancel also hits the re-added request "
                          "(KeyError in the scheduler for a waiting one)")
def test_an_id_aborted_while_waiting_and_added_again_in_the_same_step_runs_alone():
    # one step's calls: add x, abort x, add x again, add y (the client's order)
    again = RequestSpec("x", prompt(4, 6), greedy(5), order=2)
    requests = (RequestSpec("x", prompt(3, 5), greedy(4)), again,
                RequestSpec("y", prompt(5, 4), greedy(3), order=3))
    record = run(Workload(SPEC, requests, aborts=(AbortSpec(0, "x", 0, order=1),)))
    assert record.results[("x", 0)].finish_reason == "abort"
    assert record.results[("x", 1)].token_ids == alone(again).token_ids


@pytest.mark.xfail(strict=True, raises=InvariantViolation,
                   reason="transformers bug: the cancel of the running x also removes the new x "
                          "added after it, which then never gets a result")
def test_an_id_aborted_while_running_and_added_again_in_the_same_step_runs_alone():
    again = RequestSpec("x", prompt(4, 6), greedy(5), arrival=2, order=1)
    requests = (RequestSpec("x", prompt(3, 5), greedy(12)), again)
    record = run(Workload(SPEC, requests, aborts=(AbortSpec(2, "x", 0, order=0),)))
    assert ("x", 0) in record.aborted
    assert record.results[("x", 1)].token_ids == alone(again).token_ids


def test_an_id_aborted_and_added_again_a_step_later_runs_alone():
    # the control for the two above: with a step between the abort and the re-add, it works
    again = RequestSpec("x", prompt(4, 6), greedy(5), arrival=3)
    requests = (RequestSpec("x", prompt(3, 5), greedy(12)), again)
    record = run(Workload(SPEC, requests, aborts=(AbortSpec(2, "x", 0),)))
    assert record.results[("x", 0)].finish_reason == "abort"
    assert record.results[("x", 1)].token_ids == alone(again).token_ids


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [Mode(False, "cuda"), Mode(True, "cuda")],
                         ids=lambda m: m.name)
def test_sync_and_async_on_cuda_equal_each_request_alone(mode):
    record = run(Workload(SPEC, REQUESTS), mode)
    for request in REQUESTS:
        got = record.results[(request.request_id, 0)]
        ref = alone(request, mode=Mode(False, "cuda"))
        assert (got.token_ids, got.finish_reason) == (ref.token_ids, ref.finish_reason), \
            request.request_id


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason="transformers bug: async carry-over is keyed by request "
                                       "id, so the finished holder's last token lands in the "
                                       "new holder's prompt")
def test_async_reuse_of_an_id_whose_request_just_finished_equals_it_alone():
    again = RequestSpec("r0", prompt(9, 6), greedy(5), arrival=1)
    record = run(Workload(SPEC, (REQUESTS[0], REQUESTS[3], again)), Mode(True, "cuda"),
                 guard=False)
    assert record.results[("r0", 1)].token_ids == alone(again, mode=Mode(False, "cuda")).token_ids


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, raises=TransformersCrash,
                   reason="transformers bug: the update of the batch in flight reads the block "
                          "table of a request cancelled meanwhile (KeyError)")
def test_async_abort_of_a_request_in_flight_spares_the_others():
    record = run(Workload(SPEC, REQUESTS, aborts=(AbortSpec(step=4, request_id="r3"),)),
                 Mode(True, "cuda"), guard=False)
    for request in (REQUESTS[2], REQUESTS[4]):
        ref = alone(request, mode=Mode(False, "cuda"))
        assert record.results[(request.request_id, 0)].token_ids == ref.token_ids
