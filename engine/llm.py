"""``LLM``: the user-facing entry point (offline batch generation, like ``vllm.LLM``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import EngineConfig
from .core import EngineCore
from .models.loader import load_tokenizer
from .request import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """A compact paged-KV engine.

    ``model`` is None (the embedded default: a small random Llama), ``"oracle"`` (an exactly
    batch-invariant toy LM) or a Hugging Face checkpoint directory (config.json + safetensors).

    Example::

        >>> llm = LLM(model="oracle")
        >>> [out] = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))
        >>> len(out.token_ids)
        4
    """

    def __init__(self, model: str | None = None, device: str = "cpu",
                 dtype: torch.dtype | str | None = None, async_scheduling: bool = False,
                 block_size: int = 16, num_kv_blocks: int | None = None, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 1024, max_model_len: int | None = None,
                 seed: int = 0, enforce_eager: bool = False, sim_policy: str = "eager",
                 cuda_graph_sizes: Sequence[int] | None = None) -> None:
        self.config = EngineConfig(
            model=model, device=device, dtype=dtype, async_scheduling=async_scheduling,
            block_size=block_size, num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            seed=seed, enforce_eager=enforce_eager, sim_policy=sim_policy,
            cuda_graph_sizes=cuda_graph_sizes)
        self.engine = EngineCore(self.config)
        self.tokenizer = load_tokenizer(model)
        self._num_generate_calls = 0

    def generate(self, prompts: Sequence[Sequence[int] | str],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of prompts (token-id lists or strings), "
                             f"got {prompts!r}")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_prompts = [self._tokenize(i, p) for i, p in enumerate(prompts)]
        params = self._params_per_prompt(sampling_params, len(token_prompts))
        for ids, p in zip(token_prompts, params):
            self.engine.check_request(ids, p)
        self._num_generate_calls += 1
        ids_in_order = [f"gen{self._num_generate_calls}-{i}" for i in range(len(token_prompts))]
        for rid, ids, p in zip(ids_in_order, token_prompts, params):
            self.engine.add_request(rid, ids, p)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids_in_order):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        results = [final[rid] for rid in ids_in_order]
        if self.tokenizer is not None:
            for out in results:
                out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return results

    def stats(self) -> dict:
        """Counters: ``num_steps``, ``num_preemptions``, ``num_free_blocks``, ``num_total_blocks``…"""
        return self.engine.stats()

    def export_trace(self, path: str) -> None:
        """Write the step timeline (host and device spans) as a Chrome/Perfetto trace JSON."""
        self.engine.timeline.export_chrome_trace(path)

    def _tokenize(self, index: int, prompt: Sequence[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{index}] is a string but the model has no tokenizer; "
                                 f"pass token ids")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (bytes, int)) or not isinstance(prompt, Sequence):
            raise ValueError(f"prompts[{index}] must be a list of token ids or a string, "
                             f"got {prompt!r}")
        return list(prompt)

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
        return params
