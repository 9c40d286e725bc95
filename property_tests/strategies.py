"""Hypothesis strategies for workloads that reach the hard states of async scheduling on purpose.

* prompts at block boundaries +-1 and of a single token;
* max_tokens 1, min_tokens == max_tokens, stop ids the model really emits for that request
  (read from the request's solo run, which the differential caches anyway);
* every sampling option, and mixes of requests with and without penalties, seeds and logprobs;
* KV caches barely larger than the largest request (preemption with a step in flight), token
  budgets small enough to chunk prefills, forced preemptions;
* arrivals and aborts in mid-run, an abort right after the add, and the reuse of an id whose
  previous request just finished or was aborted;
* a client's calls in any order within one step (each add and abort has an ``order``), including
  "abort x, then add x again" inside one step.

For an engine other than Lockstep's, only what its adapter declares
(:class:`~lockstep.property_tests.capabilities.Capabilities`) is generated; the rest is narrowed
as :func:`~lockstep.property_tests.capabilities.narrowing` says.
"""
from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from lockstep.engine import SamplingParams

from .capabilities import capabilities_of, narrow_params
from .engine_under_test import SYNC, EngineFactory, Mode, lockstep_engine
from .workload import AbortSpec, EngineSpec, RequestSpec, Workload

VOCAB = {"oracle": 512, None: 512}   # the embedded models; a checkpoint passes its own
MAX_REQUESTS = 6
MAX_NEW_TOKENS = 12


@st.composite
def sampling_params(draw, vocab: int = 512) -> SamplingParams:
    max_tokens = draw(st.one_of(st.just(1), st.integers(1, MAX_NEW_TOKENS)))
    min_tokens = draw(st.one_of(st.just(0), st.just(max_tokens), st.integers(0, max_tokens)))
    greedy = draw(st.booleans())
    penalties = draw(st.booleans())
    return SamplingParams(
        temperature=0.0 if greedy else draw(st.sampled_from([0.5, 1.0, 1.5])),
        top_k=draw(st.sampled_from([0, 0, 5, 50])),
        top_p=draw(st.sampled_from([1.0, 1.0, 0.9, 0.5])),
        min_p=draw(st.sampled_from([0.0, 0.0, 0.05])),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**32))),
        max_tokens=max_tokens, min_tokens=min_tokens,
        stop_token_ids=draw(st.lists(st.integers(0, vocab - 1), max_size=2)),
        ignore_eos=draw(st.booleans()),
        presence_penalty=draw(st.sampled_from([0.0, 1.5, -1.0])) if penalties else 0.0,
        frequency_penalty=draw(st.sampled_from([0.0, 1.0, 2.0])) if penalties else 0.0,
        repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.7])) if penalties else 1.0,
        logprobs=draw(st.one_of(st.none(), st.integers(0, 3))))


@st.composite
def prompts(draw, block_size: int, vocab: int = 512) -> tuple[int, ...]:
    length = draw(st.one_of(
        st.just(1),
        st.builds(lambda k, d: max(1, k * block_size + d), st.integers(1, 4),
                  st.sampled_from([-1, 0, 1])),
        st.integers(1, 40)))
    return tuple(draw(st.lists(st.integers(1, vocab - 1), min_size=length, max_size=length)))


def _emitted_stop(draw, spec: EngineSpec, request: RequestSpec, index: int,
                  factory: EngineFactory, reference: Mode) -> RequestSpec:
    """Put a token the model really emits for this request among its stop ids."""
    from .differential import solo_result
    emitted = solo_result(spec, request, index, factory, mode=reference).token_ids
    if not emitted:
        return request
    stop = draw(st.sampled_from(emitted))
    params = dataclasses.replace(request.params,
                                 stop_token_ids=(*request.params.stop_token_ids, stop))
    return dataclasses.replace(request, params=params)


@st.composite
def workloads(draw, model: str | None = "oracle", vocab: int | None = None,
              max_requests: int = MAX_REQUESTS, factory: EngineFactory = lockstep_engine,
              reference: Mode = SYNC) -> Workload:
    """A workload for ``model`` (the oracle by default) aimed at the hard states, using only
    what ``factory``'s engine declares (``reference``: where its solo runs go)."""
    caps = capabilities_of(factory)
    vocab = vocab or VOCAB.get(model, 512)
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    n = draw(st.integers(1, max_requests))
    base = EngineSpec(model=model, block_size=block_size, num_kv_blocks=None,
                      max_num_batched_tokens=1024, max_num_seqs=8, max_model_len=256,
                      seed=draw(st.integers(0, 3)))
    requests: list[RequestSpec] = []
    aborts: list[AbortSpec] = []
    arrival = 0
    for i in range(n):
        arrival += draw(st.sampled_from([0, 0, 1, 2, 5]))
        order = draw(st.integers(0, 3))
        reuse = caps.reuse_ids and requests and draw(st.integers(0, 4)) == 0
        rid = draw(st.sampled_from([r.request_id for r in requests])) if reuse else f"r{i}"
        if reuse and caps.abort and draw(st.booleans()):
            # abort the id's previous request and add the new one right after, in one step
            previous = sum(r.request_id == rid for r in requests) - 1
            aborts.append(AbortSpec(arrival, rid, previous, order))
            order += 1
        prompt = draw(prompts(block_size, vocab))
        request = RequestSpec(rid, prompt, narrow_params(draw(sampling_params(vocab)), caps),
                              arrival, order)
        if caps.supports("stop_token_ids") and draw(st.integers(0, 2)) == 0:
            request = _emitted_stop(draw, base, request, i, factory, reference)
        requests.append(request)
        if caps.abort and draw(st.integers(0, 4)) == 0:
            occurrence = sum(r.request_id == rid for r in requests) - 1
            aborts.append(AbortSpec(arrival + draw(st.sampled_from([0, 0, 1, 3])), rid,
                                    occurrence, draw(st.integers(0, 4))))
    need = max(-(-(len(r.prompt) + r.params.max_tokens) // block_size) for r in requests)
    engine = dataclasses.replace(
        base,
        num_kv_blocks=need + draw(st.sampled_from([0, 1, 2, need, 4 * need])),
        max_num_batched_tokens=draw(st.sampled_from([block_size + 1, 8, 16, 64, 1024])),
        max_num_seqs=draw(st.integers(1, 8)))
    preempts = draw(st.lists(st.integers(0, 30), max_size=2, unique=True)) \
        if caps.force_preempt else []
    return Workload(engine, tuple(requests), tuple(aborts), tuple(sorted(preempts)))
