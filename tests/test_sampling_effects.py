"""Every sampling option, specified by its effect on the tokens the engine generates.

Most tests run on the oracle (an exactly batch-invariant toy LM: vocab 512, EOS 0), whose raw
next-token distribution can be read back exactly in two ways: ``logprobs=512`` returns the full
raw log-softmax of every step, and :func:`oracle_logits` evaluates the model outside the engine
for any history. The references below re-derive each option's documented semantics from those
and the tests check the engine's tokens against them, step by step. Statistical tests use fixed
seeds, so they are deterministic; their bounds are 5 binomial standard deviations wide.
"""
from __future__ import annotations

import math
import tracemalloc
from collections import Counter
from dataclasses import replace

import pytest
import torch

from lockstep.engine import LLM, RequestOutput, SamplingParams
from lockstep.engine.models.attention import AttentionMetadata
from lockstep.engine.request import Request

VOCAB = 512
ORACLE_EOS = 0
TOL = 1e-5  # float32 rounding of logits near 5 is ~5e-7; ties closer than this are not judged


@pytest.fixture(scope="module")
def oracle() -> LLM:
    return LLM(model="oracle", max_num_seqs=128, max_num_batched_tokens=8192)


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM()


@pytest.fixture(scope="module")
def cramped() -> LLM:
    """An oracle engine whose KV cache is too small for its batches: they must preempt."""
    return LLM(model="oracle", block_size=4, num_kv_blocks=12, max_num_seqs=8)


# ---------------------------------------------------------------------------------------------
# Helpers and references


def run(llm: LLM, prompt: list[int], **params) -> RequestOutput:
    [out] = llm.generate([prompt], SamplingParams(**params))
    return out


def greedy(llm: LLM, prompt: list[int], **params) -> RequestOutput:
    return run(llm, prompt, temperature=0.0, **params)


def full_logprobs(step: dict[int, float]) -> torch.Tensor:
    """One step's ``logprobs=VOCAB`` dict as a dense float64 vector."""
    assert sorted(step) == list(range(VOCAB)), "expected the full-vocabulary logprobs"
    dense = torch.empty(VOCAB, dtype=torch.float64)
    dense[list(step)] = torch.tensor(list(step.values()), dtype=torch.float64)
    return dense


def oracle_logits(model: torch.nn.Module, history: list[int]) -> torch.Tensor:
    """The model's raw next-token logits after ``history``: one prefill, outside the engine."""
    n, block_size = len(history), 16
    num_blocks = -(-n // block_size)
    cache = torch.zeros(model.kv_cache_shape(num_blocks, block_size), dtype=model.kv_cache_dtype)
    pos = torch.arange(n)
    meta = AttentionMetadata(slot_mapping=pos, block_tables=torch.arange(num_blocks)[None],
                             token_rows=torch.zeros(n, dtype=torch.int64), token_cols=pos,
                             query_positions=pos[None], q_max=n, kv_len=num_blocks * block_size)
    with torch.inference_mode():
        hidden = model(torch.tensor(history), pos, cache, meta)
        return model.compute_logits(hidden[-1:])[0].double()


def is_argmax(scores: torch.Tensor, token: int) -> bool:
    return bool(scores[token] >= scores.max() - TOL)


def assert_reference_argmax(scores: torch.Tensor, token: int, step: int) -> None:
    best = int(scores.argmax())
    assert is_argmax(scores, token), (
        f"step {step}: engine chose {token} (reference score {scores[token]:.6f}); the "
        f"reference picks {best} (score {scores[best]:.6f})")


def repetition_scores(logits: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """HF / vLLM repetition penalty: seen positive logits divided, seen negative multiplied."""
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[list(seen)] = True
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(mask, penalised, logits)


def assert_binomial(hits: int, n: int, p: float, what: str) -> None:
    bound = 5 * math.sqrt(n * p * (1 - p)) + 2
    assert abs(hits - n * p) <= bound, (
        f"{what}: {hits} of {n} samples, expected {n * p:.1f} +- {bound:.1f} (p={p:.4f})")


def sampled_steps(llm: LLM, num_seeds: int = 48, max_tokens: int = 6,
                  **params) -> list[tuple[int, torch.Tensor]]:
    """(sampled token, full raw logprobs) for every step of ``num_seeds`` seeded requests."""
    prompt = [11, 22, 33]
    outs = llm.generate([prompt] * num_seeds, [
        SamplingParams(seed=s, max_tokens=max_tokens, ignore_eos=True, logprobs=VOCAB, **params)
        for s in range(num_seeds)])
    return [(tok, full_logprobs(lp))
            for out in outs for tok, lp in zip(out.token_ids, out.logprobs)]


def rank(lp: torch.Tensor, token: int) -> int:
    """How many tokens are strictly more likely than ``token`` (ties share the best rank)."""
    return int((lp > lp[token]).sum())


def mass_above(lp: torch.Tensor, token: int) -> float:
    """Probability of the tokens strictly more likely than ``token``."""
    return float(lp.exp()[lp > lp[token]].sum())


def num_repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


@pytest.fixture(scope="module")
def eos_case(oracle: LLM) -> tuple[list[int], list[int], int]:
    """A prompt whose greedy continuation (EOS ignored) emits the oracle's EOS at index >= 1.

    Returns (prompt, the continuation, index of the first EOS); found by search, not hard-coded.
    """
    prompts = [[a, b] for a in range(1, 65) for b in range(1, 9)]
    outs = oracle.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        if ORACLE_EOS in out.token_ids[1:] and ORACLE_EOS != out.token_ids[0]:
            return prompt, out.token_ids, out.token_ids.index(ORACLE_EOS)
    pytest.fail("no prompt among the candidates makes the oracle emit EOS")


# ---------------------------------------------------------------------------------------------
# Temperature and greedy


@pytest.mark.parametrize("model", ["oracle", "default_llm"])
def test_greedy_picks_the_most_likely_raw_token_at_every_step(request, model):
    llm = request.getfixturevalue(model)
    out = greedy(llm, [5, 6, 7, 8], max_tokens=24, ignore_eos=True, logprobs=VOCAB)
    for k, (token, step) in enumerate(zip(out.token_ids, out.logprobs)):
        assert_reference_argmax(full_logprobs(step), token, k)


def test_higher_temperature_yields_more_distinct_tokens_across_seeds(oracle):
    def distinct_first_tokens(temperature: float) -> int:
        outs = oracle.generate([[3, 1, 4]] * 64, [
            SamplingParams(temperature=temperature, seed=s, max_tokens=1) for s in range(64)])
        return len({out.token_ids[0] for out in outs})

    assert distinct_first_tokens(2.0) > distinct_first_tokens(0.05)


def test_samples_follow_the_softmax_of_logits_divided_by_temperature(oracle):
    prompt, temperature, n = [2, 7, 1, 8], 0.25, 1000
    raw = full_logprobs(greedy(oracle, prompt, max_tokens=1, logprobs=VOCAB).logprobs[0])
    probs = (raw / temperature).softmax(-1)
    outs = oracle.generate([prompt] * n, [
        SamplingParams(temperature=temperature, seed=s, max_tokens=1) for s in range(n)])
    counts = Counter(out.token_ids[0] for out in outs)
    likely = probs.argsort(descending=True)[:8].tolist()
    for tok in likely:
        assert_binomial(counts[tok], n, float(probs[tok]), f"token {tok}")
    rest = n - sum(counts[t] for t in likely)
    assert_binomial(rest, n, 1 - float(probs[likely].sum()), "all other tokens")


@pytest.mark.parametrize("temperature", [1e-6, 1e-39], ids=["1e-6", "1e-39"])
def test_tiny_positive_temperature_samples_the_greedy_tokens(oracle, temperature):
    prompt = [1, 5, 9, 100]
    expected = greedy(oracle, prompt, max_tokens=8, ignore_eos=True).token_ids
    for seed in (0, 1, 2):
        out = run(oracle, prompt, temperature=temperature, seed=seed, max_tokens=8,
                  ignore_eos=True)
        assert out.token_ids == expected, f"seed {seed}"


# ---------------------------------------------------------------------------------------------
# top-k, top-p, min-p


def test_unrestricted_sampling_reaches_beyond_the_top_k_nucleus_and_min_p_sets(oracle):
    # Shows that the support checks below are not vacuous at these settings.
    steps = sampled_steps(oracle, temperature=1.0)
    assert any(rank(lp, tok) >= 3 for tok, lp in steps)
    assert any(mass_above(lp, tok) > 0.3 + 0.01 for tok, lp in steps)
    assert any(lp[tok] < lp.max() + math.log(0.5) - 0.01 for tok, lp in steps)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_one_samples_the_greedy_tokens(oracle, temperature):
    prompt = [9, 9, 8]
    expected = greedy(oracle, prompt, max_tokens=12, ignore_eos=True).token_ids
    for seed in range(4):
        out = run(oracle, prompt, temperature=temperature, top_k=1, seed=seed, max_tokens=12,
                  ignore_eos=True)
        assert out.token_ids == expected, f"seed {seed}"


def test_top_k_samples_only_among_the_k_most_likely_tokens(oracle):
    ranks = [rank(lp, tok) for tok, lp in sampled_steps(oracle, temperature=1.0, top_k=3)]
    assert max(ranks) < 3
    assert len(set(ranks)) > 1  # it samples within the set, not just the top token


def test_top_p_samples_only_within_the_nucleus(oracle):
    masses = [mass_above(lp, tok) for tok, lp in sampled_steps(oracle, temperature=1.0, top_p=0.3)]
    assert max(masses) < 0.3 + TOL
    assert max(masses) > 0.0  # it samples within the nucleus, not just the top token


def test_tiny_top_p_samples_only_the_most_likely_token(oracle):
    steps = sampled_steps(oracle, temperature=1.0, top_p=1e-9)
    assert all(rank(lp, tok) == 0 for tok, lp in steps)


def test_min_p_samples_only_tokens_at_least_min_p_times_as_likely_as_the_top(oracle):
    steps = sampled_steps(oracle, temperature=1.0, min_p=0.5)
    assert all(lp[tok] >= lp.max() + math.log(0.5) - TOL for tok, lp in steps)
    assert any(rank(lp, tok) > 0 for tok, lp in steps)


def test_min_p_one_samples_only_the_most_likely_token(oracle):
    steps = sampled_steps(oracle, temperature=1.0, min_p=1.0)
    assert all(rank(lp, tok) == 0 for tok, lp in steps)


@pytest.mark.parametrize("option,allowed", [
    (dict(top_k=3), lambda lp: torch.tensor([rank(lp, t) < 3 for t in range(VOCAB)])),
    (dict(top_p=0.3), lambda lp: torch.tensor([mass_above(lp, t) < 0.3 for t in range(VOCAB)])),
    (dict(min_p=0.5), lambda lp: lp >= lp.max() + math.log(0.5)),
], ids=["top_k", "top_p", "min_p"])
def test_filtered_samples_follow_the_renormalised_distribution_over_the_kept_tokens(
        oracle, option, allowed):
    prompt, n = [2, 7, 1, 8], 1000
    raw = full_logprobs(greedy(oracle, prompt, max_tokens=1, logprobs=VOCAB).logprobs[0])
    kept = allowed(raw)
    probs = torch.where(kept, raw, -math.inf).softmax(-1)
    outs = oracle.generate([prompt] * n, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=1, **option) for s in range(n)])
    counts = Counter(out.token_ids[0] for out in outs)
    for tok in kept.nonzero()[:, 0].tolist():
        assert_binomial(counts[tok], n, float(probs[tok]), f"token {tok}")
    assert sum(counts.values()) == sum(counts[t] for t in kept.nonzero()[:, 0].tolist())


@pytest.mark.parametrize("neutral", [
    dict(top_k=-1), dict(top_k=VOCAB), dict(min_p=1e-9), dict(logprobs=VOCAB),
    dict(stop_token_ids=()), dict(presence_penalty=0.0, frequency_penalty=0.0,
                                  repetition_penalty=1.0),
], ids=["top_k=-1", "top_k=vocab", "min_p=1e-9", "logprobs=vocab", "no_stop_ids", "no_penalties"])
def test_neutral_settings_leave_the_seeded_stream_unchanged(oracle, neutral):
    prompt = [4, 4, 2]
    base = dict(temperature=1.0, seed=21, max_tokens=16, ignore_eos=True)
    assert run(oracle, prompt, **base, **neutral).token_ids == run(oracle, prompt, **base).token_ids


# ---------------------------------------------------------------------------------------------
# Presence, frequency and repetition penalties


@pytest.mark.parametrize("presence,frequency", [
    (1.5, 0.0), (0.0, 1.5), (-2.0, 0.0), (0.0, -0.5), (-2.0, 0.7), (0.4, -0.3)])
def test_presence_and_frequency_penalties_follow_the_reference_formula(oracle, presence, frequency):
    # logit - frequency * count - presence * (count > 0), counts over the output so far. This is
    # shift-invariant, so the raw log-softmax (logprobs) stands in for the logits exactly.
    out = greedy(oracle, list(range(40, 60)), max_tokens=120, ignore_eos=True, logprobs=VOCAB,
                 presence_penalty=presence, frequency_penalty=frequency)
    counts: Counter[int] = Counter()
    overruled = 0
    for k, (token, step) in enumerate(zip(out.token_ids, out.logprobs)):
        raw = full_logprobs(step)
        scores = raw.clone()
        for tok, c in counts.items():
            scores[tok] -= frequency * c + presence
        assert_reference_argmax(scores, token, k)
        overruled += not is_argmax(scores, int(raw.argmax()))
        counts[token] += 1
    assert overruled > 0, "the penalty never changed the greedy choice: the check is vacuous"


def test_presence_and_frequency_penalties_ignore_prompt_tokens(oracle):
    prompt = list(range(1, 129))
    raw_out = greedy(oracle, prompt, max_tokens=1, logprobs=VOCAB)
    raw, top = full_logprobs(raw_out.logprobs[0]), raw_out.token_ids[0]
    # Choose the sign so that counting the prompt would change the first token.
    penalty = 2.0 if top in prompt else -2.0
    counted = raw.clone()
    counted[prompt] -= 2 * penalty
    assert not is_argmax(counted, top), "counting the prompt would not matter: check is vacuous"
    out = greedy(oracle, prompt, max_tokens=1, presence_penalty=penalty, frequency_penalty=penalty)
    assert out.token_ids == [top]


@pytest.mark.parametrize("penalty", [1.5, 0.8])
def test_repetition_penalty_follows_the_reference_formula_on_prompt_and_output(oracle, penalty):
    prompt = list(range(100, 200))
    out = greedy(oracle, prompt, max_tokens=40, ignore_eos=True, repetition_penalty=penalty)
    seen, overruled = set(prompt), 0
    for k, token in enumerate(out.token_ids):
        logits = oracle_logits(oracle.engine.model, prompt + out.token_ids[:k])
        scores = repetition_scores(logits, seen, penalty)
        assert_reference_argmax(scores, token, k)
        overruled += not is_argmax(scores, int(logits.argmax()))
        seen.add(token)
    assert overruled > 0, "the penalty never changed the greedy choice: the check is vacuous"


def test_repetition_penalty_makes_seen_tokens_less_likely_whatever_their_logit_sign(oracle):
    # Sampling at a high temperature exposes the negative-logit branch (multiply, not divide),
    # which greedy decoding never reaches.
    prompt, temperature, penalty, n = list(range(0, 256, 2)), 3.0, 5.0, 1000
    logits = oracle_logits(oracle.engine.model, prompt)
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[prompt] = True
    raw_probs = (logits / temperature).softmax(-1)
    probs = (repetition_scores(logits, set(prompt), penalty) / temperature).softmax(-1)
    groups = {"seen, logit > 0": seen & (logits > 0), "seen, logit <= 0": seen & (logits <= 0),
              "unseen": ~seen}
    for name in ("seen, logit > 0", "seen, logit <= 0"):
        assert probs[groups[name]].sum() < raw_probs[groups[name]].sum(), name
    outs = oracle.generate([prompt] * n, [
        SamplingParams(temperature=temperature, seed=s, max_tokens=1, repetition_penalty=penalty)
        for s in range(n)])
    first = torch.tensor([out.token_ids[0] for out in outs])
    for name, group in groups.items():
        assert_binomial(int(group[first].sum()), n, float(probs[group].sum()), name)


def test_large_repetition_penalty_steers_greedy_away_from_prompt_and_earlier_tokens(oracle):
    prompt = list(range(150, 350))
    baseline = greedy(oracle, prompt, max_tokens=30, ignore_eos=True).token_ids
    assert set(baseline) & set(prompt), "baseline never repeats a prompt token: check is vacuous"
    out = greedy(oracle, prompt, max_tokens=30, ignore_eos=True, repetition_penalty=1000.0)
    assert not set(out.token_ids) & set(prompt)
    assert num_repeats(out.token_ids) == 0


@pytest.mark.parametrize("penalty", [
    dict(repetition_penalty=1.5), dict(frequency_penalty=1.0), dict(presence_penalty=1.0)],
    ids=["repetition", "frequency", "presence"])
def test_penalties_reduce_repeated_tokens_on_the_default_model(default_llm, penalty):
    prompt = [7, 7, 7]
    baseline = greedy(default_llm, prompt, max_tokens=40, ignore_eos=True).token_ids
    assert num_repeats(baseline) >= 3, "the default model does not loop here: check is vacuous"
    out = greedy(default_llm, prompt, max_tokens=40, ignore_eos=True, **penalty)
    assert num_repeats(out.token_ids) < num_repeats(baseline)


MIXED = [  # (prompt, params): the odd-numbered requests are penalised
    ([1, 2, 3], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
    ([30, 20, 10, 5], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                     frequency_penalty=-2.0, repetition_penalty=1.3)),
    ([8] * 6, SamplingParams(temperature=0.9, seed=5, max_tokens=30, ignore_eos=True)),
    ([100, 200], SamplingParams(temperature=0.9, seed=6, max_tokens=30, ignore_eos=True,
                                presence_penalty=-2.0, frequency_penalty=0.5)),
]


@pytest.fixture(scope="module")
def mixed_runs(oracle: LLM) -> tuple[list[list[int]], list[list[int]]]:
    """The tokens of each MIXED request run alone, and run together in one batch."""
    solo = [oracle.generate([prompt], [params])[0].token_ids for prompt, params in MIXED]
    batch = oracle.generate([prompt for prompt, _ in MIXED], [params for _, params in MIXED])
    return solo, [out.token_ids for out in batch]


def test_unpenalised_requests_in_a_mixed_batch_match_their_solo_runs(mixed_runs):
    solo, batch = mixed_runs
    assert batch[0::2] == solo[0::2]


def test_penalised_requests_in_a_mixed_batch_match_their_solo_runs(oracle, mixed_runs):
    solo, batch = mixed_runs
    for (prompt, params), tokens in zip(MIXED[1::2], solo[1::2]):
        plain = replace(params, presence_penalty=0.0, frequency_penalty=0.0,
                        repetition_penalty=1.0)
        assert oracle.generate([prompt], plain)[0].token_ids != tokens, "penalties had no effect"
    assert batch[1::2] == solo[1::2]


def test_penalty_state_does_not_carry_over_to_the_next_request_in_a_slot(oracle):
    one_slot = LLM(model="oracle", max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, frequency_penalty=-2.0)
    first, second = one_slot.generate([[1, 2, 3], [4, 5, 6]], params)
    solo = greedy(oracle, [4, 5, 6], max_tokens=20, ignore_eos=True, frequency_penalty=-2.0)
    # Carried-over counts would boost the first request's favourite token by 2 per use.
    favourite, uses = Counter(first.token_ids).most_common(1)[0]
    assert uses >= 3 and solo.token_ids[0] != favourite, "carry-over would not show: vacuous"
    assert second.token_ids == solo.token_ids


def test_penalised_requests_give_the_same_tokens_under_preemption(oracle, cramped):
    prompts = [[i + 1] * 3 + [i + 2] * 3 for i in range(6)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=24,
                             ignore_eos=True, presence_penalty=0.5, frequency_penalty=-1.0,
                             repetition_penalty=1.2) for i in range(6)]
    solo = [oracle.generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    before = cramped.stats()["num_preemptions"]
    outs = cramped.generate(prompts, params)
    assert cramped.stats()["num_preemptions"] > before
    assert [out.token_ids for out in outs] == solo


# ---------------------------------------------------------------------------------------------
# min_tokens, stop tokens, EOS


ODD = tuple(range(1, VOCAB, 2))  # half the vocabulary: greedy meets one within a few steps


def test_min_tokens_masks_stop_tokens_and_eos_until_that_many_tokens_were_generated(oracle):
    min_tokens, prompts = 10, [[12, 34, 56 + i] for i in range(8)]
    outs = oracle.generate(prompts, SamplingParams(
        temperature=0, max_tokens=40, min_tokens=min_tokens, stop_token_ids=ODD, logprobs=VOCAB))
    banned = list(ODD) + [ORACLE_EOS]
    masked_at_last_step = 0
    for out in outs:
        for k, (token, step) in enumerate(zip(out.token_ids, out.logprobs)):
            raw = full_logprobs(step)
            scores = raw.clone()
            if k < min_tokens:
                scores[banned] = -math.inf
            assert_reference_argmax(scores, token, k)
            masked_at_last_step += k == min_tokens - 1 and int(raw.argmax()) in banned
    assert masked_at_last_step > 0, "no request wanted to stop at the boundary: check is vacuous"


def test_min_tokens_delays_the_stop_to_index_min_tokens_or_later(oracle):
    prompt, min_tokens = [12, 34, 56], 10
    early = greedy(oracle, prompt, max_tokens=40, stop_token_ids=ODD)
    assert early.finish_reason == "stop" and len(early.token_ids) <= min_tokens
    out = greedy(oracle, prompt, max_tokens=40, min_tokens=min_tokens, stop_token_ids=ODD)
    assert out.finish_reason == "stop"
    assert len(out.token_ids) >= min_tokens + 1
    assert out.token_ids[-1] in ODD + (ORACLE_EOS,)
    assert not set(out.token_ids[:-1]) & set(ODD + (ORACLE_EOS,))


def test_min_tokens_masks_eos(oracle, eos_case):
    prompt, continuation, eos_at = eos_case
    out = greedy(oracle, prompt, max_tokens=8, min_tokens=eos_at + 1)
    assert out.token_ids[:eos_at] == continuation[:eos_at]
    assert ORACLE_EOS not in out.token_ids[:eos_at + 1]


def test_stop_token_ends_generation_at_its_first_occurrence(oracle):
    prompt = [77, 66, 55]
    baseline = greedy(oracle, prompt, max_tokens=12, ignore_eos=True).token_ids
    at = next(i for i in range(3, 12) if baseline[i] not in baseline[:i])
    out = greedy(oracle, prompt, max_tokens=12, ignore_eos=True, stop_token_ids=[baseline[at]])
    assert out.token_ids == baseline[:at + 1]
    assert out.finish_reason == "stop"


def test_stop_token_that_never_appears_changes_nothing(oracle):
    prompt = [77, 66, 55]
    baseline = greedy(oracle, prompt, max_tokens=12, ignore_eos=True).token_ids
    absent = next(t for t in range(1, VOCAB) if t not in baseline)
    out = greedy(oracle, prompt, max_tokens=12, ignore_eos=True, stop_token_ids=[absent])
    assert out.token_ids == baseline
    assert out.finish_reason == "length"


def test_eos_ends_generation_with_reason_stop(oracle, eos_case):
    prompt, continuation, eos_at = eos_case
    out = greedy(oracle, prompt, max_tokens=8)
    assert out.token_ids == continuation[:eos_at + 1]
    assert out.finish_reason == "stop"


def test_ignore_eos_generates_past_eos_up_to_max_tokens(oracle, eos_case):
    prompt, continuation, eos_at = eos_case
    out = greedy(oracle, prompt, max_tokens=8, ignore_eos=True)
    assert out.token_ids == continuation
    assert out.token_ids[eos_at] == ORACLE_EOS
    assert out.finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Seeds


def test_same_seed_gives_the_same_stream(oracle):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    first = oracle.generate([[6, 6, 6]], params)[0].token_ids
    again = oracle.generate([[1, 1], [6, 6, 6]], [params, params])[1].token_ids
    assert first == again


@pytest.mark.parametrize("seeds", [(1, 2), (0, 1), (7, 7 << 32), (1, 1 << 32)],
                         ids=["1-2", "0-1", "7-7<<32", "1-1<<32"])
def test_different_seeds_give_different_streams(oracle, seeds):
    outs = oracle.generate([[6, 6, 6]] * 2, [
        SamplingParams(temperature=1.0, seed=s, max_tokens=16, ignore_eos=True) for s in seeds])
    assert outs[0].token_ids != outs[1].token_ids


def test_unseeded_requests_in_one_batch_draw_different_streams(oracle):
    outs = oracle.generate([[6, 6, 6]] * 4, SamplingParams(temperature=1.0, max_tokens=16,
                                                           ignore_eos=True))
    assert len({tuple(out.token_ids) for out in outs}) == 4


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_batch(oracle):
    prompt = [42, 43, 44, 45]
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True)
    alone = oracle.generate([prompt], params)[0].token_ids
    companions = [SamplingParams(temperature=0, max_tokens=25),
                  SamplingParams(temperature=0.7, top_k=5, seed=1, max_tokens=10),
                  SamplingParams(temperature=1.2, top_p=0.5, min_p=0.1, max_tokens=30),
                  SamplingParams(temperature=1.0, frequency_penalty=1.0, logprobs=3, max_tokens=7)]
    prompts = [[1] * 40, [2, 3], prompt, [9] * 17, [5, 4, 3, 2, 1]]
    outs = oracle.generate(prompts, companions[:2] + [params] + companions[2:])
    assert outs[2].token_ids == alone


def test_seeded_requests_give_the_same_tokens_under_preemption(oracle, cramped):
    prompts = [[i + 10] * 6 for i in range(6)]
    params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=24, ignore_eos=True)
              for i in range(6)]
    solo = [oracle.generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    before = cramped.stats()["num_preemptions"]
    outs = cramped.generate(prompts, params)
    assert cramped.stats()["num_preemptions"] > before
    assert [out.token_ids for out in outs] == solo


# ---------------------------------------------------------------------------------------------
# logprobs


def test_logprobs_none_returns_no_logprobs(oracle):
    assert run(oracle, [1, 2], max_tokens=4).logprobs is None


def test_logprobs_n_returns_the_sampled_token_and_the_top_n_per_step(oracle):
    base = dict(temperature=1.0, seed=8, max_tokens=12, ignore_eos=True)
    out = run(oracle, [3, 3, 4], logprobs=3, **base)
    full = run(oracle, [3, 3, 4], logprobs=VOCAB, **base)
    assert out.token_ids == full.token_ids and len(out.logprobs) == len(out.token_ids)
    for token, step, full_step in zip(out.token_ids, out.logprobs, full.logprobs):
        top3 = sorted(full_step, key=full_step.get, reverse=True)[:3]
        assert set(step) == set(top3) | {token}
        assert all(step[t] == pytest.approx(full_step[t], abs=1e-6) for t in step)


def test_logprobs_zero_returns_only_the_sampled_token(oracle):
    out = run(oracle, [3, 3, 4], temperature=1.0, seed=8, max_tokens=6, logprobs=0)
    assert [list(step) for step in out.logprobs] == [[t] for t in out.token_ids]


def test_full_logprobs_are_log_probabilities(oracle):
    out = run(oracle, [3, 3, 4], temperature=1.0, seed=8, max_tokens=6, logprobs=VOCAB)
    for step in out.logprobs:
        lp = full_logprobs(step)
        assert bool((lp <= 0).all())
        assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-4)


def test_logprobs_are_raw_model_logprobs_before_penalties_and_temperature(oracle):
    prompt = [50, 60, 70]
    out = run(oracle, prompt, temperature=0.5, seed=3, max_tokens=10, ignore_eos=True,
              logprobs=5, repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0)
    for k, step in enumerate(out.logprobs):
        raw = oracle_logits(oracle.engine.model, prompt + out.token_ids[:k]).log_softmax(-1)
        for tok, value in step.items():
            assert value == pytest.approx(float(raw[tok]), abs=1e-5), f"step {k}, token {tok}"


def test_requesting_logprobs_does_not_change_the_tokens(oracle):
    base = dict(temperature=1.0, seed=31, max_tokens=16, ignore_eos=True, presence_penalty=0.5)
    with_logprobs = run(oracle, [8, 9], logprobs=4, **base)
    assert with_logprobs.token_ids == run(oracle, [8, 9], **base).token_ids


# ---------------------------------------------------------------------------------------------
# max_tokens


def test_max_tokens_one_yields_one_token_with_reason_length(oracle):
    out = run(oracle, [1, 2, 3], temperature=1.0, seed=0, max_tokens=1, ignore_eos=True)
    assert len(out.token_ids) == 1
    assert out.finish_reason == "length"


@pytest.mark.parametrize("max_tokens", [2, 17, 50])
def test_max_tokens_caps_the_output_with_reason_length(oracle, max_tokens):
    out = run(oracle, [1, 2, 3], temperature=1.0, seed=0, max_tokens=max_tokens, ignore_eos=True)
    assert len(out.token_ids) == max_tokens
    assert out.finish_reason == "length"


def test_the_host_side_mixer_computes_the_same_bits_as_the_tensor_one():
    from lockstep.engine.hashing import mix32, mix32_int
    values = [0, 1, 2**31, 2**32 - 1, 2**32, 2**40 + 7, 123456789] + list(range(1000, 1100))
    tensor = mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [mix32_int(v) for v in values] == tensor


def test_top_logprobs_order_ties_by_token_id_whatever_k():
    """The batch asks for its largest k: a request's entries must not depend on it."""
    from lockstep.engine.sampler import top_logprobs
    logprobs = torch.full((1, 600), -9.0)
    logprobs[0, [497, 131, 300]] = torch.tensor([-3.973, -3.973, -1.0])
    for k in (1, 2, 3, 5, 600):
        values, ids = top_logprobs(logprobs, k)
        assert ids[0, :3].tolist()[:k] == [300, 131, 497][:k]
        assert values.shape == (1, k)


@pytest.mark.parametrize("async_scheduling,policy", [
    (a, p) for a in (False, True) for p in ("eager", "lazy", "threaded", "skewed")])
def test_a_requests_logprobs_are_the_same_alone_and_beside_a_larger_k(async_scheduling, policy):
    prompt = [5, 9, 2, 7]
    mine = SamplingParams(temperature=0.8, seed=4, max_tokens=12, logprobs=1, ignore_eos=True)
    wide = SamplingParams(temperature=0, max_tokens=12, logprobs=7, ignore_eos=True)
    [alone] = LLM(model="oracle").generate([prompt], mine)
    beside = LLM(model="oracle", device="sim", sim_policy=policy,
                 async_scheduling=async_scheduling).generate([[3, 3], prompt], [wide, mine])[1]
    assert beside.logprobs == alone.logprobs and beside.token_ids == alone.token_ids


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("vocab", [512, 128256, 32000, 151936, 50257])
def test_the_two_stage_argmax_is_argmax_with_ties_and_nans(vocab, device):
    from lockstep.engine.sampler import first_argmax
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=gen).to(device)
    x[1, [7, vocab - 1, vocab // 2]] = 50.0               # ties: the first wins
    x[2] = 0.0                                            # all equal: index 0
    x[3, [vocab - 3, 11]] = float("nan")                  # a NaN wins, the first of them
    x[4, -1] = float("inf")
    x[5, :] = float("-inf")
    assert first_argmax(x).tolist() == x.argmax(-1).tolist()
    assert first_argmax(x)[1] == 7 and first_argmax(x)[2] == 0


def test_handing_out_an_output_does_not_copy_the_ids():
    """The engine makes one output per changed request per step: allocating a copy of every
    id each time would make a long generation quadratic in its length."""
    request = Request("r", list(range(1000)), SamplingParams(), 0,
                      output_token_ids=list(range(10_000)))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        outputs = [RequestOutput(request) for _ in range(100)]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100 * 1_000  # a copy of the ids alone would be 100 x 88 KB
    assert outputs[-1].token_ids == list(range(10_000))
