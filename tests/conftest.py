"""Shared fixtures: tiny random Hugging Face checkpoints, devices, and the KV-leak check."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lockstep.engine import RequestOutput
from lockstep.engine.core import EngineCore

_LIVE_ENGINES: "weakref.WeakSet[EngineCore]" = weakref.WeakSet()
_original_init = EngineCore.__init__


def _tracking_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    _LIVE_ENGINES.add(self)


EngineCore.__init__ = _tracking_init


def drain(engine: EngineCore, max_steps: int = 1000) -> dict[str, RequestOutput]:
    """Step until idle; the final output of every request that finished, each seen once."""
    final: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return final
        for out in engine.step():
            if out.finished:
                assert out.request_id not in final, f"{out.request_id} finished twice"
                final[out.request_id] = out
    pytest.fail(f"the engine did not become idle in {max_steps} steps")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def all_kv_blocks_free_after_test():
    """After every test, every live engine is idle and holds no KV block."""
    yield
    gc.collect()
    for engine in list(_LIVE_ENGINES):
        if engine.has_unfinished_requests():
            continue  # a module-scoped engine mid-use; checked once its requests end
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_total_blocks"], f"KV blocks leaked: {stats}"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def tiny_config(family: str):
    """A small random config of ``family`` that exercises GQA, biases, q/k-norm and tying."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**common, rope_theta=5000.0, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, rope_theta=20000.0, tie_word_embeddings=True)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True)
    raise ValueError(family)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(family)`` -> directory of a saved tiny random checkpoint (cached)."""
    from transformers import AutoModelForCausalLM
    cache: dict[str, str] = {}

    def make(family: str) -> str:
        if family not in cache:
            torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3}[family])
            model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path, safe_serialization=True)
            cache[family] = str(path)
        return cache[family]

    return make
