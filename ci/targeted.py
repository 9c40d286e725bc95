"""Hand-written workloads, each aimed at one hard state of async scheduling, for the oracle.

The gate runs every one through the full differential (sync, async on each sim policy, each
request alone; invariants, output rules, sync_guard) before any random search: they reach in
seconds the states that random workloads reach only now and then. The zoo's demonstrations
use them too. Stop ids are tokens the oracle really emits for that request (its stream is a
function of the request alone), at output position 3: a stop with steps still in flight;
``tests/test_gate.py`` checks that each workload reaches the state it is named for.
"""
from __future__ import annotations

from lockstep.engine import SamplingParams as P
from lockstep.property_tests.workload import AbortSpec, EngineSpec, RequestSpec, Workload


def _prompt(n: int, a: int = 7, b: int = 3) -> tuple[int, ...]:
    return tuple((a * j + b) % 509 + 1 for j in range(n))


# requests whose streams stop at output position 3 (the stop id is the 4th token they emit)
STOP_SAMPLED = RequestSpec("s0", _prompt(5), P(temperature=1.0, seed=11, max_tokens=12,
                                               min_tokens=1, stop_token_ids=(357,)))
STOP_PENALISED = RequestSpec("s1", _prompt(9, 13, 5), P(
    temperature=0.0, max_tokens=12, min_tokens=3, presence_penalty=1.5, frequency_penalty=1.0,
    stop_token_ids=(166,)))
STOP_TOP_K = RequestSpec("s2", _prompt(4, 17, 2), P(
    temperature=1.5, seed=12, top_k=50, max_tokens=12, min_tokens=2, logprobs=1,
    stop_token_ids=(1,)))
STOP_GREEDY = RequestSpec("s3", _prompt(7, 19, 9), P(temperature=0.0, max_tokens=12,
                                                     stop_token_ids=(469,)))
STOP_REUSED = RequestSpec("u0", _prompt(3, 23, 4), P(temperature=1.0, seed=21, max_tokens=12,
                                                     stop_token_ids=(175,)))


def _penalised(rid: str, n: int, a: int, arrival: int = 0, **kw) -> RequestSpec:
    """Repetition 0.7 favours the prompt's tokens and frequency 2.0 pushes each emitted one
    back down: every token depends on the exact per-slot counts."""
    params = dict(temperature=0.0, max_tokens=10, repetition_penalty=0.7, frequency_penalty=2.0,
                  presence_penalty=0.5)
    params.update(kw)
    return RequestSpec(rid, _prompt(n, a, 1), P(**params), arrival)


def mixed_batch() -> Workload:
    """Every sampling option side by side, a chunked prefill (23 tokens, budget 16)."""
    return Workload(EngineSpec(block_size=4, num_kv_blocks=64, max_num_batched_tokens=16), (
        RequestSpec("greedy", _prompt(3), P(temperature=0.0, max_tokens=10)),
        RequestSpec("chunked", _prompt(23, 11), P(temperature=1.0, seed=1, top_k=50,
                                                 max_tokens=10, logprobs=2)),
        RequestSpec("unseeded", _prompt(9, 5), P(temperature=0.8, top_p=0.9, max_tokens=8,
                                                presence_penalty=1.5, frequency_penalty=1.0,
                                                repetition_penalty=1.3), 1),
        STOP_SAMPLED,
        RequestSpec("one", _prompt(1), P(temperature=0.0, max_tokens=1), 2),
        RequestSpec("min_p", _prompt(16, 3), P(temperature=1.0, seed=5, min_p=0.05,
                                               max_tokens=6, min_tokens=6, logprobs=0), 4),
    ))


def tight_cache() -> Workload:
    """The mixed batch in a cache that holds little more than one request: preemption with
    steps in flight, resumed with chunked prefill (budget 8)."""
    batch = mixed_batch()
    return Workload(EngineSpec(block_size=2, num_kv_blocks=20, max_num_batched_tokens=8,
                               max_num_seqs=4), batch.requests)


def stops_in_flight() -> Workload:
    """Four requests stop at output position 3, two of them under min_tokens, one penalised."""
    return Workload(EngineSpec(block_size=4), (STOP_SAMPLED, STOP_PENALISED, STOP_TOP_K,
                                               STOP_GREEDY))


def reused_ids() -> Workload:
    """An id reused right after its holder stopped with a step in flight, and one reused after
    an abort; the new holders have penalties, so stale state shows."""
    again = _penalised("u0", 12, 31)
    return Workload(EngineSpec(block_size=4, max_num_seqs=4), (
        STOP_REUSED, RequestSpec("a0", _prompt(6, 37), P(temperature=0.0, max_tokens=12)),
        RequestSpec("u0", again.prompt, again.params, 1),
        RequestSpec("a0", _prompt(8, 41), P(temperature=1.0, seed=4, max_tokens=8,
                                            presence_penalty=1.5), 3),
    ), (AbortSpec(2, "a0", 0),))


def aborts() -> Workload:
    """Aborts right after the add, in mid-prefill, with a step in flight, and late."""
    requests = tuple(RequestSpec(f"b{i}", _prompt(3 + 5 * i, 43 + i), P(
        temperature=1.0, seed=30 + i, max_tokens=10, frequency_penalty=1.0 * (i % 2)), i // 2)
        for i in range(5))
    return Workload(EngineSpec(block_size=4, max_num_batched_tokens=8),
                    requests, tuple(AbortSpec(step, f"b{i}") for i, step in
                                    enumerate((0, 1, 2, 3, 6))))


def client_orders() -> Workload:
    """One step's calls in a client's order: abort a running request and add its id again (a
    step in flight), add a request, abort it and add its id again while it still waits for a
    seat, and an abort made before its request's add (which then runs in full)."""
    return Workload(EngineSpec(block_size=4, max_num_seqs=2), (
        RequestSpec("c0", _prompt(6, 101), P(temperature=0.0, max_tokens=12)),
        RequestSpec("c1", _prompt(5, 103), P(temperature=1.0, seed=5, max_tokens=12)),
        RequestSpec("w0", _prompt(4, 107), P(temperature=0.0, max_tokens=4), 1, 0),
        RequestSpec("w0", _prompt(7, 109), P(temperature=1.0, seed=6, max_tokens=6,
                                             frequency_penalty=1.0), 1, 2),
        RequestSpec("c0", _prompt(9, 113), P(temperature=0.0, max_tokens=8,
                                             repetition_penalty=0.7), 2, 1),
        RequestSpec("e0", _prompt(3, 127), P(temperature=0.0, max_tokens=5), 3, 1),
    ), (AbortSpec(1, "w0", 0, 1), AbortSpec(2, "c0", 0, 0), AbortSpec(3, "e0", 0, 0)))


def forced_preemption() -> Workload:
    """Preemptions forced at five steps, some with a step in flight; chunked resumes."""
    return Workload(EngineSpec(block_size=4, max_num_batched_tokens=5), (
        _penalised("p0", 7, 47), RequestSpec("p1", _prompt(11, 53), P(
            temperature=1.0, seed=7, max_tokens=10, logprobs=1)),
        _penalised("p2", 4, 59, arrival=1, temperature=0.5, seed=8),
    ), preempt_steps=(1, 2, 3, 5, 8))


def slot_reuse() -> Workload:
    """Six penalised requests through two slots: every slot is reused, penalties beside none."""
    requests = [_penalised(f"q{i}", 10 + 3 * i, 61 + 2 * i, arrival=2 * i) for i in range(5)]
    requests.append(RequestSpec("plain", _prompt(5, 71), P(temperature=0.0, max_tokens=10), 1))
    return Workload(EngineSpec(block_size=4, max_num_seqs=2), tuple(requests))


def edge_lengths() -> Workload:
    """max_tokens 1, min_tokens == max_tokens, one-token prompts, block boundaries +-1."""
    return Workload(EngineSpec(block_size=4), (
        RequestSpec("m1", _prompt(1, 73), P(temperature=0.0, max_tokens=1)),
        RequestSpec("m1s", _prompt(4, 79), P(temperature=1.0, seed=9, max_tokens=1, logprobs=0)),
        RequestSpec("mm", _prompt(5, 83), P(temperature=1.0, seed=10, max_tokens=6,
                                            min_tokens=6, stop_token_ids=(1, 2, 3))),
        RequestSpec("b3", _prompt(3, 89), P(temperature=0.0, max_tokens=5, ignore_eos=True)),
        RequestSpec("b8", _prompt(8, 97), P(temperature=0.0, max_tokens=9, min_tokens=1)),
    ))


def retiring() -> Workload:
    """Requests retiring at staggered steps: at most async launches, some request's last token
    is in flight outside the launching step (the fault sweep's workload)."""
    from lockstep.property_tests.faults import retiring_workload
    return retiring_workload()


def turnover() -> Workload:
    """Constant turnover: 20 short requests (max_tokens 1 and 2 alternating, penalties and seeds
    on some) beside one of 12 tokens, ``max_num_seqs`` 4. At every step some request's last
    token is in flight: async must admit as sync does (the occupancy rule), and the slots of
    retiring requests (more than ``max_num_seqs`` live at once) must keep their penalty state
    apart."""
    requests = [RequestSpec("long", _prompt(9, 29, 3), P(temperature=0.0, max_tokens=12,
                                                         ignore_eos=True))]
    for i in range(20):
        requests.append(RequestSpec(f"t{i}", _prompt(3 + 3 * (i % 3), 31 + i, i), P(
            temperature=0.9 * (i % 2), seed=60 + i, max_tokens=1 + i % 2, ignore_eos=True,
            repetition_penalty=1.0 + 0.4 * (i % 4 == 1), frequency_penalty=1.0 * (i % 4 == 3))))
    return Workload(EngineSpec(block_size=4, max_num_batched_tokens=16, max_num_seqs=4),
                    tuple(requests))


TARGETED = {f.__name__: f for f in (mixed_batch, tight_cache, stops_in_flight, reused_ids,
                                    aborts, client_orders, forced_preemption, slot_reuse,
                                    edge_lengths, retiring, turnover)}


def targeted_workloads(model: str | None = "oracle") -> dict[str, Workload]:
    """The workloads by name, for ``model`` (stop ids hit their mark only on the oracle)."""
    import dataclasses
    out = {}
    for name, make in TARGETED.items():
        w = make()
        out[name] = dataclasses.replace(w, engine=dataclasses.replace(w.engine, model=model))
    return out
