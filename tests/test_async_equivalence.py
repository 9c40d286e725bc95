"""Async scheduling produces exactly the sync token streams, on every sim policy and on CUDA.

Every test here is also a ``nosync`` test: its engine steps run under sync_guard's detector and
race checker, so ``pytest -m nosync`` runs this suite (``-m "nosync and gpu"`` on a GPU).
"""
from __future__ import annotations

import pytest

from lockstep.engine import LLM, SamplingParams

pytestmark = pytest.mark.nosync("lockstep.engine.core:EngineCore.step")

TIGHT = dict(block_size=4, num_kv_blocks=48, max_num_batched_tokens=32, max_num_seqs=6)
TARGETS = [("sim", "eager"), ("sim", "lazy"), ("sim", "threaded"),
           pytest.param(("cuda", "eager"), marks=pytest.mark.gpu)]


def workload(n: int = 10) -> list[list[int]]:
    return [[(7 * i + 13 * j) % 500 + 3 for j in range(4 + 11 * i)] for i in range(n)]


def params_for(scenario: str, n: int) -> list[SamplingParams]:
    base = dict(max_tokens=20, ignore_eos=True)
    table = {
        "greedy": lambda i: SamplingParams(temperature=0, **base),
        "presence": lambda i: SamplingParams(temperature=0, presence_penalty=1.5, **base),
        "frequency": lambda i: SamplingParams(temperature=0, frequency_penalty=1.0, **base),
        "repetition": lambda i: SamplingParams(temperature=0, repetition_penalty=1.8, **base),
        "mixed_penalties": lambda i: SamplingParams(
            temperature=0, presence_penalty=1.5 * (i % 2), repetition_penalty=1.0 + (i % 3 == 0),
            **base),
        "min_tokens_stop": lambda i: SamplingParams(
            temperature=0.9, seed=i, min_tokens=6, stop_token_ids=list(range(3, 200)),
            max_tokens=20),
        "logprobs": lambda i: SamplingParams(temperature=0.8, seed=i, logprobs=3, **base),
        # logprobs=0 makes zero-size device tensors: every step once reported a false sync
        "logprobs_0": lambda i: SamplingParams(temperature=0.8, seed=i, logprobs=0 if i % 2
                                               else None, **base),
        "seeded_top_k_top_p": lambda i: SamplingParams(
            temperature=1.0, seed=100 + i, top_k=20, top_p=0.8, min_p=0.01, **base),
        "max_tokens_1": lambda i: SamplingParams(temperature=0.7, seed=i, max_tokens=1),
        "eos_and_stops": lambda i: SamplingParams(temperature=1.0, seed=i, max_tokens=40,
                                                  stop_token_ids=[17, 42]),
    }
    return [table[scenario](i) for i in range(n)]


SCENARIOS = ["greedy", "presence", "frequency", "repetition", "mixed_penalties",
             "min_tokens_stop", "logprobs", "logprobs_0", "seeded_top_k_top_p", "max_tokens_1",
             "eos_and_stops"]


def streams(llm: LLM, prompts, params):
    return [(o.token_ids, o.finish_reason, o.logprobs) for o in llm.generate(prompts, params)]


def build(target, model, async_scheduling, **kw) -> LLM:
    device, policy = target
    if device == "cuda":
        kw.setdefault("dtype", "float32")
    return LLM(model=model, device=device, sim_policy=policy if device == "sim" else None,
               async_scheduling=async_scheduling, **kw)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", ["oracle", None])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_async_equals_sync(target, model, scenario):
    prompts, params = workload(), params_for(scenario, 10)
    expected = streams(build(target, model, False), prompts, params)
    got = streams(build(target, model, True), prompts, params)
    assert got == expected


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", ["oracle", None])
def test_async_equals_sync_with_chunked_prefill_and_preemption(target, model):
    prompts, params = workload(), params_for("mixed_penalties", 10)
    sync_llm = build(target, model, False, **TIGHT)
    async_llm = build(target, model, True, **TIGHT)
    expected = streams(sync_llm, prompts, params)
    assert streams(async_llm, prompts, params) == expected
    assert async_llm.stats()["num_preemptions"] > 0
    assert sync_llm.stats()["num_preemptions"] > 0


def run_with_aborts(llm: LLM, abort_at_step: int) -> dict:
    params = params_for("seeded_top_k_top_p", 8)
    for i, (prompt, p) in enumerate(zip(workload(8), params)):
        llm.engine.add_request(f"r{i}", prompt, p)
    final, step = {}, 0
    while llm.engine.has_unfinished_requests():
        step += 1
        if step == abort_at_step:
            for rid in ("r1", "r4", "r6"):
                llm.engine.abort_request(rid)
        for out in llm.engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("abort_at_step", [2, 5, 9])
def test_abort_with_step_in_flight_loses_nothing_and_frees_blocks(target, abort_at_step):
    expected = run_with_aborts(build(target, "oracle", False, **TIGHT), abort_at_step)
    llm = build(target, "oracle", True, **TIGHT)
    got = run_with_aborts(llm, abort_at_step)
    assert sorted(got) == [f"r{i}" for i in range(8)]
    for rid in ("r1", "r4", "r6"):
        assert got[rid].finish_reason == "abort"
        full = expected[rid].token_ids if expected[rid].finish_reason != "abort" else None
        if full is not None:  # an aborted stream is a prefix of the uninterrupted one
            assert full[:len(got[rid].token_ids)] == got[rid].token_ids
    for rid in got.keys() - {"r1", "r4", "r6"}:
        assert got[rid].token_ids == expected[rid].token_ids
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


@pytest.mark.parametrize("target", TARGETS)
def test_request_id_reused_right_after_finish(target):
    llm = build(target, "oracle", True)
    alone = build(target, "oracle", False)
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.engine.add_request("x", [5, 6, 7], short)
    llm.engine.add_request("other", [9, 9, 9, 9], long)
    outs = []
    reused = False
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            outs.append(out)
            if out.request_id == "x" and out.finished and not reused:
                llm.engine.add_request("x", [8, 8], long)
                reused = True
    finals = [o for o in outs if o.finished]
    [second_x] = [o for o in finals if o.request_id == "x" and o.prompt_token_ids == [8, 8]]
    assert second_x.token_ids == alone.generate([[8, 8]], long)[0].token_ids


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_cuda_graph_decode_matches_eager(async_scheduling):
    prompts, params = workload(), params_for("mixed_penalties", 10)
    graphs = LLM(model="oracle", device="cuda", async_scheduling=async_scheduling)
    eager = LLM(model="oracle", device="cuda", async_scheduling=async_scheduling,
                enforce_eager=True)
    assert graphs.engine.runner.graphs is not None
    assert streams(graphs, prompts, params) == streams(eager, prompts, params)



@pytest.mark.parametrize("async_scheduling", [False, True])
def test_each_step_output_is_a_snapshot_of_that_step(async_scheduling):
    """An output handed out at one step keeps that step's ids and logprobs while the request
    goes on (it is taken in constant time, not by copying them), and the lists it returns are
    the caller's to change."""
    llm = build(("sim", "lazy"), "oracle", async_scheduling)
    llm.engine.add_request("r", [5, 6, 7], SamplingParams(temperature=0, max_tokens=9,
                                                          ignore_eos=True, logprobs=2))
    seen = []
    while llm.engine.has_unfinished_requests():
        seen += [(out, list(out.token_ids), list(out.logprobs)) for out in llm.engine.step()]
    final = seen[-1][0]
    assert [len(ids) for _, ids, _ in seen] == list(range(1, 10)) and final.finished
    for out, ids, logprobs in seen:
        assert out.token_ids == ids == final.token_ids[:len(ids)]
        assert out.logprobs == logprobs == final.logprobs[:len(ids)]
        assert out.finished == (out is final) and out.prompt_token_ids == [5, 6, 7]
    final.token_ids.append(-1)
    final.prompt_token_ids.append(-1)
    assert len(final.token_ids) == 9 and final.prompt_token_ids == [5, 6, 7]
    assert final == seen[-1][0] and final != seen[-2][0] and "token_ids=[" in repr(final)

