"""``LLM``: the user-facing entry point (offline batch generation, like ``vllm.LLM``)."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .config import EngineConfig
from .core import EngineCore, token_id_list
from .models.loader import load_tokenizer
from .request import RequestOutput
from .sampling_params import SamplingParams


@contextmanager
def deferred_sigint() -> Iterator[list[bool]]:
    """In the main thread under Python's default SIGINT handler: a first SIGINT only sets the
    flag (the caller raises KeyboardInterrupt at its next safe point); a second raises at once."""
    flag = [False]
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield flag
        return

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
    if flag[0]:  # arrived after the caller's last safe point: deliver it now
        raise KeyboardInterrupt


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
                 seed: int = 0, enforce_eager: bool = False, sim_policy: str | None = None,
                 cuda_graph_sizes: Sequence[int] | None = None, timeline_steps: int = 1024,
                 collect: str = "lazy", output_wait: str = "block") -> None:
        self.config = EngineConfig(
            model=model, device=device, dtype=dtype, async_scheduling=async_scheduling,
            block_size=block_size, num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
            seed=seed, enforce_eager=enforce_eager, sim_policy=sim_policy,
            cuda_graph_sizes=cuda_graph_sizes, timeline_steps=timeline_steps, collect=collect,
            output_wait=output_wait)
        self.engine = EngineCore(self.config)
        self.tokenizer = load_tokenizer(model)
        self._num_generate_calls = 0

    def generate(self, prompts: Sequence[Sequence[int] | str],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        All or nothing: every prompt and parameter is checked before any request is added.
        Only this call's requests are tracked; outputs of requests added otherwise (with
        ``add_request``) are handed back to the next ``step``. A first Ctrl-C (SIGINT, main
        thread) is delivered once the current step has finished; a second interrupts at once.
        Interrupted or failed, the call aborts its own requests before the exception leaves.
        """
        engine = self.engine
        engine.ensure_usable()
        if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of prompts (token-id lists or strings), "
                             f"got {prompts!r}")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_prompts = [self._tokenize(i, p) for i, p in enumerate(prompts)]
        params = self._params_per_prompt(sampling_params, len(token_prompts))
        checked = [engine.check_request(ids, p) for ids, p in zip(token_prompts, params)]
        with engine.exclusive("LLM.generate"), deferred_sigint() as interrupted:
            own = self._add_all(checked, params)
            try:
                results = self._run(own, interrupted)
            except BaseException:
                if engine.broken is None:
                    self._abandon(own)
                raise
        if self.tokenizer is not None:
            for out in results:
                out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return results

    def _add_all(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
        """Add one request per prompt under fresh ids; on a failure none stays added."""
        engine = self.engine
        while True:
            self._num_generate_calls += 1
            own = [f"gen{self._num_generate_calls}-{i}" for i in range(len(prompts))]
            if not any(rid in engine.scheduler.requests for rid in own):
                break
        try:
            for rid, ids, p in zip(own, prompts, params):
                engine.add_checked_request(rid, ids, p)
        except BaseException:
            self._abandon(own)
            raise
        return own

    def _abandon(self, own: list[str]) -> None:
        """Abort this call's requests, let their steps in flight land, drop their outputs.

        Anything that cuts this short (a second Ctrl-C lands here) may have cut an abort or a
        collect in half, and leaves outputs nobody will take: the engine is marked broken."""
        engine = self.engine
        try:
            for rid in own:
                engine.abort_request(rid)
            engine.settle()
            engine.drop_outputs(set(own))
        except BaseException as exc:
            if engine.broken is None:
                engine.broken = (f"{type(exc).__name__} ({exc}) struck while generate "
                                 f"abandoned its requests")
            raise

    def _run(self, own: list[str], interrupted: list[bool]) -> list[RequestOutput]:
        wanted, final = set(own), {}
        foreign: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(own):
                for out in self.engine.step():
                    if out.request_id not in wanted:
                        foreign[out.request_id] = out  # cumulative: the latest is enough
                    elif out.finished:
                        final[out.request_id] = out
                if interrupted[0]:
                    interrupted[0] = False  # delivered here, not again at the exit
                    raise KeyboardInterrupt
        finally:
            if foreign:
                self.engine.put_back(list(foreign.values()))
        return [final[rid] for rid in own]

    def stats(self) -> dict:
        """Counters: ``num_steps``, ``num_preemptions``, ``num_free_blocks``, ``num_total_blocks``…
        Safe from any thread, also while ``generate`` runs (a snapshot)."""
        return self.engine.stats()

    def export_trace(self, path: str) -> None:
        """Write the step timeline (host and device spans) as a Chrome/Perfetto trace JSON.

        It waits for the device, so from another thread while ``generate`` runs it raises
        RuntimeError at once, like every call that needs the engine to itself."""
        with self.engine.exclusive("LLM.export_trace"):
            self.engine.timeline.export_chrome_trace(path)

    def _tokenize(self, index: int, prompt: object) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{index}] is a string but the model has no tokenizer; "
                                 f"pass token ids")
            return self.tokenizer.encode(prompt)
        return token_id_list(prompt, f"prompt_token_ids (prompts[{index}])")

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
