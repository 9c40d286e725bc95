"""The engine's Llama / Qwen2 / Qwen3 models agree with Hugging Face transformers."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lockstep.engine import LLM, SamplingParams
from lockstep.engine.models.attention import AttentionMetadata

from conftest import DEVICES

FAMILIES = ["llama", "qwen2", "qwen3"]
PROMPT_LENGTHS = [3, 17, 40, 9, 64]


def prompts(vocab: int = 256, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def hf_model(path: str, device: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def engine_prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """All-position logits of one prompt through the engine's model and paged cache."""
    runner, n = llm.engine.runner, len(ids)
    bs = llm.config.block_size
    nb = -(-n // bs)
    dev = runner.kv_cache.device
    pos = torch.arange(n, device=dev)
    meta = AttentionMetadata(
        slot_mapping=pos, block_tables=torch.arange(nb, device=dev)[None],
        token_rows=torch.zeros(n, dtype=torch.long, device=dev), token_cols=pos,
        query_positions=pos[None], q_max=n, kv_len=nb * bs)
    with torch.inference_mode():
        hidden = llm.engine.model(torch.tensor(ids, device=dev), pos, runner.kv_cache, meta)
        return llm.engine.model.compute_logits(hidden)


def hf_greedy(model, prompt: list[int], max_new: int, eos: int | None = 2, **kw) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_forward(hf_checkpoint, family, device):
    path = hf_checkpoint(family)
    llm = LLM(model=path, device=device, dtype=torch.float32, num_kv_blocks=16)
    ref = hf_model(path, device)
    for ids in prompts()[:3]:
        with torch.inference_mode():
            expected = ref(torch.tensor([ids], device=device)).logits[0].float()
        torch.testing.assert_close(engine_prefill_logits(llm, ids), expected,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_batch_matches_transformers_generate(hf_checkpoint, family, device,
                                                    repetition_penalty):
    path = hf_checkpoint(family)
    llm = LLM(model=path, device=device, dtype=torch.float32)
    ref = hf_model(path, device)
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=repetition_penalty)
    outs = llm.generate(prompts(), params)
    for prompt, out in zip(prompts(), outs):
        expected = hf_greedy(ref, prompt, 24, repetition_penalty=repetition_penalty)
        assert out.token_ids == expected, f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == ("stop" if expected[-1] == 2 else "length")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_chunked_prefill_and_preemption_matches_transformers(
        hf_checkpoint, family, device):
    path = hf_checkpoint(family)
    llm = LLM(model=path, device=device, dtype=torch.float32, block_size=4, num_kv_blocks=40,
              max_num_batched_tokens=16, max_num_seqs=5)
    ref = hf_model(path, device)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(prompts(seed=1), params)
    assert llm.stats()["num_preemptions"] > 0
    for prompt, out in zip(prompts(seed=1), outs):
        assert out.token_ids == hf_greedy(ref, prompt, 32, eos=None)
