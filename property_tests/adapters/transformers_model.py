"""The tiny model the transformers adapter runs: a random Llama built with transformers' classes.

Transformers cannot run Lockstep's integer oracle, so ``EngineSpec.model`` None, ``"oracle"`` and
``"default"`` all mean this model: ``LlamaConfig`` + ``LlamaForCausalLM`` (2 layers, hidden 64,
vocabulary 512, EOS 0 like the oracle's), weights drawn from ``EngineSpec.seed`` on the CPU and
then moved, so every device and every engine built from one seed holds the same weights. Nothing
is downloaded and no remote code runs.

Why float64 (the one rationale note): a random float model has near-ties, and a batched run and
a solo run round differently, so a greedy pick can flip without any bug. Scaling the LM head does
not help: it multiplies the top-2 gap and the rounding noise alike, their ratio stays. What sets
the odds is the noise: measured on this model over 960 positions, float32 differs by up to
4.8e-7 nats between batched and solo runs while 1 % of top-2 gaps are under 4.9e-4 (about one
flip per 10^5 tokens, enough to fail a long fuzz run); in float64 the same comparison measured
no difference at all (rounding is about 1e-16, a flip some 10^9 times rarer). The model is tiny,
so float64 costs nothing.
"""
from __future__ import annotations

import functools

import torch

MODEL_NAMES = (None, "oracle", "default")
VOCAB_SIZE = 512
EOS_TOKEN_ID = 0
MAX_POSITIONS = 4096
DTYPE = torch.float64
# paged eager attention is accepted by every supported version and never auto-switches to a
# flash kernel (which has no float64)
ATTN_IMPLEMENTATION = "paged|eager"


def check_model_name(model: str | None) -> None:
    """ValueError naming ``EngineSpec.model`` unless it means the tiny model."""
    if model not in MODEL_NAMES:
        raise ValueError(f"EngineSpec.model={model!r}: the transformers adapter runs only its "
                         f"tiny random Llama; use one of {list(MODEL_NAMES)}")


def tiny_llama(seed: int, device: str):
    """The tiny Llama for ``seed`` on ``device`` (``"cpu"`` or ``"cuda"``), in eval mode; built
    once per (seed, device) and shared, since nothing the adapter does writes to it."""
    return _build(seed, str(torch.device(device)))


@functools.lru_cache(maxsize=8)
def _build(seed: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1, eos_token_id=EOS_TOKEN_ID, pad_token_id=None,
        tie_word_embeddings=False, attn_implementation=ATTN_IMPLEMENTATION)
    with torch.random.fork_rng(devices=[]):   # leave the caller's random stream alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype=DTYPE, device=device).eval().requires_grad_(False)
