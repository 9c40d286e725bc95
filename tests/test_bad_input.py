"""Invalid input is refused with a ValueError that names the field, and refusal leaves no trace.

Every refused request is followed by the same engine serving valid requests exactly as a fresh
engine does, with every KV block free; aborts end one request without disturbing the others.
"""
from __future__ import annotations

import json
import math
import pickle
import re

import pytest
import torch

from lockstep.engine import LLM, SamplingParams
from lockstep.engine.models.default import DEFAULT_CONFIG, random_llama_weights, write_checkpoint

from conftest import drain

VOCAB = 512  # the oracle's
MAX_MODEL_LEN = 64
ORACLE = dict(model="oracle", max_model_len=MAX_MODEL_LEN)
VALID_PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]
VALID_PARAMS = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True,
                               presence_penalty=0.5, repetition_penalty=1.2)]
TINY_KV = dict(model="oracle", block_size=4, num_kv_blocks=4)  # room for 16 tokens in all


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    """What a fresh engine generates for the valid requests."""
    return [out.token_ids for out in LLM(**ORACLE).generate(VALID_PROMPTS, VALID_PARAMS)]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(**ORACLE)


def assert_idle_and_empty(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"], stats
    assert stats["num_running"] == stats["num_waiting"] == 0, stats


def assert_still_serves(llm: LLM, expected: list[list[int]]) -> None:
    """The engine holds nothing and serves the valid requests as a fresh engine does."""
    assert_idle_and_empty(llm)
    outs = llm.generate(VALID_PROMPTS, VALID_PARAMS)
    assert [out.token_ids for out in outs] == expected
    assert [out.finish_reason for out in outs] == ["length"] * len(expected)
    assert_idle_and_empty(llm)


def refused(call, field: str) -> ValueError:
    """Run ``call``; it must raise a ValueError whose message names ``field``."""
    with pytest.raises(ValueError) as info:
        call()
    assert field in str(info.value), f"message does not name {field!r}: {info.value}"
    return info.value


# ---------------------------------------------------------------------------------------------
# SamplingParams fields, checked on construction

BAD_PARAMS = [
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=math.nan)),
    ("temperature", dict(temperature=math.inf)),
    ("temperature", dict(temperature="1.0")),
    ("top_k", dict(top_k=-2)),
    ("top_k", dict(top_k=2.0)),
    ("top_k", dict(top_k=math.nan)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=-0.5)),
    ("top_p", dict(top_p=1.01)),
    ("top_p", dict(top_p=math.nan)),
    ("min_p", dict(min_p=-0.01)),
    ("min_p", dict(min_p=1.01)),
    ("min_p", dict(min_p=math.nan)),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=1.5)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-5)),
    ("max_tokens", dict(max_tokens=math.nan)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=5, max_tokens=4)),
    ("stop_token_ids", dict(stop_token_ids=[1, 2.0])),
    ("stop_token_ids", dict(stop_token_ids=["3"])),
    ("stop_token_ids", dict(stop_token_ids=[True])),
    ("stop_token_ids", dict(stop_token_ids=3)),
    ("stop_token_ids", dict(stop_token_ids="12")),
    ("ignore_eos", dict(ignore_eos="yes")),
    ("presence_penalty", dict(presence_penalty=2.01)),
    ("presence_penalty", dict(presence_penalty=-2.01)),
    ("presence_penalty", dict(presence_penalty=math.nan)),
    ("frequency_penalty", dict(frequency_penalty=2.01)),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("frequency_penalty", dict(frequency_penalty=math.nan)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("repetition_penalty", dict(repetition_penalty=math.nan)),
    ("repetition_penalty", dict(repetition_penalty=math.inf)),
    ("logprobs", dict(logprobs=-1)),
    ("logprobs", dict(logprobs=1.0)),
    ("logprobs", dict(logprobs=math.nan)),
    # beyond float32 (the staging buffers' type) or beyond a float at all
    ("temperature", dict(temperature=1e39, min_tokens=8, max_tokens=8)),
    ("temperature", dict(temperature=10**400)),
    ("top_p", dict(top_p=10**400)),
    ("repetition_penalty", dict(repetition_penalty=10**400)),
    ("repetition_penalty", dict(repetition_penalty=-1e39)),
    ("presence_penalty", dict(presence_penalty=-(10**400))),
]


@pytest.mark.parametrize("field,kwargs", BAD_PARAMS,
                         ids=[repr(kw) for _, kw in BAD_PARAMS])
def test_invalid_sampling_params_are_refused_naming_the_field(field, kwargs):
    refused(lambda: SamplingParams(**kwargs), field)


# ---------------------------------------------------------------------------------------------
# Requests refused by generate()

BAD_REQUESTS = [
    ("stop_token_ids", [1, 2], dict(stop_token_ids=[VOCAB])),
    ("stop_token_ids", [1, 2], dict(stop_token_ids=[-1])),
    ("logprobs", [1, 2], dict(logprobs=VOCAB + 1)),
    ("top_k", [1, 2], dict(top_k=VOCAB + 1)),
    ("prompt_token_ids", [], {}),
    ("prompt_token_ids", [1, -1], {}),
    ("prompt_token_ids", [1, VOCAB], {}),
    ("prompt_token_ids", [1, 2.0], {}),
    ("prompt_token_ids", [1, None], {}),
    ("prompt_token_ids", [1] * MAX_MODEL_LEN, dict(max_tokens=1)),
    ("prompt_token_ids", [1] * (MAX_MODEL_LEN + 10), dict(max_tokens=1)),
    ("max_tokens", [1] * (MAX_MODEL_LEN - 4), dict(max_tokens=5)),
    ("prompt_token_ids", torch.tensor(5), {}),  # a 0-d tensor
    ("prompt_token_ids", torch.ones(2, 3, dtype=torch.int64), {}),
    ("prompt_token_ids", torch.tensor([1.0, 2.0]), {}),
    ("prompt_token_ids", {1, 2}, {}),
    ("prompt_token_ids", b"\x01\x02", {}),
]


@pytest.mark.parametrize(
    "field,prompt,kwargs", BAD_REQUESTS,
    ids=[f"{field}-{type(p).__name__}-{tuple(p.shape) if hasattr(p, 'shape') else len(p)}-{kw}"
         for field, p, kw in BAD_REQUESTS])
def test_invalid_request_is_refused_naming_the_field_and_leaves_no_trace(
        llm, expected, field, prompt, kwargs):
    refused(lambda: llm.generate([prompt], SamplingParams(**kwargs)), field)
    assert_still_serves(llm, expected)


@pytest.mark.parametrize("field,prompt", [(f, p) for f, p, kw in BAD_REQUESTS if not kw])
def test_add_request_refuses_the_same_prompts_naming_prompt_token_ids(field, prompt):
    engine = LLM(**ORACLE).engine
    refused(lambda: engine.add_request("r", prompt, SamplingParams()), field)
    assert not engine.scheduler.requests


def test_integer_tensors_and_arrays_are_prompts(llm, expected):
    import numpy as np
    outs = llm.generate([torch.tensor(VALID_PROMPTS[0]), np.array(VALID_PROMPTS[1])],
                        VALID_PARAMS)
    assert [out.token_ids for out in outs] == expected


def test_request_filling_max_model_len_exactly_is_served(llm, expected):
    [out] = llm.generate([[7] * (MAX_MODEL_LEN - 4)],
                         SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4
    assert_still_serves(llm, expected)


@pytest.mark.parametrize("params", [dict(temperature=0), "greedy", None],
                         ids=["dict", "str", "None"])
def test_sampling_params_of_the_wrong_type_are_refused(llm, expected, params):
    refused(lambda: llm.generate([[1, 2]], [params]), "sampling_params")
    assert_still_serves(llm, expected)


@pytest.mark.parametrize("count", [1, 3])
def test_wrong_number_of_sampling_params_is_refused(llm, expected, count):
    refused(lambda: llm.generate([[1, 2], [3, 4]], [SamplingParams()] * count),
            "sampling_params")
    assert_still_serves(llm, expected)


def test_string_prompt_is_refused_when_the_model_has_no_tokenizer(llm, expected):
    refused(lambda: llm.generate([[1, 2], "hello"]), "prompts[1]")
    assert_still_serves(llm, expected)


@pytest.mark.parametrize("prompts", [None, 5, [b"\x01\x02"]], ids=["None", "int", "bytes"])
def test_prompts_that_are_not_a_list_of_prompts_are_refused(llm, expected, prompts):
    refused(lambda: llm.generate(prompts), "prompts")
    assert_still_serves(llm, expected)


def test_one_invalid_prompt_refuses_the_whole_batch_before_any_step(llm, expected):
    steps = llm.stats()["num_steps"]
    refused(lambda: llm.generate([VALID_PROMPTS[0], [1, VOCAB], VALID_PROMPTS[1]],
                                 SamplingParams(max_tokens=4)), "prompt_token_ids")
    assert llm.stats()["num_steps"] == steps
    assert_still_serves(llm, expected)


def test_request_that_could_never_fit_the_kv_cache_is_refused():
    tiny = LLM(**TINY_KV)
    refused(lambda: tiny.generate([[1] * 10], SamplingParams(max_tokens=10)), "num_kv_blocks")
    assert_idle_and_empty(tiny)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fresh = LLM(**TINY_KV).generate([VALID_PROMPTS[0]], params)[0].token_ids
    assert tiny.generate([VALID_PROMPTS[0]], params)[0].token_ids == fresh
    assert_idle_and_empty(tiny)


def test_request_filling_the_kv_cache_exactly_is_served():
    tiny = LLM(**TINY_KV)
    [out] = tiny.generate([[1] * 8], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8
    assert_idle_and_empty(tiny)


# ---------------------------------------------------------------------------------------------
# Engine configuration

BAD_CONFIGS = [
    ("block_size", dict(block_size=0)),
    ("block_size", dict(block_size=16.0)),
    ("max_num_seqs", dict(max_num_seqs=-1)),
    ("max_num_seqs", dict(max_num_seqs=0)),
    ("max_num_batched_tokens", dict(max_num_batched_tokens=0)),
    ("num_kv_blocks", dict(num_kv_blocks=0)),
    ("max_model_len", dict(max_model_len=0)),
    ("max_model_len", dict(max_model_len=5000)),  # beyond the oracle's 4096 positions
    ("dtype", dict(dtype="int8")),
    ("dtype", dict(dtype=torch.int8)),
    ("sim_policy", dict(sim_policy="bogus")),
    ("device", dict(device="tpu")),
    ("seed", dict(seed=-1)),
    ("async_scheduling", dict(async_scheduling="yes")),
    ("enforce_eager", dict(enforce_eager=1)),
    ("sim_policy", dict(device="cpu", sim_policy="threaded")),
    ("timeline_steps", dict(timeline_steps=-1)),
]
# sizes are checked against what they would allocate, before allocating
OVERSIZED = [("max_num_seqs", dict(max_num_seqs=10**9)),
             ("num_kv_blocks", dict(num_kv_blocks=10**12)),
             ("block_size", dict(block_size=2**31)),
             ("max_num_batched_tokens", dict(max_num_batched_tokens=10**12))]


@pytest.mark.parametrize("field,kwargs", BAD_CONFIGS, ids=[repr(kw) for _, kw in BAD_CONFIGS])
def test_invalid_engine_config_is_refused_naming_the_field(field, kwargs):
    refused(lambda: LLM(model="oracle", **kwargs), field)


@pytest.mark.parametrize("field,kwargs", OVERSIZED, ids=[f for f, _ in OVERSIZED])
def test_sizes_beyond_memory_are_refused_naming_the_field_and_the_bytes(field, kwargs):
    error = refused(lambda: LLM(model="oracle", **kwargs), field)
    assert re.search(r"needs [\d,]+ bytes for .* more than the [\d,]+ bytes", str(error)), error


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cuda_device_is_refused_without_cuda():
    refused(lambda: LLM(model="oracle", device="cuda"), "device")


# ---------------------------------------------------------------------------------------------
# Model directories


def test_missing_model_directory_is_refused(tmp_path):
    missing = tmp_path / "no-such-model"
    error = refused(lambda: LLM(model=str(missing)), "model")
    assert str(missing) in str(error)


def test_model_that_is_not_a_string_is_refused():
    refused(lambda: LLM(model=123), "model")


def test_an_empty_model_string_is_refused_not_read_as_the_current_directory(tmp_path,
                                                                            monkeypatch):
    write_checkpoint(tmp_path, DEFAULT_CONFIG, random_llama_weights(DEFAULT_CONFIG, seed=0))
    monkeypatch.chdir(tmp_path)  # a checkpoint right here would have been loaded
    error = refused(lambda: LLM(model=""), "model")
    assert "''" in str(error)


@pytest.mark.parametrize("value", [[1, 2, 3], None, 3.5])
def test_as_device_says_that_it_needs_a_tensor(value):
    import sync_guard
    with pytest.raises(TypeError, match=r"as_device\(tensor\) needs a torch.Tensor, got "
                                        + type(value).__name__):
        sync_guard.as_device(value)


def test_engine_broken_error_is_importable_where_users_catch_it():
    import lockstep
    import lockstep.engine
    from lockstep.engine.core import EngineBrokenError
    assert lockstep.EngineBrokenError is lockstep.engine.EngineBrokenError is EngineBrokenError
    assert "EngineBrokenError" in lockstep.__all__
    assert "EngineBrokenError" in lockstep.engine.__all__


class _Tripwire:
    """Unpickling this creates ``path``: proof that someone loaded the pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_only_checkpoint_is_refused_without_unpickling_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEFAULT_CONFIG))
    tripwire = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(str(tripwire))))
    error = str(refused(lambda: LLM(model=str(tmp_path)), "model"))
    assert "safetensors" in error and "pickle" in error
    assert not tripwire.exists()


def test_checkpoint_without_config_json_is_refused(tmp_path):
    write_checkpoint(tmp_path, DEFAULT_CONFIG, random_llama_weights(DEFAULT_CONFIG, seed=0))
    (tmp_path / "config.json").unlink()
    refused(lambda: LLM(model=str(tmp_path)), "config.json")


def test_checkpoint_with_malformed_config_json_is_refused(tmp_path):
    write_checkpoint(tmp_path, DEFAULT_CONFIG, random_llama_weights(DEFAULT_CONFIG, seed=0))
    (tmp_path / "config.json").write_text("{not json")
    refused(lambda: LLM(model=str(tmp_path)), "config.json")


def test_checkpoint_of_an_unsupported_architecture_is_refused(tmp_path):
    config = dict(DEFAULT_CONFIG, model_type="gpt2")
    write_checkpoint(tmp_path, config, random_llama_weights(DEFAULT_CONFIG, seed=0))
    refused(lambda: LLM(model=str(tmp_path)), "model_type")


# ---------------------------------------------------------------------------------------------
# Request ids and aborts, through the engine core


@pytest.mark.parametrize("request_id", ["", 7, None], ids=["empty", "int", "None"])
def test_invalid_request_id_is_refused(llm, expected, request_id):
    refused(lambda: llm.engine.add_request(request_id, VALID_PROMPTS[0], VALID_PARAMS[0]),
            "request_id")
    assert_still_serves(llm, expected)


def test_duplicate_id_of_an_unfinished_request_is_refused(llm, expected):
    engine = llm.engine
    engine.add_request("dup", VALID_PROMPTS[0], VALID_PARAMS[0])
    refused(lambda: engine.add_request("dup", VALID_PROMPTS[1], VALID_PARAMS[1]), "request_id")
    final = drain(engine)
    assert list(final) == ["dup"]
    assert final["dup"].token_ids == expected[0]
    assert_still_serves(llm, expected)


def test_id_of_a_finished_request_may_be_reused(llm, expected):
    engine = llm.engine
    engine.add_request("again", VALID_PROMPTS[0], VALID_PARAMS[0])
    drain(engine)
    engine.add_request("again", VALID_PROMPTS[1], VALID_PARAMS[1])
    assert drain(engine)["again"].token_ids == expected[1]
    assert_still_serves(llm, expected)


def test_aborted_request_ends_with_reason_abort_and_the_other_finishes_normally(llm, expected):
    engine = llm.engine
    engine.add_request("keep", VALID_PROMPTS[0], VALID_PARAMS[0])
    engine.add_request("drop", VALID_PROMPTS[1], VALID_PARAMS[1])
    engine.step()
    assert engine.abort_request("drop") is True
    final = drain(engine)
    assert final["drop"].finish_reason == "abort"
    dropped = final["drop"].token_ids
    assert len(dropped) < len(expected[1]) and dropped == expected[1][:len(dropped)]
    assert final["keep"].finish_reason == "length"
    assert final["keep"].token_ids == expected[0]
    assert_still_serves(llm, expected)


def test_request_aborted_before_any_step_ends_with_no_tokens(llm, expected):
    engine = llm.engine
    engine.add_request("early", VALID_PROMPTS[0], VALID_PARAMS[0])
    assert engine.abort_request("early") is True
    final = drain(engine)
    assert final["early"].finish_reason == "abort"
    assert final["early"].token_ids == []
    assert_still_serves(llm, expected)


def test_aborting_an_unknown_request_returns_false(llm, expected):
    assert llm.engine.abort_request("nope") is False
    assert_still_serves(llm, expected)


def test_aborting_a_finished_request_returns_false(llm, expected):
    engine = llm.engine
    engine.add_request("done", VALID_PROMPTS[0], VALID_PARAMS[0])
    assert drain(engine)["done"].finish_reason == "length"
    assert engine.abort_request("done") is False
    assert_still_serves(llm, expected)
