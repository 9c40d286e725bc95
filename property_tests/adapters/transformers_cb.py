"""Hugging Face transformers' continuous batching behind the engine-under-test protocol.

``--engine transformers`` drives a ``ContinuousBatchingManager``
(``model.init_continuous_batching``) one batch at a time from the calling thread, with no
background thread. Requests, cancellations and results go through the manager's public calls
(``add_request``, ``cancel_request``, ``get_result``); ``step()`` runs one iteration of the
manager's generation loop body: schedule a batch, run its forward and sampling, update the
requests from the tokens. In async mode (CUDA only: two IO pairs, batch N+1 scheduled and
launched before batch N's tokens are known) a step is the loop body exactly as the manager's
thread runs it: prepare and launch N+1, then update N; the first batch is launched without an
update, as the manager bootstraps it, and a step with nothing to schedule launches and updates
nothing, as the thread waits there.

Transformers has no public single-step API, so everything that touches its internals lives in
:class:`~.transformers_loop.Loop`. Tested on 5.17.0 and 5.24.0 (their caches differ: blocks in 5.17, sectors in
5.24; the adapter tells them apart by feature); versions outside ``SUPPORTED`` are refused.

What maps (the rest is in the capability notes): ``block_size`` -> the page size (at least 4 in
transformers: smaller blocks run as pages of 4 with the same token capacity); ``num_kv_blocks``
-> ``num_blocks`` (None: room for ``max_num_seqs`` requests of ``max_model_len`` tokens);
``max_num_batched_tokens`` -> ``max_batch_tokens``; ``max_num_seqs`` -> requests per batch;
``max_model_len`` is checked here. Transformers reports no finish reason: "stop" when the last
id is one of the request's stops (its eos ids), "length" otherwise, "error" when it failed.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Sequence

import torch

import sync_guard
from lockstep.engine import SamplingParams

from ..capabilities import SAMPLING_OPTIONS, Capabilities, narrow_params
from ..engine_under_test import Mode
from ..invariants import InvariantViolation
from ..workload import EngineSpec
from . import transformers_model as tiny
from .base import AdapterBase
from .transformers_loop import Loop, TransformersCrash

__all__ = ["TransformersCrash", "TransformersEngine", "check_environment", "transformers_engine"]

SUPPORTED = ("5.17.0", "5.25.0")   # [low, high): tested on 5.17.0 and 5.24.0
MIN_PAGE_SIZE = 4                   # transformers refuses smaller pages


def check_environment() -> None:
    """RuntimeError naming the installed version unless transformers is importable and in
    ``SUPPORTED``."""
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"the transformers adapter needs transformers "
                           f">={SUPPORTED[0]},<{SUPPORTED[1]}: {exc}") from None
    from packaging.version import Version
    version = Version(transformers.__version__)
    if not Version(SUPPORTED[0]) <= version < Version(SUPPORTED[1]):
        raise RuntimeError(f"transformers {transformers.__version__} is installed; the "
                           f"transformers adapter drives continuous-batching internals known "
                           f"only for >={SUPPORTED[0]},<{SUPPORTED[1]}")


@dataclass(slots=True)
class TransformersOutput:
    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list | None = None   # never reported
    error: str | None = None


@dataclass(slots=True)
class _Holder:
    """One use of a request id: when it was added (tells its results from an earlier use's)."""

    added_at: float
    stops: frozenset[int]
    tokens: list[int]
    aborted: bool = False


class TransformersEngine(AdapterBase):
    """A ``ContinuousBatchingManager`` driven one batch per ``step()``."""

    eos_token_ids = (tiny.EOS_TOKEN_ID,)
    vocab_size = tiny.VOCAB_SIZE

    def __init__(self, spec: EngineSpec, mode: Mode) -> None:
        super().__init__(spec, mode)
        check_environment()
        tiny.check_model_name(spec.model)
        if not transformers_engine.capabilities.runs(mode.async_scheduling, mode.device):
            raise ValueError(f"mode={mode.name!r}: transformers CB runs sync on cpu and cuda and "
                             f"async on cuda only")
        if mode.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("mode device 'cuda' but no CUDA device is available")
        self.max_model_len = spec.max_model_len or tiny.MAX_POSITIONS
        if self.max_model_len > tiny.MAX_POSITIONS:
            raise ValueError(f"EngineSpec.max_model_len={spec.max_model_len} exceeds the tiny "
                             f"model's {tiny.MAX_POSITIONS} positions")
        self.page_size = max(spec.block_size, MIN_PAGE_SIZE)
        if spec.num_kv_blocks is None:
            per_request = -(-self.max_model_len // self.page_size) + 1
            self.num_pages = per_request * spec.max_num_seqs
        else:   # the same number of tokens when pages are larger than the spec's blocks
            self.num_pages = -(-spec.num_kv_blocks * spec.block_size // self.page_size)
        model = tiny.tiny_llama(spec.seed, mode.device)
        with sync_guard.allow("transformers CB: building the manager (seeding, cache sizing)"):
            # an earlier engine's ContinuousBatchProcessor empties the CUDA cache in __del__:
            # collect it here, not at a random allocation inside a later engine's guarded step
            gc.collect()
            self._loop = Loop(model, mode.async_scheduling, self.page_size, self.num_pages,
                               spec.max_num_batched_tokens, spec.max_num_seqs, spec.seed)
        self._holders: dict[str, _Holder] = {}
        self._ended: dict[str, list[_Holder]] = {}   # earlier uses of each id
        self._abort_outputs: list[TransformersOutput] = []
        self.outputs_after_abort = 0

    # -- the protocol --------------------------------------------------------------------------

    def _add(self, request_id: str, prompt: list[int], params: SamplingParams,
             arrival_index: int) -> None:
        self._check_request(prompt, params)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos
                                              else set(self.eos_token_ids))
        holder = _Holder(time.perf_counter(), frozenset(stops), [])
        self._loop.add(request_id, prompt, params.max_tokens, sorted(stops))
        self._holders[request_id] = holder

    def _abort(self, request_id: str) -> bool:
        if request_id not in self._holders:
            return False   # aborted already: its "abort" output goes out with the next step
        holder = self._end(request_id, aborted=True)
        self._loop.cancel(request_id)
        self._abort_outputs.append(TransformersOutput(request_id, list(holder.tokens), "abort"))
        return True

    def _step(self) -> Sequence[TransformersOutput]:
        self._loop.step()
        results = self._loop.results()
        outputs, self._abort_outputs = self._abort_outputs, []
        latest: dict[str, TransformersOutput] = {}
        for result in results:
            out = self._translate(result)
            if out is not None:
                latest[out.request_id] = out
        return outputs + list(latest.values())

    def stats(self) -> dict:
        return {**super().stats(), **self._loop.stats(),
                "outputs_after_abort": self.outputs_after_abort}

    def check_invariants(self) -> None:
        problems = self._loop.problems(set(self._holders))
        if problems:
            raise InvariantViolation(f"transformers {self.mode.name}: " + "; ".join(problems))

    # -- mapping -------------------------------------------------------------------------------

    def _check_request(self, prompt: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {params!r}")
        if not prompt:
            raise ValueError("prompt is empty")
        for i, tok in enumerate(prompt):
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < self.vocab_size:
                raise ValueError(f"prompt[{i}]={tok!r} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        params.check_vocab(self.vocab_size)
        narrowed = narrow_params(params, transformers_engine.capabilities)
        for option in (*SAMPLING_OPTIONS, "logprobs"):
            if getattr(narrowed, option) != getattr(params, option):
                raise ValueError(f"params.{option}={getattr(params, option)!r}: transformers CB "
                                 f"does not honour it per request (greedy only; see "
                                 f"transformers_engine.capabilities)")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} with a {len(prompt)}-token prompt "
                             f"exceeds max_model_len={self.max_model_len}")
        if -(-total // self.page_size) > self.num_pages:
            raise ValueError(f"the request needs {-(-total // self.page_size)} KV pages of "
                             f"{self.page_size} tokens but the cache has {self.num_pages}")

    def _translate(self, result) -> TransformersOutput | None:
        """The protocol's output for one transformers result; None for a late result of an
        aborted request (transformers may still update a request that was in flight)."""
        rid = result.request_id
        holder = self._holders.get(rid)
        if holder is None or result.created_time < holder.added_at:
            ended = [h for h in self._ended.get(rid, ()) if h.added_at <= result.created_time]
            owner = max(ended, key=lambda h: h.added_at, default=None)
            if owner is not None and owner.aborted:
                self.outputs_after_abort += 1
                return None
            raise InvariantViolation(f"transformers {self.mode.name}: a result for {rid!r} "
                                     f"after that request finished: "
                                     f"{list(result.generated_tokens)}")
        holder.tokens = list(result.generated_tokens)
        if result.error is not None:
            reason = "error"
        elif result.is_finished():
            reason = "stop" if holder.tokens and holder.tokens[-1] in holder.stops else "length"
        else:
            reason = None
        if reason is not None:
            self._end(rid, aborted=False)
        return TransformersOutput(rid, list(holder.tokens), reason, error=result.error)

    def _end(self, request_id: str, aborted: bool) -> _Holder:
        holder = self._holders.pop(request_id)
        holder.aborted = aborted
        self._ended.setdefault(request_id, []).append(holder)
        return holder


def transformers_engine(spec: EngineSpec, mode: Mode) -> TransformersEngine:
    """The :data:`~lockstep.property_tests.engine_under_test.EngineFactory` for ``--engine
    transformers``."""
    return TransformersEngine(spec, mode)


transformers_engine.check_environment = check_environment
transformers_engine.capabilities = Capabilities(
    engine="transformers", adapter_version="1",
    sampling=frozenset({"stop_token_ids", "ignore_eos"}),
    max_logprobs=None, abort=True, reuse_ids=True, force_preempt=False,
    modes=frozenset({(False, "cpu"), (False, "cuda"), (True, "cuda")}),
    exact=False,
    notes=(
        "transformers: greedy only (its sampling, seed and logprob switches are per manager, "
        "not per request); stop ids and ignore_eos are honoured per request through the "
        "request's eos ids",
        "transformers: no ties: the tiny random Llama runs in float64, so batched and solo "
        "logits differ by ~1e-16 and greedy streams compare exactly (a scaled LM head would "
        "not help: gaps and rounding noise scale alike)",
        "transformers: block sizes under 4 run as pages of 4 with the same token capacity; "
        "max_num_seqs caps requests per batch; preemption is transformers' own soft reset",
    ))
